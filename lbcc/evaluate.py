"""Evaluation: perplexity (non-overlapping windows), latency and file size, side by side.

Perplexity follows the standard WikiText-2 protocol: the whole file is read as one string and
tokenized once without special tokens (no BOS); the first ``max_tokens`` ids are cut into
non-overlapping windows of ``seq_len``; in each window token t+1 is predicted from tokens <= t, so
a window contributes ``seq_len - 1`` predictions. ppl = exp(mean NLL over all predictions).
Latency is the median wall time of one forward pass at batch 1 for a sequence of 128 tokens
(prefill) and of 1 token, after warm-up, with ``threads`` intra-op threads.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lbcc.errors import BadInputError
from lbcc.kvcache import kv_layout, prefill_inputs


@dataclasses.dataclass
class EvalResult:
    model: str
    size_mb: float
    perplexity: float | None = None
    tokens: int = 0
    windows: int = 0
    latency_ms: dict[int, float] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "size_mb": round(self.size_mb, 2),
                "perplexity": None if self.perplexity is None else round(self.perplexity, 4),
                "predicted_tokens": self.tokens, "windows": self.windows,
                "latency_ms": {f"seq{k}": round(v, 3) for k, v in self.latency_ms.items()},
                "seconds": round(self.seconds, 2)}


def model_size_bytes(path: str | os.PathLike) -> int:
    """The .onnx file plus every external data file it references."""
    import onnx

    path = Path(path)
    total = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    locations = set()
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    for loc in locations:
        p = path.parent / loc
        if p.is_file():
            total += p.stat().st_size
    return total


def make_session(path: str | os.PathLike, threads: int = 2) -> Any:
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"model {str(path)!r} does not exist.", "Check the path.")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BadInputError(f"ONNX Runtime cannot load {str(path)!r}: {str(exc)[:300]}",
                            "Check that it is a complete ONNX model (with its external data).")


def perplexity(session: Any, ids: np.ndarray, seq_len: int = 512, batch: int = 1
               ) -> tuple[float, int, int]:
    """(ppl, predicted tokens, windows) over non-overlapping windows of ``ids``."""
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise BadInputError(f"the evaluation text has {len(ids)} tokens, fewer than one window "
                            f"of {seq_len}.", "Use a longer text or a smaller --seq-len.")
    nll, count = 0.0, 0
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)
    for start in range(0, n_windows, batch):
        x = windows[start:start + batch]
        logits = session.run(["logits"] if kv_layout(session) else None,
                             prefill_inputs(session, x))[0]
        nll += next_token_nll(logits, x)
        count += x[:, 1:].size
    return math.exp(nll / count), count, n_windows


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed next-token negative log-likelihood of ``ids[:, 1:]`` under ``logits[:, :-1]``:
    sum_t (logsumexp_v z[t, v] - z[t, ids[t+1]]), the log-sum-exp shifted by the row max."""
    z = logits[:, :-1].astype(np.float64)
    target = ids[:, 1:]
    m = z.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(z - m).sum(axis=-1)) + m[..., 0]
    picked = np.take_along_axis(z, target[..., None], axis=-1)[..., 0]
    return float((logz - picked).sum())


#: seconds to wait before timing a run right after another session's: ONNX Runtime's intra-op
#: workers spin for a while after a run, and on a 2-core machine a still-spinning worker of the
#: session that ran before takes a core from the one being timed (measured on SmolLM2-135M,
#: 2 threads, three sessions round-robin: seq-1 latency 36-40 ms without the pause, 20.5 ms with it;
#: seq 128 about 3 %)
SETTLE_S = 0.05


def latency_ms(session: Any, seq: int, vocab: int = 100, repeats: int = 10, warmup: int = 2
               ) -> float:
    rng = np.random.default_rng(0)
    feed = prefill_inputs(session, rng.integers(0, vocab, (1, seq), dtype=np.int64))
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _check_vocab(session: Any, tokenizer: Any, model: Any) -> None:
    vocab = session.get_outputs()[0].shape[-1]
    tok_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if isinstance(vocab, int) and tok_vocab > vocab:
        raise BadInputError(f"the tokenizer has {tok_vocab} tokens but {str(model)!r} predicts "
                            f"{vocab}: they do not belong together.",
                            "Pass the tokenizer saved with this model.")


def evaluate(models: Sequence[str | os.PathLike], text: str | os.PathLike | None = None,
             tokenizer: Any = None, seq_len: int = 512, max_tokens: int | None = None,
             threads: int = 2, latency_seqs: Sequence[int] = (128, 1), repeats: int = 10,
             progress: bool = True) -> list[EvalResult]:
    """Evaluate each model on the same token ids, threads and latency shapes."""
    from lbcc.calibration import load_tokenizer, tokenize_text

    ids, tok = None, None
    if text is not None:
        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        ids = tokenize_text(text, tok, "evaluation text")
        if max_tokens:
            ids = ids[:max_tokens]
    results = []
    for m in models:
        start = time.perf_counter()
        sess = make_session(m, threads)
        if ids is not None:
            _check_vocab(sess, tok, m)
        res = EvalResult(model=str(m), size_mb=model_size_bytes(m) / 1e6)
        if ids is not None:
            res.perplexity, res.tokens, res.windows = perplexity(sess, ids, seq_len)
        for s in latency_seqs:
            res.latency_ms[s] = latency_ms(sess, s, repeats=repeats)
        res.seconds = time.perf_counter() - start
        results.append(res)
        del sess
    return results
