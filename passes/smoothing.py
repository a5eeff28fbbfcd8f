"""``smooth-quant``: SmoothQuant (Xiao et al., 2023) migration of activation outliers into weights.

For a normalization whose output feeds only MatMuls with constant weights (a norm before q/k/v or
before gate/up, found from the graph, not from layer names), with per-input-channel factors s:

    x' = x · diag(s)^-1 (folded into the norm's scale: gamma' = gamma / s),
    W' = diag(s) · W   (every consumer's weight rows scaled),
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),

so x' W' = x W exactly in float. alpha is searched per group on [0, 1] (step 0.05) by the measured
error of the quantized group on calibration rows: per-tensor uint8 activations (min/max of the
smoothed rows) and per-channel symmetric int8 weights,
``sum_i ||X W_i - Q(X / s) Q(s W_i)||^2 / sum_i ||X W_i||^2``; a group is left alone when no
alpha beats not smoothing. Groups whose weights or norm scale are shared with another consumer
(a tied lm_head / embedding) are skipped with that reason. The model changes, so the activation
statistics are recomputed for the passes after it. Run before weight rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from lbcc.irutils import layer_name
from lbcc.pipeline import Pass
from lbcc.passes.calibrate import ACTIVATION_STATS

NORM_SCALE_INPUT = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2,
                    "LayerNormalization": 1, "SkipLayerNormalization": 2,
                    "RMSNormalization": 1}


@dataclasses.dataclass
class SmoothGroup:
    norm: ir.Node
    scale: ir.Value  # the norm's gamma initializer
    output: ir.Value  # the normalized tensor all consumers read
    consumers: list[ir.Node]  # MatMul(output, W[K, N])


def find_smooth_groups(model: ir.Model) -> tuple[list[SmoothGroup], list[tuple[str, str]]]:
    """Norm -> {MatMul with constant weight} groups, and (layer, reason) for norms skipped."""
    groups, skipped = [], []
    for node in model.graph:
        idx = NORM_SCALE_INPUT.get(node.op_type)
        if idx is None or len(node.inputs) <= idx or node.inputs[idx] is None:
            continue
        scale, out = node.inputs[idx], node.outputs[0]
        name = layer_name(node)
        users = [u.node for u in out.uses()]
        if scale.const_value is None or len(scale.const_value.shape) != 1:
            skipped.append((name, "the norm's scale is not a constant vector"))
        elif len(scale.uses()) != 1:
            skipped.append((name, "the norm's scale is shared with another node"))
        elif not users or any(u.op_type != "MatMul" or u.inputs[0] is not out
                              or u.inputs[1] is None or u.inputs[1].const_value is None
                              or len(u.inputs[1].const_value.shape) != 2 for u in users):
            skipped.append((name, "the norm output feeds something other than MatMuls with "
                                  "constant 2-D weights (e.g. a tied lm_head)"))
        elif any(len(u.inputs[1].uses()) != 1 for u in users):
            skipped.append((name, "a consumer's weight is shared with another node"))
        else:
            groups.append(SmoothGroup(node, scale, out, users))
    return groups, skipped


def _fake_quant_rows(x: np.ndarray) -> np.ndarray:
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = (hi - lo) / 255.0 or 1.0
    zp = np.rint(-lo / step)
    return (np.clip(np.rint(x / step) + zp, 0, 255) - zp) * step


def _fake_quant_columns(w: np.ndarray) -> np.ndarray:
    """Per-output-channel symmetric int8 of ``w[K, N]`` (round to nearest), dequantized."""
    sc = np.abs(w).max(axis=0, keepdims=True) / 127.0
    sc[sc == 0] = 1.0
    return np.clip(np.rint(w / sc), -128, 127) * sc


def group_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray,
                refs: list[np.ndarray] | None = None) -> float:
    """Relative output error of the group quantized W8A8 after smoothing with ``s``."""
    xq = _fake_quant_rows(x / s)
    refs = refs if refs is not None else [x @ w for w in weights]
    num = den = 0.0
    for w, ref in zip(weights, refs):
        wq = _fake_quant_columns(w * s[:, None])
        num += float(((ref - xq @ wq) ** 2).sum())
        den += float((ref**2).sum())
    return num / den if den else 0.0


class SmoothQuant(Pass):
    """SmoothQuant with a per-group alpha search on measured quantized-group error."""

    name = "smooth-quant"

    def __init__(self, alpha: float | None = None, step: float = 0.05, rows: int = 512):
        super().__init__()
        self.alpha = alpha
        self.step = step
        self.rows = rows

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        stats = self.context.analyses.get(ACTIVATION_STATS, model, self.context)
        groups, skipped = find_smooth_groups(model)
        alphas = [self.alpha] if self.alpha is not None else \
            list(np.round(np.arange(0.0, 1.0 + 1e-9, self.step), 4))
        rows_out, smoothed = [], 0
        for g in groups:
            obs = stats.get(g.output.name)
            x = obs.rows if obs is not None else None
            if obs is None or x is None or obs.channel_absmax is None:
                skipped.append((layer_name(g.norm), "no calibration rows for the norm output"))
                continue
            weights = [u.inputs[1].const_value.numpy().astype(np.float32) for u in g.consumers]
            x = x[: self.rows].astype(np.float32)
            refs = [x @ w for w in weights]
            xmax = np.maximum(obs.channel_absmax.astype(np.float64), 1e-5)
            wmax = np.maximum(np.max([np.abs(w).max(axis=1) for w in weights], axis=0), 1e-5)
            base = group_error(x, weights, np.ones(len(xmax), np.float32), refs)
            best = (base, None, None)
            for a in alphas:
                s = np.clip(xmax**a / wmax ** (1.0 - a), 1e-5, 1e5).astype(np.float32)
                err = group_error(x, weights, s, refs)
                if err < best[0]:
                    best = (err, a, s)
            err, a, s = best
            row = {"norm": layer_name(g.norm), "consumers": [layer_name(u) for u in g.consumers],
                   "error_before": round(base, 6), "error_after": round(err, 6),
                   "alpha": a}
            if s is not None:
                self._apply(model.graph, g, s)
                smoothed += 1
                row["s_max"] = float(s.max())
                row["s_min"] = float(s.min())
            else:
                row["reason"] = "no alpha beats leaving the group unsmoothed"
            rows_out.append(row)
        self.note("groups", rows_out)
        self.note("smoothed", smoothed)
        self.note("skipped", [{"norm": n, "reason": r} for n, r in skipped])
        return ir.passes.PassResult(model, modified=smoothed > 0)

    @staticmethod
    def _apply(graph: ir.Graph, g: SmoothGroup, s: np.ndarray) -> None:
        s = s.astype(np.float64)
        gamma = g.scale.const_value.numpy().astype(np.float64)
        g.scale.const_value = ir.tensor((gamma / s).astype(np.float32), name=g.scale.name)
        for u in g.consumers:
            wv = u.inputs[1]
            w = wv.const_value.numpy().astype(np.float64)
            wv.const_value = ir.tensor((w * s[:, None]).astype(np.float32), name=wv.name)
