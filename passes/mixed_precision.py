"""``mixed-precision``: per-weight bit widths (4 / 8 / float) from measured sensitivity, on a budget.

Sensitivity of weight i is measured, not guessed: the model runs in ONNX Runtime on calibration
samples with weight i alone replaced by its quantized-dequantized copy (the layer's own spec at
4 bits), and

    S_i(4) = mean over tokens of KL(p_float || p_i),  p = softmax(logits)

(the relative squared error of the outputs for a model that does not end in logits). One session
serves every measurement: the candidate weights are made overridable graph inputs. At 8 bits the
quantization step is 2^4 = 16 times finer, so the noise power and, to first order, the KL shrink by
16^2: S_i(8) = S_i(4) / 256 (estimated; measuring it is below the noise of the 4-bit figures).
Float costs nothing in accuracy.

Assignment, with b_i(c) the stored bits per weight of choice c (scales and zero points included)
and n_i the weight's parameter count, treating sensitivities as additive: every weight starts at
4 bits; upgrades (4 -> 8, 8 -> float) are taken greedily in order of accuracy gained per stored
bit, dS / (n_i db), while the budget allows:

- ``avg_bits``: sum_i n_i b_i / sum_i n_i <= avg_bits;
- ``max_ppl_increase`` x: until sum_i S_i <= log(1 + x) (KL approximates the increase of the
  mean negative log-likelihood, so exp(sum S) - 1 estimates the perplexity increase).

The choices become per-layer rules of the recipe that ``select-precision`` executes, and the
report lists every weight's sensitivity, choice and reason. Run after calibration (and after
smoothing, whose scales change what rounding does), before ``select-precision``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir

from lbcc.irutils import extra_graph_io, layer_name
from lbcc.numerics import quantize_weight
from lbcc.passes.sites import Site, find_sites
from lbcc.pipeline import Pass
from lbcc.recipes import LayerOverride, Recipe

FLOAT_BITS = 32.0


def stored_bits(bits: int, group_size: int | None, k: int, symmetric: bool) -> float:
    """Bits per weight of an integer layout: the integers plus a float32 scale (and a zero point
    of the same width when asymmetric) per group of ``group_size`` (per row when None)."""
    g = k if group_size is None else group_size
    return bits + (32.0 + (0 if symmetric else bits)) / g


def _escape(name: str) -> str:
    """An fnmatch pattern matching exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


