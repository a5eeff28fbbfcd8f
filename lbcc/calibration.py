"""Calibration: feeds of real data, streaming observers, and the ONNX Runtime runner.

Feeds yield model-input dicts: text + tokenizer (windows of ``seq_len`` tokens), an ``.npz`` of
arrays named like the model inputs (leading axis = samples), or seeded random tokens for smoke
tests. The runner adds the tensors to observe as graph outputs of a temporary copy, runs it one
sample at a time and folds each output into an :class:`ActivationObserver`; nothing is kept per
sample, so memory stays bounded however many samples there are.

An observer keeps running min/max, sum and sum of squares, per-channel abs-max and mean square
(last axis), and a streaming signed histogram over ``[-R, R]`` whose range doubles (merging bin
pairs, exactly) when a larger value arrives. From the histogram it estimates, for an affine uint8
range ``[lo, hi]`` with step d = (hi - lo) / 255, the quantization noise
``N = sum_in n_i d^2/12 + sum_out n_i (c_i - clamp(c_i))^2`` over bins i, and chooses ranges by
min/max, percentile, or minimum N (MSE).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx_ir as ir

from lbcc.errors import BadInputError
from lbcc.kvcache import prefill_inputs
from lbcc.numerics import sqnr_db

HIST_BINS = 2048


# ----------------------------------------------------------------------------- tokenizers

def load_tokenizer(spec: str | Path) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file or a directory holding one."""
    from tokenizers import Tokenizer

    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise BadInputError(f"tokenizer {str(spec)!r} not found (looked for {path}).",
                            "Pass a tokenizer.json file or the Hugging Face model directory that "
                            "holds it.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise BadInputError(f"{str(path)!r} is not a readable tokenizer.json ({str(exc)[:200]}).",
                            "Save the tokenizer with tokenizer.save_pretrained(dir).") from None


def model_vocab_size(model: ir.Model) -> int | None:
    """Vocabulary size of a causal LM: the last dim of its logits, else its embedding rows."""
    for out in model.graph.outputs:
        if out.shape is not None and len(out.shape) >= 1 and isinstance(out.shape[-1], int):
            return int(out.shape[-1])
    return None


def tokenize_text(path: str | Path, tokenizer: Any, what: str = "text") -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{what} file {str(path)!r} does not exist.", "Check the path.")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise BadInputError(f"{what} file {str(path)!r} is empty.",
                            "Give a text file with at least a few thousand tokens of real text.")
    ids = tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
    return np.asarray(ids, dtype=np.int64)


def check_vocab(tokenizer: Any, model: ir.Model) -> None:
    vocab = model_vocab_size(model)
    tok_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab is not None and tok_vocab > vocab:
        raise BadInputError(
            f"the tokenizer has {tok_vocab} tokens but the model's vocabulary has {vocab}: they "
            "do not belong together.", "Pass the tokenizer saved with this model "
            "(its tokenizer.json).")


# ----------------------------------------------------------------------------- feeds

class Feed:
    """Yields ``{input_name: array}`` samples; ``len()`` is the number of samples."""

    def samples(self, model: ir.Model) -> Iterator[dict[str, np.ndarray]]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": type(self).__name__}


def _single_token_input(model: ir.Model) -> str:
    from lbcc.kvcache import is_cache_input

    # a KV-cache graph is fed by input_ids; its cache inputs are filled by kvcache.prefill_inputs
    names = [v.name for v in model.graph.inputs if not is_cache_input(v.name)]
    if len(names) != 1:
        raise BadInputError(f"token-id calibration needs a model with one input; this one has "
                            f"{names}.", "Pass an .npz file with one array per model input.")
    return names[0]


