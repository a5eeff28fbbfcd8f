"""``select-precision``: decide, per weight site, how it is quantized or why it is not.

For every site the recipe (after per-layer overrides) gives the weight spec and the activation
mode. For static activations the calibration statistics of the site's input give the range
[lo, hi] (by the recipe's method) and the estimated SQNR of the layer output when the input is
quantized per tensor (:func:`output_sqnr_db`); an input below ``min_sqnr_db`` is
outlier-dominated, and its layer gets the recipe's fallback (int8 per token or per block of input
channels computed at run time, or float activations), with the measured reason written to the
plan. The per-token fallback is itself checked on the calibration rows: a layer whose per-token
output SQNR is still below the threshold gets int8 per block (or float; with
``promote_max_ppl_increase``, those float layers are then measured one at a time at per-token int8
and promoted within the budget, :mod:`lbcc.passes.token_promotion`). The plan is stored on the node
(``lbcc.plan`` metadata) and in the report's per-layer table; later passes only execute it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx_ir as ir

from lbcc.errors import BadInputError
from lbcc.irutils import PLAN_KEY, layer_name
from lbcc.numerics import sqnr_db, token_sqnr_db
from lbcc.pipeline import Pass
from lbcc.recipes import Recipe
from lbcc.passes.calibrate import ACTIVATION_STATS
from lbcc.passes.sites import find_sites


def plan_of(node: ir.Node) -> dict[str, Any] | None:
    raw = node.metadata_props.get(PLAN_KEY)
    return json.loads(raw) if raw else None


def set_plan(node: ir.Node, plan: dict[str, Any]) -> None:
    node.metadata_props[PLAN_KEY] = json.dumps(plan, sort_keys=True)


def weight_plan(w: Any) -> dict[str, Any]:
    """The plan's weight entry for a recipe ``WeightSpec`` (``format`` only when not integer)."""
    plan = {"bits": w.bits, "group_size": w.group_size, "symmetric": w.symmetric, "clip": w.clip}
    if w.format != "int":
        plan["format"] = w.format
    return plan


def output_sqnr_db(obs: Any, lo: float, hi: float, site: Any) -> float:
    """Estimated SQNR of the layer *output* when its input is quantized per tensor on [lo, hi].

    With r_k = ||W_k||^2 the squared norm of the weights that input channel k feeds and N the
    per-element quantization noise of the range (from the histogram), treating channels as
    uncorrelated: signal = sum_k E[x_k^2] r_k, noise = N sum_k r_k. An outlier channel that the
    weights barely use does not make a layer look safe (the input SQNR would: its power is
    mostly the outlier's), and the noise it forces on every other channel is counted.
    """
    ms = obs.channel_mean_square()
    w = site.weight.const_value.numpy().astype(np.float64)
    r = (w * w).sum(axis=1) if site.kind == "matmul" else (w * w).sum(axis=0)
    if ms is None or ms.shape != r.shape:
        return obs.sqnr_db(lo, hi)
    return sqnr_db(float((ms * r).sum()), obs.quant_noise(lo, hi) * float(r.sum()))


def fake_quant_per_token(x: np.ndarray) -> np.ndarray:
    """Symmetric int8 per row (token): s_t = max_k |x_tk| / 127, x_tk -> s_t round(x_tk / s_t)."""
    s = np.abs(x).max(axis=-1, keepdims=True) / 127.0
    s = np.where(s > 0, s, 1.0)
    return np.rint(x / s) * s


def measured_output_sqnr_db(rows: np.ndarray, lo: float, hi: float, site: Any,
                            weight: dict[str, Any], per_token: bool = False) -> float:
    """Output SQNR of the layer run W8A8 on calibration ``rows``: the input fake-quantized to
    uint8 on [lo, hi] (or, ``per_token``, to int8 per row at run time), the weight to its planned
    integer grid (per channel, symmetric). Averaged over tokens (:func:`token_sqnr_db`), so a
    range that serves a few massive tokens and zeroes the rest does not pass."""
    w, wq = _weight_and_grid(site, weight)
    x = rows.astype(np.float32)
    xq = fake_quant_per_token(x) if per_token else _fake_quant_uint8(x, lo, hi)
    return token_sqnr_db(x @ w, xq @ wq)