class MixedPrecision(Pass):
    """Measured per-weight sensitivity -> bits per weight under a budget (see module docstring)."""

    name = "mixed-precision"

    def __init__(self, recipe: Recipe, avg_bits: float | None = None,
                 max_ppl_increase: float | None = None, samples: int = 1,
                 tokens: int = 512):
        super().__init__()
        if (avg_bits is None) == (max_ppl_increase is None):
            raise ValueError("give exactly one of avg_bits and max_ppl_increase")
        self._recipe = recipe
        self.avg_bits = avg_bits
        self.max_ppl_increase = max_ppl_increase
        self.samples = samples
        self.tokens = tokens

    # ------------------------------------------------------------------ measurement

    def _candidates(self, model: ir.Model) -> dict[str, dict[str, Any]]:
        """Weight name -> its sites, layers, out-major array and 4-bit spec (recipe-skipped and
        8-bit-only weights are left alone)."""
        sites, _ = find_sites(model)
        by_weight: dict[str, list[Site]] = {}
        for s in sites:
            by_weight.setdefault(s.weight.name, []).append(s)
        out = {}
        for name, group in by_weight.items():
            specs = [self._recipe.spec_for(s.layer) for s in group]
            if any(skip for _, _, skip in specs):
                continue
            primary = next((s for s in group if s.kind != "gather"), group[0])
            spec = self._recipe.spec_for(primary.layer)[0]
            w = group[0].weight.const_value.numpy().astype(np.float32)
            out_major = w.T if primary.kind == "matmul" else w
            out[name] = {"sites": group, "layers": sorted({s.layer for s in group}),
                         "value": group[0].weight, "w": w, "out_major": out_major,
                         "transposed": primary.kind == "matmul", "spec": spec,
                         "params": int(w.size)}
        return out

    def _quantized(self, cand: dict[str, Any], bits: int) -> np.ndarray:
        spec = cand["spec"]
        group = spec.group_size
        q = quantize_weight(cand["out_major"], bits=bits, block_size=group,
                            symmetric=spec.symmetric, clip="none").dequantize()
        return np.ascontiguousarray(q.T if cand["transposed"] else q, np.float32)

    def _measure(self, model: ir.Model, cands: dict[str, dict[str, Any]]) -> dict[str, float]:
        from lbcc.passes.sensitivity import calibration_inputs, measure_divergences

        feed = self.context.calibration
        if feed is None:
            raise self.fail("mixed precision measures each layer's sensitivity on calibration "
                            "data, and none was given.", "Pass --calib FILE.txt --tokenizer T.")
        names = list(cands)
        # the candidates' initializers as graph inputs, so each run can override them
        sens = measure_divergences(
            model, calibration_inputs(feed, model, self.samples, self.tokens),
            extra_graph_io(model.graph.inputs, [c["value"] for c in cands.values()]), names,
            lambda name: {name: self._quantized(cands[name], 4)}, "layer sensitivity",
            self.context.progress)
        return dict(zip(names, sens))

    # ------------------------------------------------------------------ assignment

    def assign(self, cands: dict[str, dict[str, Any]], sens4: dict[str, float]
               ) -> dict[str, str]:
        """Greedy upgrades by accuracy per stored bit until the budget binds; name -> choice."""
        def bits_of(name: str, choice: str) -> float:
            c = cands[name]
            if choice == "float":
                return FLOAT_BITS
            k = c["out_major"].shape[1]
            return stored_bits(int(choice), c["spec"].group_size, k, c["spec"].symmetric)

        def sens(name: str, choice: str) -> float:
            return {"4": sens4[name], "8": sens4[name] / 256.0, "float": 0.0}[choice]

        choice = {n: "4" for n in cands}
        params = {n: cands[n]["params"] for n in cands}
        total_params = sum(params.values()) or 1
        used = sum(params[n] * bits_of(n, "4") for n in cands)
        total_sens = sum(sens4.values())
        target_sens = math.log1p(self.max_ppl_increase) if self.max_ppl_increase is not None \
            else None
        nxt = {"4": "8", "8": "float"}
        while True:
            if target_sens is not None and total_sens <= target_sens:
                break
            best = None
            for n, c in choice.items():
                if c not in nxt:
                    continue
                extra = params[n] * (bits_of(n, nxt[c]) - bits_of(n, c))
                if self.avg_bits is not None and (used + extra) / total_params > self.avg_bits:
                    continue
                gain = sens(n, c) - sens(n, nxt[c])
                if gain <= 0:
                    continue
                score = gain / max(extra, 1e-9)
                if best is None or score > best[0]:
                    best = (score, n, extra, gain)
            if best is None:
                break
            _, n, extra, gain = best
            choice[n] = nxt[choice[n]]
            used += extra
            total_sens -= gain
        self._used_bits = used / total_params
        self._estimated_kl = total_sens
        return choice

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cands = self._candidates(model)
        if not cands:
            self.note("weights", [])
            return ir.passes.PassResult(model, modified=False)
        sens4 = self._measure(model, cands)
        choice = self.assign(cands, sens4)
        rows = []
        for name, c in sorted(cands.items(), key=lambda kv: -sens4[kv[0]]):
            pick = choice[name]
            for layer in c["layers"]:
                if pick == "float":
                    self._recipe.layers.append(LayerOverride(
                        match=_escape(layer), skip=True,
                        reason=f"kept in float by mixed-precision (4-bit KL {sens4[name]:.3g})"))
                else:
                    self._recipe.layers.append(LayerOverride(match=_escape(layer),
                                                             bits=int(pick)))
            rows.append({"weight": name, "layers": c["layers"], "params": c["params"],
                         "sensitivity_4bit": sens4[name], "choice": pick})
        self.note("weights", rows)
        self.note("avg_bits", round(self._used_bits, 4))
        self.note("estimated_kl", self._estimated_kl)
        self.note("estimated_ppl_increase", math.expm1(self._estimated_kl))
        self.note("budget", {"avg_bits": self.avg_bits,
                             "max_ppl_increase": self.max_ppl_increase})
        if self.avg_bits is not None:
            met = self._used_bits <= self.avg_bits + 1e-9
        else:
            met = self._estimated_kl <= math.log1p(self.max_ppl_increase) + 1e-12
        self.note("budget_met", met)
        self.note("counts", {k: sum(1 for v in choice.values() if v == k)
                             for k in ("4", "8", "float")})
        return ir.passes.PassResult(model, modified=False)

