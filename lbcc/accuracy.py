"""End metrics that bisection and accuracy gates judge a compiled model by.

- ``ppl``: perplexity over the token windows of a feed (each sample ``ids[1, S]`` gives S - 1
  next-token predictions; ppl = exp(mean NLL)), the protocol of :mod:`lbcc.evaluate`. Its
  *degradation* is the relative increase ``ppl / ppl_float - 1`` (0.02 = 2 % worse).
- ``output-error``: the relative L2 error of the model's first output against the float model's
  on the same samples, ``sqrt(sum (y - y_f)^2 / sum y_f^2)``; its degradation is that value.

A metric runs a model in ONNX Runtime from a temporary file (external data, so any size works);
the samples are materialized once (token windows: small), so every measurement sees the same data.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from lbcc.errors import BadInputError
from lbcc.evaluate import next_token_nll

METRICS = ("ppl", "output-error")


def open_session(model: ir.Model, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session on ``model`` (saved to a temporary file that is removed)."""
    from lbcc.calibration import _session
    from lbcc.modelio import save_model

    with tempfile.TemporaryDirectory(prefix="lbcc-metric-") as tmp:
        path = save_model(model, Path(tmp) / "model.onnx", external_data=True)
        try:
            return _Checked(_session(path, threads))
        except Exception as exc:
            raise BadInputError(f"ONNX Runtime cannot load the model to measure it: "
                                f"{str(exc)[:300]}", "") from None


class _Checked:
    """A session whose run() failures become BadInputError (e.g. samples of the wrong shape)."""

    def __init__(self, sess: Any):
        self._sess = sess

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sess, name)

    def run(self, *args: Any) -> Any:
        try:
            return self._sess.run(*args)
        except Exception as exc:
            raise BadInputError(f"ONNX Runtime failed on the evaluation samples: "
                                f"{str(exc)[:300]}", "Check that the samples fit the model's "
                                "inputs (names, shapes, sequence length).") from None


class Metric:
    """Measures one model; ``baseline`` is the float model's value."""

    name = ""

    def __init__(self, samples: list[dict[str, np.ndarray]], threads: int | None = None):
        if not samples:
            raise BadInputError("the evaluation data holds no samples.",
                                "Give at least one sample (e.g. a longer --eval-text).")
        self.samples = samples
        self.threads = threads
        self.baseline = math.nan

    def measure(self, model: ir.Model) -> float:
        raise NotImplementedError

    def degradation(self, value: float) -> float:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"metric": self.name, "samples": len(self.samples),
                "baseline": _round(self.baseline)}


def _round(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")


class Perplexity(Metric):
    name = "ppl"

    def __init__(self, float_model: ir.Model, samples: list[dict[str, np.ndarray]],
                 threads: int | None = None):
        super().__init__(samples, threads)
        if len(samples[0]) != 1 or next(iter(samples[0].values())).dtype.kind not in "iu":
            raise BadInputError("--metric ppl needs a language model fed token ids (one integer "
                                "input).", "Use --metric output-error for other models.")
        self.baseline = self.measure(float_model)

    def measure(self, model: ir.Model) -> float:
        sess = open_session(model, self.threads)
        name = sess.get_inputs()[0].name
        nll, count = 0.0, 0
        for sample in self.samples:
            x = next(iter(sample.values()))
            nll += next_token_nll(sess.run(None, {name: x})[0], x)
            count += x[:, 1:].size
        mean = nll / max(count, 1)
        return math.exp(mean) if mean < 700 else math.inf

    def degradation(self, value: float) -> float:
        return value / self.baseline - 1.0 if math.isfinite(value) else math.inf


class OutputError(Metric):
    name = "output-error"

    def __init__(self, float_model: ir.Model, samples: list[dict[str, np.ndarray]],
                 threads: int | None = None):
        super().__init__(samples, threads)
        sess = open_session(float_model, threads)
        self.reference = [sess.run(None, s)[0].astype(np.float64) for s in samples]
        self.baseline = 0.0

    def measure(self, model: ir.Model) -> float:
        sess = open_session(model, self.threads)
        names = {i.name for i in sess.get_inputs()}
        err = ref = 0.0
        for sample, r in zip(self.samples, self.reference):
            y = sess.run(None, {k: v for k, v in sample.items() if k in names})[0]
            err += float(np.square(y.astype(np.float64) - r).sum())
            ref += float(np.square(r).sum())
        return math.sqrt(err / max(ref, 1e-300))

    def degradation(self, value: float) -> float:
        return value


def make_metric(kind: str, float_model: ir.Model, feed: Any, max_samples: int | None = None,
                threads: int | None = None) -> Metric:
    """A metric of ``kind`` measured on ``feed``'s samples, with the float model's baseline."""
    if kind not in METRICS:
        raise BadInputError(f"unknown metric {kind!r}.", f"Choose one of: {', '.join(METRICS)}.")
    samples = []
    for s in feed.samples(float_model):
        if max_samples is not None and len(samples) >= max_samples:
            break
        samples.append(s)
    cls = Perplexity if kind == "ppl" else OutputError
    return cls(float_model, samples, threads)
