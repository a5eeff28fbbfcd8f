"""``detect-outliers``: an analysis of every weight-site input, with a verdict per layer.

Per input: per-channel abs-max, its max / median ratio, kurtosis, the channels above 6
(LLM.int8()'s threshold) and above 20x the median channel. The verdict uses the estimated SQNR of
the layer *output* when the input is quantized per tensor to uint8
(:func:`lbcc.passes.precision.output_sqnr_db`), and the same estimate after a SmoothQuant
migration with alpha = 0.5 (s_j = sqrt(max|X_j| / max|W_j|); the range shrinks to
max_j max|X_j| / s_j and the noise reaching the output is weighted by ||W_j||^2 s_j^2):

- "fine for per-tensor int8": output SQNR >= the threshold;
- "smoothable": below it, but at or above it after smoothing;
- "keep in higher precision / dynamic": below it either way.
Nothing in the graph changes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from lbcc.numerics import sqnr_db
from lbcc.pipeline import Pass
from lbcc.passes.calibrate import ACTIVATION_STATS
from lbcc.passes.precision import output_sqnr_db
from lbcc.passes.sites import find_sites

FINE, SMOOTHABLE, KEEP = ("fine for per-tensor int8", "smoothable",
                          "keep in higher precision / dynamic")


def smoothed_output_sqnr_db(obs: Any, site: Any, alpha: float = 0.5) -> float:
    """Estimated output SQNR after SmoothQuant with ``alpha`` (symmetric uint8 range approx.)."""
    ms, xmax = obs.channel_mean_square(), obs.channel_absmax
    w = site.weight.const_value.numpy().astype(np.float64)
    wk = w if site.kind == "matmul" else w.T  # [K, N]
    if ms is None or xmax is None or ms.shape[0] != wk.shape[0]:
        return float("nan")
    r = (wk * wk).sum(axis=1)
    wmax = np.maximum(np.abs(wk).max(axis=1), 1e-8)
    s = np.clip(np.maximum(xmax, 1e-8) ** alpha / wmax ** (1 - alpha), 1e-5, 1e5)
    rng = float((xmax / s).max())
    noise = (2 * rng / 255.0) ** 2 / 12.0
    return sqnr_db(float((ms * r).sum()), noise * float((r * s * s).sum()))


def outlier_rows(model: ir.Model, stats: dict[str, Any], min_sqnr_db: float = 22.0,
                 method: str = "mse") -> list[dict[str, Any]]:
    sites, _ = find_sites(model)
    rows = []
    for site in sites:
        x = site.activation
        obs = stats.get(x.name) if x is not None else None
        if obs is None or obs.channel_absmax is None:
            continue
        lo, hi = obs.choose_range(method)
        out_sqnr = output_sqnr_db(obs, lo, hi, site)
        smooth_sqnr = smoothed_output_sqnr_db(obs, site)
        cmax = obs.channel_absmax
        med = float(np.median(cmax)) or 1e-12
        verdict = FINE if out_sqnr >= min_sqnr_db else (
            SMOOTHABLE if smooth_sqnr >= min_sqnr_db else KEEP)
        rows.append({
            "layer": site.layer, "input": x.name, "channels": int(cmax.size),
            "absmax": float(cmax.max()), "max_over_median": float(cmax.max() / med),
            "kurtosis": round(obs.kurtosis, 2),
            "channels_over_6": int((cmax > 6.0).sum()),
            "channels_over_20x_median": int((cmax > 20 * med).sum()),
            "top_channels": [int(i) for i in np.argsort(-cmax)[:5]],
            "output_sqnr_db": round(out_sqnr, 2), "smoothed_sqnr_db": round(smooth_sqnr, 2),
            "verdict": verdict})
    return rows


class DetectOutliers(Pass):
    """Outlier statistics and a verdict per weight-site input (an analysis; no graph change)."""

    name = "detect-outliers"
    preserves = frozenset({ACTIVATION_STATS})

    def __init__(self, min_sqnr_db: float = 22.0):
        super().__init__()
        self.min_sqnr_db = min_sqnr_db

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        stats = self.context.analyses.get(ACTIVATION_STATS, model, self.context)
        rows = outlier_rows(model, stats, self.min_sqnr_db)
        self.context.notes["outliers"] = rows
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
        self.note("verdicts", counts)
        return ir.passes.PassResult(model, modified=False)