@dataclasses.dataclass
class TextFeed(Feed):
    """``samples`` windows of ``seq_len`` tokens from the start of a text file (no BOS)."""

    path: Path
    tokenizer: Any
    seq_len: int = 512
    max_samples: int = 16
    min_tokens: int = 64

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self._ids = tokenize_text(self.path, self.tokenizer, "calibration text")
        if len(self._ids) < self.min_tokens:
            raise BadInputError(
                f"calibration text {str(self.path)!r} has only {len(self._ids)} tokens; at least "
                f"{self.min_tokens} are needed (16 x {self.seq_len} is a good amount).",
                "Give a longer text file.")
        self._n = max(1, min(self.max_samples, len(self._ids) // self.seq_len))

    def __len__(self) -> int:
        return self._n

    def samples(self, model: ir.Model) -> Iterator[dict[str, np.ndarray]]:
        name = _single_token_input(model)
        check_vocab(self.tokenizer, model)
        for i in range(self._n):
            window = self._ids[i * self.seq_len:(i + 1) * self.seq_len]
            yield prefill_inputs(model, window[None, :])

    def describe(self) -> dict[str, Any]:
        return {"kind": "text", "path": str(self.path), "seq_len": self.seq_len,
                "samples": self._n, "tokens": int(min(len(self._ids), self._n * self.seq_len))}


@dataclasses.dataclass
class NpzFeed(Feed):
    """Arrays named like the model inputs, leading axis = samples."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.path.is_file():
            raise BadInputError(f"calibration file {str(self.path)!r} does not exist.",
                                "Check the path.")
        try:
            with np.load(self.path) as data:
                self._arrays = {k: data[k] for k in data.files}
        except Exception as exc:
            raise BadInputError(f"{str(self.path)!r} is not a readable .npz file ({exc}).",
                                "Write it with numpy.savez(path, input_name=array).") from None
        if not self._arrays:
            raise BadInputError(f"calibration file {str(self.path)!r} holds no arrays.",
                                "Write one array per model input, leading axis = samples.")
        counts = {len(a) for a in self._arrays.values()}
        if len(counts) != 1 or 0 in counts:
            raise BadInputError(f"arrays in {str(self.path)!r} disagree on the number of samples "
                                f"or are empty ({sorted(counts)}).",
                                "Give every array the same, non-zero leading axis.")
        self._n = counts.pop()

    def __len__(self) -> int:
        return self._n

    def samples(self, model: ir.Model) -> Iterator[dict[str, np.ndarray]]:
        from lbcc.kvcache import is_cache_input

        names = {v.name for v in model.graph.inputs}
        missing = {n for n in names - set(self._arrays) if not is_cache_input(n)}
        if missing:
            raise BadInputError(f"calibration file {str(self.path)!r} lacks arrays for model "
                                f"inputs {sorted(missing)} (it has {sorted(self._arrays)}).",
                                "Name each array after the model input it feeds.")
        for i in range(self._n):
            sample = {k: self._arrays[k][i:i + 1] for k in names if k in self._arrays}
            if names - set(sample):  # a KV-cache graph fed by input_ids only: a prefill
                sample = {**prefill_inputs(model, sample["input_ids"]), **sample}
            yield sample

    def describe(self) -> dict[str, Any]:
        return {"kind": "npz", "path": str(self.path), "samples": self._n}


@dataclasses.dataclass
class RandomFeed(Feed):
    """Seeded random token ids, for smoke tests only: ranges from random text are not real."""

    vocab_size: int
    seq_len: int = 64
    n: int = 4
    seed: int = 0

    def __len__(self) -> int:
        return self.n

    def samples(self, model: ir.Model) -> Iterator[dict[str, np.ndarray]]:
        name = _single_token_input(model)
        rng = np.random.default_rng(self.seed)
        for _ in range(self.n):
            yield prefill_inputs(model, rng.integers(0, self.vocab_size, (1, self.seq_len),
                                                     dtype=np.int64))

    def describe(self) -> dict[str, Any]:
        return {"kind": "random", "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "samples": self.n, "seed": self.seed}


# ----------------------------------------------------------------------------- observers

class ActivationObserver:
    """Streaming statistics of one tensor over all calibration samples."""

    def __init__(self, bins: int = HIST_BINS, second_moments: bool = False, keep_rows: int = 0):
        self.bins = bins
        #: up to ``keep_rows`` token rows kept (a strided subset of each sample), for passes that
        #: measure a layer's output error on real inputs (SmoothQuant's alpha search)
        self.keep_rows = keep_rows
        self._rows: list[np.ndarray] = []
        self._kept = 0
        #: sum over tokens of x x^T (float64, [C, C]) when ``second_moments``; GPTQ's Hessian
        self.xtx: np.ndarray | None = None
        self.second_moments = second_moments
        self.count = 0
        self.sum = 0.0
        self.sumsq = 0.0
        self.sum3 = 0.0
        self.sum4 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.channel_absmax: np.ndarray | None = None
        self.channel_sumsq: np.ndarray | None = None
        self.channel_count = 0
        self.hist = np.zeros(bins, dtype=np.int64)
        self.radius = 0.0  # histogram covers [-radius, radius]

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if x.size == 0:
            return
        if not np.isfinite(x).all():
            x = np.nan_to_num(x, nan=0.0, posinf=np.finfo(np.float32).max,
                              neginf=-np.finfo(np.float32).max)
        flat = x.reshape(-1, x.shape[-1]) if x.ndim >= 2 else x.reshape(1, -1)
        self.count += x.size
        sq = np.square(flat)
        csq = sq.sum(axis=0, dtype=np.float64)  # accumulated in float64, no float64 copy
        self.sum += float(flat.sum(dtype=np.float64))
        self.sumsq += float(csq.sum())
        self.sum3 += float((sq * flat).sum(dtype=np.float64))
        self.sum4 += float(np.square(sq).sum(dtype=np.float64))
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        cmax = np.abs(flat).max(axis=0)
        if self.channel_absmax is None or self.channel_absmax.shape != cmax.shape:
            self.channel_absmax, self.channel_sumsq = cmax, csq
        else:
            self.channel_absmax = np.maximum(self.channel_absmax, cmax)
            self.channel_sumsq = self.channel_sumsq + csq
        self.channel_count += flat.shape[0]
        if self._kept < self.keep_rows:
            # 64 strided rows per sample, the start rotating between samples so that position 0
            # (LLMs' attention-sink token with massive activations) is not over-represented
            stride = max(1, flat.shape[0] // 64)
            start = (len(self._rows) * 5) % stride
            take = flat[start::stride][: self.keep_rows - self._kept].copy()
            self._rows.append(take)
            self._kept += len(take)
        if self.second_moments:
            xtx = (flat.T @ flat).astype(np.float64)
            self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self._hist_update(flat.reshape(-1))

    def _hist_update(self, v: np.ndarray) -> None:
        amax = float(np.abs(v).max())
        if self.radius == 0.0:
            self.radius = 2.0 ** math.ceil(math.log2(amax)) if amax > 0 else 1.0
        while amax > self.radius:  # double the range: bin pairs merge into the centre half
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.zeros_like(self.hist)
            q = self.bins // 4
            self.hist[q:q + len(merged)] = merged
            self.radius *= 2.0
        idx = np.floor((v + self.radius) / (2 * self.radius) * self.bins).astype(np.int64)
        self.hist += np.bincount(np.clip(idx, 0, self.bins - 1), minlength=self.bins)

    # --- derived quantities
    @property
    def rows(self) -> np.ndarray | None:
        """The kept token rows ``[R, C]``, or None when none were kept."""
        return np.concatenate(self._rows) if self._rows else None

    @property
    def mean_square(self) -> float:
        return self.sumsq / self.count if self.count else 0.0

    @property
    def kurtosis(self) -> float:
        """Pearson kurtosis E[(x-mu)^4] / sigma^4 over all values (3 for a Gaussian)."""
        if not self.count:
            return 0.0
        m1, m2 = self.sum / self.count, self.sumsq / self.count
        m3, m4 = self.sum3 / self.count, self.sum4 / self.count
        var = m2 - m1 * m1
        if var <= 0:
            return 0.0
        return float((m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4) / (var * var))

    def channel_mean_square(self) -> np.ndarray | None:
        if self.channel_sumsq is None:
            return None
        return (self.channel_sumsq / max(1, self.channel_count)).astype(np.float32)

    def bin_centers(self) -> np.ndarray:
        edges = np.linspace(-self.radius, self.radius, self.bins + 1)
        return (edges[:-1] + edges[1:]) / 2

    def quant_noise(self, lo: float, hi: float, levels: int = 256) -> float:
        """Estimated mean squared error of affine quantization to ``levels`` over [lo, hi]."""
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if hi <= lo:
            return self.mean_square
        step = (hi - lo) / (levels - 1)
        c = self.bin_centers()
        inside = (c >= lo) & (c <= hi)
        clipped = np.clip(c, lo, hi)
        err = np.where(inside, step * step / 12.0, (c - clipped) ** 2)
        return float((self.hist * err).sum() / max(1, self.hist.sum()))

    def percentile_range(self, pct: float) -> tuple[float, float]:
        """Range holding ``pct`` percent of the values, trimmed equally from both tails."""
        cdf = np.cumsum(self.hist) / max(1, self.hist.sum())
        tail = (100.0 - pct) / 200.0
        c = self.bin_centers()
        lo = c[min(np.searchsorted(cdf, tail), self.bins - 1)]
        hi = c[min(np.searchsorted(cdf, 1.0 - tail), self.bins - 1)]
        return max(float(lo), self.min), min(float(hi), self.max)

    def mse_range(self, levels: int = 256) -> tuple[float, float]:
        """The [lo, hi] minimizing :meth:`quant_noise`, searched over clip ratios of min and max.

        With prefix sums of n_i, n_i c_i and n_i c_i^2 over the bins, the clipped tails are
        ``sum_{c<lo} n (c - lo)^2 = S2 - 2 lo S1 + lo^2 S0`` (likewise above hi), so every
        (lo, hi) pair costs O(1) after one pass over the histogram.
        """
        ratios = np.concatenate([np.linspace(1.0, 0.1, 46), [0.05, 0.02, 0.01]])
        lo0, hi0 = min(self.min, 0.0), max(self.max, 0.0)
        total = max(1, int(self.hist.sum()))
        c = self.bin_centers()
        n = self.hist.astype(np.float64)
        s0 = np.concatenate([[0.0], np.cumsum(n)])
        s1 = np.concatenate([[0.0], np.cumsum(n * c)])
        s2 = np.concatenate([[0.0], np.cumsum(n * c * c)])
        lo = lo0 * ratios  # [R]
        hi = hi0 * ratios
        il = np.searchsorted(c, lo, side="left")  # bins [0, il) lie below lo
        ih = np.searchsorted(c, hi, side="right")  # bins [ih, B) lie above hi
        below = s2[il] - 2 * lo * s1[il] + lo * lo * s0[il]  # [R]
        above = (s2[-1] - s2[ih]) - 2 * hi * (s1[-1] - s1[ih]) + hi * hi * (s0[-1] - s0[ih])
        inside = s0[ih][None, :] - s0[il][:, None]  # [R_lo, R_hi]
        step = np.maximum(hi[None, :] - lo[:, None], 1e-30) / (levels - 1)
        noise = (inside * step * step / 12.0 + below[:, None] + above[None, :]) / total
        i, j = np.unravel_index(int(np.argmin(noise)), noise.shape)
        return float(lo[i]), float(hi[j])

    def choose_range(self, method: str, percentile: float = 99.99) -> tuple[float, float]:
        if method == "minmax":
            return min(self.min, 0.0), max(self.max, 0.0)
        if method == "percentile":
            lo, hi = self.percentile_range(percentile)
            return min(lo, 0.0), max(hi, 0.0)
        if method == "mse":
            return self.mse_range()
        raise BadInputError(f"unknown calibration method {method!r}.",
                            "Use one of: minmax, percentile, mse.")

    def sqnr_db(self, lo: float, hi: float, levels: int = 256) -> float:
        """Estimated signal-to-quantization-noise ratio of per-tensor affine quantization."""
        return sqnr_db(self.mean_square, self.quant_noise(lo, hi, levels))

    def outlier_summary(self) -> dict[str, float]:
        """abs-max over median channel abs-max, and the share of channels above 6 (LLM.int8())."""
        if self.channel_absmax is None:
            return {}
        cmax = self.channel_absmax
        med = float(np.median(cmax)) or 1e-12
        return {"absmax": float(cmax.max()), "median_channel_absmax": med,
                "max_over_median": float(cmax.max() / med),
                "channels_over_6": int((cmax > 6.0).sum()), "channels": int(cmax.size)}


# ----------------------------------------------------------------------------- runner

def _session(model_path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def collect_activation_stats(model: ir.Model, feed: Feed, tensor_names: Sequence[str],
                             progress: bool = True, second_moments: bool = False,
                             keep_rows: int = 0) -> dict[str, ActivationObserver]:
    """Run ``model`` in ONNX Runtime on every sample of ``feed``; observe ``tensor_names``."""
    from lbcc.irutils import extra_graph_io
    from lbcc.modelio import save_model
    from lbcc.progress import track

    values = {v.name: v for node in model.graph for v in node.outputs}
    graph_inputs = {v.name for v in model.graph.inputs}
    missing = [n for n in tensor_names if n not in values and n not in graph_inputs]
    if missing:
        raise BadInputError(f"cannot observe tensors {missing[:5]}: no node produces them.",
                            "Observe node outputs or graph inputs.")
    original_outputs = list(model.graph.outputs)
    extra = [values[n] for n in tensor_names
             if n in values and values[n] not in original_outputs]
    for v in extra:
        if v.type is None:
            v.type = ir.TensorType(ir.DataType.FLOAT)
    observers = {n: ActivationObserver(second_moments=second_moments, keep_rows=keep_rows)
                 for n in tensor_names}
    with tempfile.TemporaryDirectory(prefix="lbcc-calib-") as tmp:
        with extra_graph_io(model.graph.outputs, extra):
            path = save_model(model, Path(tmp) / "calib.onnx", external_data=True)
        sess = _session(path)
        out_names = [o.name for o in sess.get_outputs()]
        wanted = [i for i, n in enumerate(out_names) if n in observers]
        for sample in track(feed.samples(model), total=len(feed), description="calibrating",
                            enabled=progress):
            outs = sess.run([out_names[i] for i in wanted], sample)
            for i, arr in zip(wanted, outs):
                observers[out_names[i]].update(arr)
            for name in graph_inputs & observers.keys():  # a MatMul fed by a graph input
                observers[name].update(sample[name])
    return observers
