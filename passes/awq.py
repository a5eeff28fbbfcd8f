"""``awq``: activation-aware weight quantization (Lin et al., 2024), the scale search.

Weight-only low-bit quantization loses most on the input channels that carry large activations.
AWQ protects them by scaling: for a group of linears ``MatMul(x, W_i[K, N_i])`` sharing one input
whose producer can absorb a per-channel factor (the same groups as SmoothQuant, found from the
graph by :func:`lbcc.passes.smoothing.find_smooth_groups`: a norm before q/k/v or gate/up,
SwiGLU's up -> down, and attention's v -> o, where one factor per value channel is shared by
every query head that reads it: ``s_X`` is then the largest over those heads),

    s = s_X^alpha / sqrt(max(s_X^alpha) * min(s_X^alpha)),   s_X[j] = mean_t |x_tj|,
    alpha* = argmin_{alpha in {0, 1/n, ..., (n-1)/n}}
             sum_i || X W_i - (X diag(s)^-1) Q(diag(s) W_i) ||^2,

with Q the layer's own weight quantizer (bits, group size, symmetry from the recipe, plain
round-to-nearest) and X the calibration rows of the group's input. ``alpha = 0`` is ``s = 1``,
so the chosen scales are never worse than no scaling on the calibration rows. The scales are
folded into the graph (``diag(s)^-1`` into the norm's gamma or the up-projection's columns,
``diag(s)`` into the weights' rows): exact in float, so the model computes the same function and
the statistics are recomputed for the passes after it. AWQ's second half, the weight-clipping
search (per group, the clip ratio minimizing the output error ``||X_g (w_g - Q(w_g))||^2``), is the
rounding passes' ``clip = "output"`` (:mod:`lbcc.numerics`). Run before weight rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from lbcc.irutils import layer_name
from lbcc.numerics import quantize_weight
from lbcc.passes.calibrate import ACTIVATION_STATS
from lbcc.passes.smoothing import apply_scales, find_smooth_groups
from lbcc.pipeline import Pass


def awq_scales(x_mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """``s = s_X^alpha`` normalized so that ``max(s) * min(s) = 1``."""
    s = np.maximum(x_mean_abs.astype(np.float64), 1e-4) ** alpha
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32)


def fake_quantize_rows(w: np.ndarray, spec: Any) -> np.ndarray:
    """Dequantized ``Q(w)`` of a MatMul weight ``w[K, N]`` with the layer's spec (no clip)."""
    if spec is None:
        return w
    bits, group, sym = spec
    return quantize_weight(w.T, bits=bits, block_size=group, symmetric=sym,
                           clip="none").dequantize().T


def group_output_error(x: np.ndarray, weights: list[np.ndarray], specs: list[Any],
                       s: np.ndarray, refs: list[np.ndarray]) -> float:
    """``sum_i ||X W_i - (X / s) Q(s W_i)||^2 / sum_i ||X W_i||^2``."""
    xs = x / s[None, :]
    num = den = 0.0
    for w, spec, ref in zip(weights, specs, refs):
        got = xs @ fake_quantize_rows(w * s[:, None], spec)
        num += float(((ref - got) ** 2).sum())
        den += float((ref**2).sum())
    return num / den if den else 0.0


class AWQ(Pass):
    """AWQ's per-channel scale search per group, folded into the graph (see module docstring)."""

    name = "awq"

    def __init__(self, recipe: Any, grid: int = 20, rows: int = 512):
        super().__init__()
        self._recipe = recipe
        self.grid = grid
        self.rows = rows

    def _spec(self, node: ir.Node) -> Any:
        """(bits, group_size, symmetric) of a consumer, or None if the recipe keeps it in float."""
        w, _, skip = self._recipe.spec_for(layer_name(node))
        return None if skip else (w.bits, w.group_size, w.symmetric)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        stats = self.context.analyses.get(ACTIVATION_STATS, model, self.context)
        groups, skipped = find_smooth_groups(model)
        rows_out, scaled = [], 0
        for g in groups:
            obs = stats.get(g.output.name)
            x = obs.rows if obs is not None else None
            if x is None:
                skipped.append((layer_name(g.prev), "no calibration rows for the group input"))
                continue
            specs = [self._spec(u) for u in g.consumers]
            if all(sp is None for sp in specs):
                skipped.append((layer_name(g.prev), "every consumer is kept in float"))
                continue
            x = x[: self.rows].astype(np.float32)
            weights = [u.inputs[1].const_value.numpy().astype(np.float32) for u in g.consumers]
            refs = [x @ w for w in weights]
            x_mean = g.to_fold(np.abs(x).mean(axis=0))
            errors = []
            for i in range(self.grid):
                alpha = i / self.grid
                s = awq_scales(x_mean, alpha)
                errors.append((group_output_error(x, weights, specs, g.expand(s), refs),
                               alpha, s))
            base = errors[0][0]
            err, alpha, s = min(errors, key=lambda e: e[0])
            row = {"from": layer_name(g.prev), "kind": g.kind,
                   "consumers": [layer_name(u) for u in g.consumers],
                   "error_before": round(base, 6), "error_after": round(err, 6), "alpha": alpha}
            if alpha > 0:
                apply_scales(g, s)
                scaled += 1
                row.update(s_min=float(s.min()), s_max=float(s.max()))
            rows_out.append(row)
        self.note("groups", rows_out)
        self.note("scaled", scaled)
        self.note("skipped", [{"from": n, "reason": r} for n, r in skipped])
        return ir.passes.PassResult(model, modified=scaled > 0)
