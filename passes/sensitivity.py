"""One-at-a-time output sensitivity, the measurement ``mixed-precision`` and the per-token
promotion share.

The model is saved with some initializers exposed as overridable inputs (or with switches
inserted), one ONNX Runtime session is opened, and for each candidate ``c`` the calibration
samples run with that candidate's override fed:

    D_c = mean over samples of divergence(output_float, output_c),

where the divergence is the mean over positions of ``KL(softmax(ref) || softmax(got))`` for a
model ending in logits (``[batch, seq, vocab]``), else the relative squared error
``||ref - got||^2 / ||ref||^2``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import onnx_ir as ir


def kl_divergence(ref_logits: np.ndarray, got_logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(got)) on the last axis."""
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(ref_logits), log_softmax(got_logits)
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


def output_divergence(ref: np.ndarray, got: np.ndarray) -> float:
    """KL for logits, the relative squared error for any other output (module docstring)."""
    if ref.ndim == 3 and ref.shape[-1] > 1:
        return kl_divergence(ref, got)
    return float(((ref - got) ** 2).sum() / max(float((ref ** 2).sum()), 1e-30))


def calibration_inputs(feed: Any, model: ir.Model, samples: int, tokens: int
                       ) -> list[dict[str, np.ndarray]]:
    """The first ``samples`` feeds of ``feed``, token inputs cut to ``tokens`` positions."""
    inputs = []
    for i, sample in enumerate(feed.samples(model)):
        if i >= samples:
            break
        inputs.append({k: v[..., :tokens] if v.ndim == 2 and v.dtype.kind == "i" else v
                       for k, v in sample.items()})
    return inputs


def measure_divergences(model: ir.Model, inputs: list[dict[str, np.ndarray]],
                        exposed: ContextManager[Any], keys: Sequence[Any],
                        override: Callable[[Any], dict[str, np.ndarray]], description: str,
                        progress: bool = False) -> list[float]:
    """``D_key`` for each key (module docstring). ``exposed``: entered while the model is saved,
    it makes the overrides' names inputs of the saved graph; ``override(key)``: the extra feed
    of that candidate's runs."""
    import onnxruntime as ort

    from lbcc.modelio import save_model
    from lbcc.progress import track

    with tempfile.TemporaryDirectory(prefix="lbcc-sensitivity-") as tmp:
        with exposed:
            path = save_model(model, Path(tmp) / "sensitivity.onnx", external_data=True)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out = sess.get_outputs()[0].name
        refs = [sess.run([out], x)[0] for x in inputs]
        result = []
        for key in track(list(keys), description=description, enabled=progress):
            extra = override(key)
            total = sum(output_divergence(ref, sess.run([out], {**x, **extra})[0])
                        for x, ref in zip(inputs, refs))
            result.append(total / len(inputs))
    return result