def _weight_and_grid(site: Any, weight: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The site's float weight as ``[K, N]`` and the same dequantized from its planned integer
    grid (per output channel, symmetric)."""
    from lbcc.numerics import quantize_weight

    w = site.weight.const_value.numpy().astype(np.float32)
    w = w if site.kind == "matmul" else w.T
    wq = quantize_weight(w.T, bits=weight.get("value_bits", weight["bits"]), block_size=None,
                         symmetric=True).dequantize().T
    return w, wq


def _fake_quant_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    step = (hi - lo) / 255.0 or 1.0
    zp = np.clip(np.rint(-lo / step), 0, 255)
    return (np.clip(np.rint(x / step) + zp, 0, 255) - zp) * step


def output_error_range(rows: np.ndarray, lo: float, hi: float, site: Any,
                       weight: dict[str, Any]) -> tuple[float, float, float]:
    """The per-tensor uint8 input range [lo', hi'] that maximizes the layer's measured output
    SQNR on calibration ``rows`` (weights on their planned grid), and that SQNR in dB.

    ``lo' = a lo``, ``hi' = b hi`` with a, b in {1, 0.95, ..., 0.2}: first a = b (the range
    shrunk as a whole), then b alone, then a alone (coordinate search, 3 x 17 evaluations).
    Where the input-domain MSE range trades clipping for resolution equally over every channel,
    this weighs each channel's error by the weights it feeds: clipping a channel the weights
    barely read costs little, clipping one they amplify costs a lot. The kept rows are a strided
    subset of every calibration sample, so rare massive tokens are in them in proportion.
    """
    w, wq = _weight_and_grid(site, weight)
    x = rows.astype(np.float32)
    ref = x @ w

    def sqnr(a: float, b: float) -> float:
        return token_sqnr_db(ref, _fake_quant_uint8(x, a * lo, b * hi) @ wq)

    ratios = np.round(np.linspace(1.0, 0.2, 17), 4)
    best_a, best_b, best = 1.0, 1.0, sqnr(1.0, 1.0)
    for scan in ("both", "hi", "lo"):
        for r in ratios:
            a = r if scan in ("both", "lo") else best_a
            b = r if scan in ("both", "hi") else best_b
            if (a, b) == (best_a, best_b) or (a < 1.0 and lo == 0.0):
                continue
            got = sqnr(a, b)
            if got > best:
                best_a, best_b, best = a, b, got
    return best_a * lo, best_b * hi, best


class SelectPrecision(Pass):
    """Per-site plan: weight bits/granularity/symmetry and activation mode, or a skip reason."""

    name = "select-precision"
    preserves = frozenset({ACTIVATION_STATS})

    def __init__(self, recipe: Recipe, int8_weight_max_exact: int = 127):
        super().__init__()
        self.recipe = recipe
        #: the target's exact int8 weight range (``Capabilities.int8_weight_max_exact``)
        self.int8_weight_max_exact = int8_weight_max_exact

    def options(self) -> dict[str, Any]:
        return {"recipe": self.recipe.name, "int8_weight_max_exact": self.int8_weight_max_exact}

    def _value_bits(self, w: Any, weight: dict[str, Any], activation: str) -> int:
        """Bits of the integer grid a weight actually uses: 7 for saturation-safe int8 weights
        of uint8-activation layers on targets that are exact only on [-64, 63], else its bits."""
        if (activation in ("static", "dynamic", "dynamic-token") and w.saturation_safe
                and weight["bits"] == 8 and weight.get("format", "int") == "int"
                and weight["symmetric"] and self.int8_weight_max_exact < 127):
            return 7
        return weight["bits"]

    def _promote(self, model: ir.Model, pending: list, counts: dict[str, int],
                 tied_spec: dict[str, dict[str, Any]]) -> None:
        """Float-fallback layers -> per-token int8 where their measured KL fits the recipe's
        ``promote_max_ppl_increase`` (:mod:`lbcc.passes.token_promotion`); the others stay float
        (a tied lm_head then releases its embedding)."""
        from lbcc.passes.token_promotion import choose_promotions, measure_promotion_kl

        budget = self.recipe.activations.promote_max_ppl_increase
        feed = self.context.calibration
        if feed is None:
            raise self.fail("activations.promote_max_ppl_increase measures each float-fallback "
                            "layer's effect on calibration data, and none was given.",
                            "Pass --calib FILE.txt --tokenizer T.")
        kls = measure_promotion_kl(model, [p[0] for p in pending], feed,
                                   progress=self.context.progress)
        sizes = [int(np.prod(p[0].weight.const_value.shape)) for p in pending]
        chosen = choose_promotions(kls, sizes, budget)
        rows = []
        for (site, entry, plan, w), kl, take in zip(pending, kls, chosen):
            rows.append({"layer": site.layer, "kl": kl, "promoted": take})
            if not take:
                entry["reason"] += (f"; its per-token KL {kl:.2e} nats did not fit the "
                                    f"promotion budget (perplexity +{100 * budget:g} %)")
                counts["float"] = counts.get("float", 0) + 1
                tied_spec.pop(site.weight.name, None)
                continue
            plan = {**plan, "activation": "dynamic-token",
                    "reason": plan["reason"].replace("kept at float", "promoted to per-token int8")
                    + f" by its measured KL {kl:.2e} nats (budget: perplexity +{100 * budget:g} "
                      "% over all promotions)", "promotion_kl": kl}
            value_bits = self._value_bits(w, plan["weight"], "dynamic-token")
            if value_bits != plan["weight"]["bits"]:
                plan["weight"] = {**plan["weight"], "value_bits": value_bits}
            set_plan(site.node, plan)
            for key in ("reason", "measured"):
                entry.pop(key, None)
            entry.update(status="quantized", plan=plan)
            counts["dynamic-token"] = counts.get("dynamic-token", 0) + 1
        self.note("promotions", {"budget_max_ppl_increase": budget,
                                 "estimated_ppl_increase": float(np.expm1(sum(
                                     k for k, c in zip(kls, chosen) if c))),
                                 "layers": rows})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites, skipped = find_sites(model)
        if not sites:
            raise BadInputError("the model has nothing to quantize: no MatMul, Gemm or Gather "
                                "uses a 2-D float weight.", "Check that the model was exported "
                                "with its weights as initializers (not as graph inputs).")
        stats = None
        acts = self.recipe.activations
        uses_static = any(self.recipe.spec_for(s.layer)[1] == "static" for s in sites)
        if uses_static or self.context.calibration is not None:
            stats = self.context.analyses.get(ACTIVATION_STATS, model, self.context)
        layers = self.context.notes.setdefault("layers", {})
        counts: dict[str, int] = {}
        for node, reason in skipped:
            layers[node.name] = {"node": node.name, "op": node.op_type, "layer": layer_name(node),
                                 "status": "float", "reason": reason}
        tied_spec: dict[str, dict[str, Any]] = {}
        for site in sites:
            if site.kind != "gather":
                w, act, skip = self.recipe.spec_for(site.layer)
                if skip is None:
                    tied_spec[site.weight.name] = weight_plan(w)
        for site in sites:  # the report lists layers in graph order
            layers[site.node.name] = {}
        # tied embeddings last: a lm_head that stays float releases its table (the embedding then
        # takes its own spec)
        pending: list[tuple[Any, dict[str, Any], dict[str, Any], Any]] = []
        for site in sorted(sites, key=lambda s: s.kind == "gather"):
            if site.kind == "gather" and pending:
                self._promote(model, pending, counts, tied_spec)
                pending = []
            w, act, skip = self.recipe.spec_for(site.layer)
            entry: dict[str, Any] = {"node": site.node.name, "op": site.node.op_type,
                                     "layer": site.layer, "kind": site.kind,
                                     "weight_name": site.weight.name,
                                     "weight_shape": list(site.weight.const_value.shape)}
            if site.kind == "gather" and not self.recipe.quantize_embedding:
                skip = "recipe sets quantize_embedding = false"
            if skip:
                entry.update(status="float", reason=skip)
                layers[site.node.name] = entry
                counts["skipped"] = counts.get("skipped", 0) + 1
                continue
            weight = weight_plan(w)
            if site.kind == "gather":
                weight = tied_spec.get(site.weight.name, weight)
                act = "none"
                if site.weight.name in tied_spec:
                    entry["shared_with_matmul"] = True
            plan: dict[str, Any] = {"weight": weight, "activation": act}
            if act == "static":
                x = site.activation
                obs = stats.get(x.name) if (stats and x is not None) else None
                if obs is None or obs.count == 0:
                    plan["activation"] = "none"
                    plan["reason"] = "no calibration statistics for this input"
                else:
                    static_weight = {**weight,
                                     "value_bits": self._value_bits(w, weight, "static")}
                    if acts.method == "output":
                        if obs.rows is None:
                            raise BadInputError(
                                f"activations.method = 'output' needs calibration rows for "
                                f"{site.layer}, and none were kept.",
                                "Compile through lbcc.compile (it keeps them), or use mse.")
                        lo, hi, sqnr = output_error_range(obs.rows, *obs.choose_range("minmax"),
                                                          site, static_weight)
                        plan["sqnr_criterion"] = "measured"
                    else:
                        lo, hi = obs.choose_range(acts.method, acts.percentile)
                        if acts.criterion == "measured" and obs.rows is not None:
                            sqnr = measured_output_sqnr_db(obs.rows, lo, hi, site, static_weight)
                            plan["sqnr_criterion"] = "measured"
                        else:
                            sqnr = output_sqnr_db(obs, lo, hi, site)
                    plan["range"] = [lo, hi]
                    plan["sqnr_db"] = round(sqnr, 2)
                    plan["input_sqnr_db"] = round(obs.sqnr_db(lo, hi), 2)
                    plan["outliers"] = obs.outlier_summary()
                    if sqnr < acts.min_sqnr_db:
                        fallback, why_not_token = acts.fallback, ""
                        if fallback == "dynamic-token" and obs.rows is not None:
                            tok = measured_output_sqnr_db(
                                obs.rows, lo, hi, site,
                                {**weight,
                                 "value_bits": self._value_bits(w, weight, "dynamic-token")},
                                per_token=True)
                            plan["token_sqnr_db"] = round(tok, 2)
                            token_min = (acts.min_sqnr_db if acts.min_token_sqnr_db is None
                                         else acts.min_token_sqnr_db)
                            if tok < token_min:
                                fallback = acts.token_fallback
                                why_not_token = (f"; per-token int8 measured {tok:.1f} dB < "
                                                 f"{token_min} dB")
                        plan["activation"] = fallback
                        plan["reason"] = (
                            f"input is outlier-dominated: {plan.get('sqnr_criterion', 'estimated')} "
                            f"output SQNR with per-tensor "
                            f"uint8 input {sqnr:.1f} dB < {acts.min_sqnr_db} dB (input abs-max "
                            f"{plan['outliers'].get('absmax', 0):.1f} = "
                            f"{plan['outliers'].get('max_over_median', 0):.0f}x the median "
                            f"channel){why_not_token}; kept at {fallback}")
                        if fallback == "float":
                            entry.update(status="float", reason=plan["reason"],
                                         measured={k: plan[k] for k in (
                                             "sqnr_db", "token_sqnr_db", "range", "outliers")
                                             if k in plan})
                            layers[site.node.name] = entry
                            if acts.promote_max_ppl_increase is not None \
                                    and "token_sqnr_db" in plan:
                                # decided below, by its measured effect on the output
                                pending.append((site, entry, plan, w))
                                continue
                            counts["float"] = counts.get("float", 0) + 1
                            tied_spec.pop(site.weight.name, None)
                            continue
                        if fallback == "dynamic-block":
                            plan["weight"] = {**weight, "group_size": acts.fallback_group_size,
                                              "bits": 8}
            value_bits = self._value_bits(w, plan["weight"], plan["activation"])
            if value_bits != plan["weight"]["bits"]:
                plan["weight"] = {**plan["weight"], "value_bits": value_bits}
            set_plan(site.node, plan)
            entry.update(status="quantized", plan=plan)
            layers[site.node.name] = entry
            counts[plan["activation"]] = counts.get(plan["activation"], 0) + 1
        if pending:
            self._promote(model, pending, counts, tied_spec)
        self.note("sites", len(sites))
        self.note("not_sites", len(skipped))
        self.note("activation_modes", counts)
        return ir.passes.PassResult(model, modified=True)

