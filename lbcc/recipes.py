"""Recipes: what to quantize and how. A preset is a named recipe; recipes are TOML files.

```toml
base = "w4a16"                 # optional: start from a preset
[weights]                      # bits 4|8, group_size 16..256 or "channel", symmetric, clip none|mse
bits = 4
group_size = 128
# format = "e4m3"              # FP8 weights (8 bits, per channel) instead of integer codes
[activations]                  # mode static|dynamic|none; method mse|minmax|percentile|output
mode = "none"
[calibration]                  # samples and window length used when calibrating on text
samples = 16
seq_len = 512
[[layers]]                     # per-layer overrides, matched on layer names (fnmatch patterns)
match = "model.layers.*.mlp.down_proj"
bits = 8
[[layers]]
match = "lm_head"
skip = true
```
Unknown keys are errors, never ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import tomllib
from pathlib import Path
from typing import Any

from lbcc.errors import BadInputError


@dataclasses.dataclass
class WeightSpec:
    bits: int = 8
    group_size: int | None = None  # None: one scale per output channel
    symmetric: bool = True
    #: "none": plain round-to-nearest; "mse": per-group clip-ratio search minimizing the error
    #: weighted by E[x_k^2] of the layer input; "output": the clip ratio minimizing the layer's
    #: output error on the calibration inputs (AWQ's clip search, needs X^T X); "auto": "mse" when
    #: calibration statistics exist, else "none" (a data-free MSE clip was measured to hurt 4-bit
    #: perplexity on SmolLM2)
    clip: str = "auto"
    #: rounding algorithm: "rtn" (round-to-nearest with the clip above) or "gptq"
    method: str = "rtn"
    #: GPTQ only: each block's X^T X measured on the model with the earlier blocks already
    #: rounded (the paper's sequential procedure; one calibration pass per block) instead of all
    #: from the float model in one pass
    sequential: bool = False
    #: int8 weights of layers with per-tensor uint8 activations (static / dynamic) are computed
    #: exactly on every CPU. ONNX Runtime's x86 u8 x s8 kernels without VNNI (AVX2, AVX-512
    #: without VNNI) add pairs of products in 16 bits with saturation (vpmaddubsw); measured on
    #: SmolLM2 on an AVX2 CPU, full-range int8 weights collapse to perplexity 65,753. ``ort-int8``
    #: stores these weights as uint8 with zero point 128, which ORT runs with its u8 x u8 kernels
    #: (operands widened to 16 bits: exact, and measured faster than u8 x s8 on AVX2); targets
    #: without such a route (``Capabilities.int8_weight_max_exact`` < 127) round them to
    #: [-64, 63] instead (255 * 64 * 2 = 32640 < 2^15). false: int8 storage of the full range,
    #: for CPUs with VNNI or ARM only.
    saturation_safe: bool = True
    #: "int": integer codes (bits 4 or 8); "e4m3": FP8 E4M3 values, 8 bits, symmetric, one scale
    #: per output channel (s_n = max |w_n| / 448), with activations either FP8 E4M3 per token at
    #: run time (mode dynamic-token) or float (none)
    format: str = "int"


@dataclasses.dataclass
class ActivationSpec:
    #: static: uint8 per tensor from calibrated ranges; dynamic: uint8 per tensor at run time;
    #: dynamic-block: int8 per block of ``weights.group_size`` input channels at run time;
    #: dynamic-token: int8 per token (row) at run time, symmetric, s_t = max_k |x_tk| / 127;
    #: none: float activations (weight-only)
    mode: str = "static"
    #: range selection for static: mse (input quantization noise, from the histogram) |
    #: minmax | percentile | output (the range that maximizes the layer's measured output SQNR
    #: on the kept calibration rows)
    method: str = "mse"
    percentile: float = 99.99
    #: layers whose estimated output SQNR with a per-tensor uint8 input is below this stay out of
    #: static int8 (22 dB measured on SmolLM2: 31 of 211 fall back, ppl 1.056x float; 25 dB: 53
    #: fall back, 1.049x; the input-SQNR criterion at 25 dB: 33 fall back, 1.060x)
    min_sqnr_db: float = 22.0
    #: how the output SQNR of a per-tensor input is obtained: "estimate" (from the channel
    #: statistics, treating channels as uncorrelated) or "measured" (the layer run quantized on
    #: the kept calibration rows: -10 log10 mean_t ||(XW - Q(X)Q(W))_t||^2 / ||(XW)_t||^2, every
    #: token counted once)
    criterion: str = "estimate"
    #: what an outlier-dominated input gets instead: dynamic-block (int8 per block of 32 input
    #: channels, computed at run time), dynamic-token (int8 per token at run time, per-channel
    #: weights; a layer whose measured per-token SQNR is still below ``min_token_sqnr_db`` gets
    #: ``token_fallback``), none (weight-only) or float (the layer stays unquantized)
    fallback: str = "dynamic-block"
    fallback_group_size: int = 32
    #: the per-token tier's own threshold (dynamic-token fallback): a layer whose measured
    #: per-token output SQNR is at least this runs per token, else per block (None: min_sqnr_db).
    #: Lower trades accuracy for speed: per block is the slowest int8 form on x86
    min_token_sqnr_db: float | None = None
    #: what a layer gets whose per-token SQNR is below ``min_token_sqnr_db`` (dynamic-token
    #: fallback): dynamic-block (int8 per block of ``fallback_group_size``) or float (left
    #: unquantized, with the measured reason in the report). On x86 CPUs without VNNI, ONNX
    #: Runtime's per-block int8 (MatMulNBits, 8 bits) is slower than the float MatMul: there float
    #: is both faster and exact, at the size of float weights for those layers
    token_fallback: str = "dynamic-block"
    #: with ``token_fallback = "float"``: the layers left in float are measured (each alone at
    #: per-token int8: KL of the model's output distribution on calibration tokens) and promoted
    #: to per-token int8, least KL per weight first, while exp(sum of their KLs) - 1 stays within
    #: this perplexity increase (0.005 = +0.5 %). None: no promotion
    promote_max_ppl_increase: float | None = None


@dataclasses.dataclass
class CalibrationSpec:
    samples: int = 16
    seq_len: int = 512
    method_note: str = ""


@dataclasses.dataclass
class SmoothingSpec:
    #: "none", "smoothquant" (W8A8: per-group alpha search unless ``alpha`` is set) or "awq"
    #: (weight-only: AWQ's activation-aware scale search per group)
    method: str = "none"
    alpha: float | None = None
    step: float = 0.05
    #: SmoothQuant: smooth a tied lm_head (final norm -> lm_head) on its own copy of the
    #: embedding table; the model stores one more vocab x hidden int8 matrix
    untie_lm_head: bool = True


@dataclasses.dataclass
class MixedPrecisionSpec:
    """Per-layer 4 / 8 bits / float from measured sensitivity (the ``mixed-precision`` pass);
    give one budget: ``avg_bits`` (stored bits per weight, scales included) or
    ``max_ppl_increase`` (0.05 = 5 %, estimated from the summed KL)."""

    avg_bits: float | None = None
    max_ppl_increase: float | None = None
    samples: int = 1  # calibration samples the sensitivity is measured on
    tokens: int = 512  # tokens of each

    @property
    def enabled(self) -> bool:
        return self.avg_bits is not None or self.max_ppl_increase is not None


@dataclasses.dataclass
class LayerOverride:
    match: str
    bits: int | None = None
    group_size: int | None | str = "inherit"
    symmetric: bool | None = None
    clip: str | None = None
    activations: str | None = None
    skip: bool = False
    #: why the layer is skipped, for the report (default: the rule that matched)
    reason: str | None = None

    def matches(self, layer: str) -> bool:
        return fnmatch.fnmatchcase(layer, self.match)

    def apply(self, w: WeightSpec, act: str) -> tuple[WeightSpec, str]:
        """This rule's settings on top of (w, act); ``w`` is copied, not changed."""
        w = copy.copy(w)
        if self.bits is not None:
            w.bits = self.bits
        if self.group_size != "inherit":
            w.group_size = self.group_size  # type: ignore[assignment]
        if self.symmetric is not None:
            w.symmetric = self.symmetric
        if self.clip is not None:
            w.clip = self.clip
        return w, self.activations if self.activations is not None else act


@dataclasses.dataclass
class Recipe:
    name: str
    weights: WeightSpec = dataclasses.field(default_factory=WeightSpec)
    activations: ActivationSpec = dataclasses.field(default_factory=ActivationSpec)
    calibration: CalibrationSpec = dataclasses.field(default_factory=CalibrationSpec)
    smoothing: SmoothingSpec = dataclasses.field(default_factory=SmoothingSpec)
    mixed_precision: MixedPrecisionSpec = dataclasses.field(default_factory=MixedPrecisionSpec)
    layers: list[LayerOverride] = dataclasses.field(default_factory=list)
    quantize_embedding: bool = True

    @property
    def needs_calibration(self) -> bool:
        return bool(self.calibration_uses)

    @property
    def calibration_uses(self) -> list[str]:
        """What this recipe computes from calibration data (empty: it needs none)."""
        uses = [("static activation ranges", self.activations.mode == "static"),
                ("GPTQ's Hessians", self.weights.method == "gptq"),
                ({"smoothquant": "SmoothQuant's", "awq": "AWQ's"}.get(
                    self.smoothing.method, self.smoothing.method) + " scales",
                 self.smoothing.method != "none"),
                ("the output-error clip search", self.weights.clip == "output"),
                ("measured layer sensitivities", self.mixed_precision.enabled)]
        return [what for what, used in uses if used]

    def spec_for(self, layer: str) -> tuple[WeightSpec, str, str | None]:
        """(weight spec, activation mode, skip reason) for one layer after overrides."""
        w, act = copy.copy(self.weights), self.activations.mode
        for o in self.layers:
            if not o.matches(layer):
                continue
            if o.skip:
                return w, act, o.reason or f"skipped by recipe rule match={o.match!r}"
            w, act = o.apply(w, act)
        return w, act, None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ACTIVATION_MODES = ("static", "dynamic", "dynamic-block", "dynamic-token", "none")

#: layer-name patterns of MLP down-projections across common model families (HF Llama/Mistral/
#: Qwen/SmolLM, llama.c-style w2, OPT/Phi fc2, GPT-NeoX/Bloom, GPT-2)
DOWN_PROJECTIONS = ("*.mlp.down_proj", "*.feed_forward.w2", "*.fc2", "*.mlp.dense_4h_to_h",
                    "*.mlp.c_proj")

PRESETS: dict[str, Recipe] = {
    "w8a8": Recipe(
        name="w8a8",
        weights=WeightSpec(bits=8, group_size=None, symmetric=True, clip="auto"),
        activations=ActivationSpec(mode="static", method="mse"),
    ),
    # int8 activations quantized per tensor at run time (DynamicQuantizeMatMul), except the MLP
    # down-projections, whose inputs (the SwiGLU / GELU product) carry the massive activation
    # outliers of LLMs: those get int8 per block of 32 input channels at run time, so an outlier
    # only coarsens its own block. Measured on SmolLM2-135M: per-tensor everywhere 1.64x float
    # perplexity, this preset 1.07x; per-block everywhere 1.005x but 0.80x float latency at
    # seq 128 against 0.50x for this preset.
    "w8a8-dynamic": Recipe(
        name="w8a8-dynamic",
        weights=WeightSpec(bits=8, group_size=None, symmetric=True, clip="auto"),
        activations=ActivationSpec(mode="dynamic"),
        layers=[LayerOverride(match=p, group_size=32, activations="dynamic-block")
                for p in DOWN_PROJECTIONS],
    ),
    # FP8 (E4M3) weights per channel and FP8 activations per token at run time: the FP8 format of
    # Hopper-class GPUs' tensor cores (the triton target runs it on them); no calibration. On
    # ort-int8 the same numerics run in float (ONNX Runtime's CPU provider has no FP8 products):
    # an accuracy reference, not a fast model.
    "w8a8-fp8": Recipe(
        name="w8a8-fp8",
        weights=WeightSpec(bits=8, group_size=None, symmetric=True, clip="none", format="e4m3"),
        activations=ActivationSpec(mode="dynamic-token"),
        quantize_embedding=False,
    ),
    "w4a16": Recipe(
        name="w4a16",
        weights=WeightSpec(bits=4, group_size=128, symmetric=False, clip="auto"),
        activations=ActivationSpec(mode="none"),
        # the tied embedding / lm_head: the largest matrix of a small LLM and the most sensitive
        # one; 8-bit groups of 64 (64 divides common hidden sizes, so MatMulNBits and
        # GatherBlockQuantized can share its bytes)
        layers=[LayerOverride(match="lm_head", bits=8, group_size=64)],
    ),
}
# the 4-bit preset for decoding on CPU: every weight, the tied embedding / lm_head included (one
# 4-bit table for GatherBlockQuantized and the lm_head's MatMulNBits), in symmetric groups of 32,
# onnxruntime-genai's int4 layout: MatMulNBits without zero points (on AVX2, ONNX Runtime's int8
# kernels spent about 10 % more time a decode step with them, measured on SmolLM2) and groups that
# divide common hidden sizes (576, 1536: 128 pads every row of K = 576 by 11 %). Measured on
# SmolLM2-135M (WikiText-2, 4096 tokens): perplexity 38.26 (genai int4 41.81; w4a16 38.56; the
# same at groups of 64: 41.57), size 0.159x float.
PRESETS["w4a16-e4"] = Recipe(
    name="w4a16-e4",
    weights=WeightSpec(bits=4, group_size=32, symmetric=True, clip="auto"),
    activations=ActivationSpec(mode="none"),
)
PRESETS["w8a8-sq"] = copy.deepcopy(PRESETS["w8a8"])
PRESETS["w8a8-sq"].name = "w8a8-sq"
PRESETS["w8a8-sq"].smoothing.method = "smoothquant"
# FP8 with GPTQ rounding on the E4M3 grid (same storage and kernels as w8a8-fp8). Measured on
# SmolLM2-135M (ort-int8 reference graph, 8,192 WikiText-2 test tokens): 36.83 against
# w8a8-fp8's 38.26 (float 36.00; weight-only E4M3 RTN 37.54)
PRESETS["w8a8-fp8-gptq"] = copy.deepcopy(PRESETS["w8a8-fp8"])
PRESETS["w8a8-fp8-gptq"].name = "w8a8-fp8-gptq"
PRESETS["w8a8-fp8-gptq"].weights.method = "gptq"
PRESETS["w4a16-gptq"] = copy.deepcopy(PRESETS["w4a16"])
PRESETS["w4a16-gptq"].name = "w4a16-gptq"
PRESETS["w4a16-gptq"].weights.method = "gptq"
# the decode preset with GPTQ rounding: the same layout, kernels and size as w4a16-e4 (so the
# same decode speed), the tied embedding / lm_head table rounded by GPTQ for the lm_head's
# inputs. Measured on SmolLM2-135M's KV-cache graph (WikiText-2, 4,096 tokens in 512-token
# windows): 36.04 against w4a16-e4's 38.21 and onnxruntime-genai int4's 41.81 (RTN in groups
# of 64: 42.38, GPTQ in groups of 64: 38.35, of 128: 40.12)
PRESETS["w4a16-e4-gptq"] = copy.deepcopy(PRESETS["w4a16-e4"])
PRESETS["w4a16-e4-gptq"].name = "w4a16-e4-gptq"
PRESETS["w4a16-e4-gptq"].weights.method = "gptq"
# the same in groups of 64: a tenth fewer bytes a decode step (a float32 scale every 64 weights
# instead of every 32). Measured on SmolLM2-135M's KV graph on an AMD EPYC with AVX512-VNNI (2
# threads, decode steps in paired blocks, five runs): 1.06-1.13x onnxruntime-genai int4's decode
# speed (w4a16-e4: 0.98-1.07x in the same runs), 1.13-1.23x with the int8 KV cache; perplexity
# 38.24 (genai int4 41.76), size 0.143x float. On an AVX2 CPU, where ONNX Runtime's int8
# MatMulNBits kernel is bound by arithmetic, GPTQ in groups of 64 measured 0.998x genai int4
# (BENCHMARKS-generate.md)
PRESETS["w4a16-e4-gptq-g64"] = copy.deepcopy(PRESETS["w4a16-e4-gptq"])
PRESETS["w4a16-e4-gptq-g64"].name = "w4a16-e4-gptq-g64"
PRESETS["w4a16-e4-gptq-g64"].weights.group_size = 64
# outlier-aware W8A8: SmoothQuant (norm -> q/k/v, norm -> gate/up, v -> o and the final norm ->
# a tied lm_head on its own copy, alpha searched per group), GPTQ rounding of the int8 weights,
# then per layer: static uint8 on the range that maximizes its output SQNR measured on
# calibration rows (token-averaged) when that is at least 32 dB, else int8 per token at run time
# when that measures >= 31 dB, else int8 per block at run time (the outlier report's "keep
# higher" layers). Measured on SmolLM2-135M: 29.76 vs float 29.45 (1.010x) on 32,768 test tokens
# at 0.97x float seq-128 latency (the previous auto: 1.024x at 0.88x); BENCHMARKS.md has the steps.
PRESETS["auto"] = copy.deepcopy(PRESETS["w8a8-sq"])
PRESETS["auto"].name = "auto"
PRESETS["auto"].weights.method = "gptq"
PRESETS["auto"].activations.criterion = "measured"
PRESETS["auto"].activations.method = "output"
PRESETS["auto"].activations.min_sqnr_db = 32.0
PRESETS["auto"].activations.fallback = "dynamic-token"
PRESETS["auto"].activations.min_token_sqnr_db = 31.0
# auto for x86 CPUs without VNNI (AVX2, AVX-512 without VNNI): the layers that fail both static
# and per-token int8 stay float instead of per-block int8, which ONNX Runtime runs slower than
# the float MatMul there (on VNNI CPUs per block is faster than float: use auto-vnni). Measured
# on SmolLM2-135M, AVX2 without VNNI, 8,192 test tokens: 36.32 vs auto 36.29 (float 36.00), seq-128
# latency 0.82x float vs auto 1.01x, 312 MB vs 148 MB (float 538 MB); on 32,768 tokens 29.74 vs
# float 29.45 (1.010x) at 0.88x (auto: 29.76 at 1.01x). Then the float layers are promoted to
# per-token int8 by their measured KL within +1 % estimated perplexity (20 of 24 down-projections
# and the lm_head on SmolLM2): 29.96 (1.017x) at 0.72x float seq-128 latency (attention fused),
# 149 MB instead of 315 MB.
PRESETS["auto-avx2"] = copy.deepcopy(PRESETS["auto"])
PRESETS["auto-avx2"].name = "auto-avx2"
PRESETS["auto-avx2"].activations.promote_max_ppl_increase = 0.01
PRESETS["auto-avx2"].activations.token_fallback = "float"
# auto for x86 CPUs with VNNI (AVX512-VNNI / AVX-VNNI / AMX: Intel Cascade Lake and newer, AMD
# Zen 4 and newer): the same model, int8 weights stored as int8, so ONNX Runtime runs its u8 x s8
# kernels (vpdpbusd / AMX, exact) instead of u8 x u8. Measured on an Intel Xeon with AMX and
# AVX512-VNNI, 2 threads, SmolLM2's MLP shapes at M = 128 (benchmarks/int8_gemm_cpu.py):
# u8 x s8 0.23-0.33x float, u8 x u8 0.76-0.80x. Wrong on CPUs without VNNI, where u8 x s8
# saturates (auto-avx2 there).
PRESETS["auto-vnni"] = copy.deepcopy(PRESETS["auto"])
PRESETS["auto-vnni"].name = "auto-vnni"
PRESETS["auto-vnni"].weights.saturation_safe = False
# bits placed by measured sensitivity: 4 / 8 / float per weight at 5 stored bits per weight
PRESETS["w4a16-mixed"] = copy.deepcopy(PRESETS["w4a16"])
PRESETS["w4a16-mixed"].name = "w4a16-mixed"
PRESETS["w4a16-mixed"].mixed_precision.avg_bits = 5.0
PRESETS["w4a16-awq"] = copy.deepcopy(PRESETS["w4a16"])
PRESETS["w4a16-awq"].name = "w4a16-awq"
PRESETS["w4a16-awq"].smoothing.method = "awq"
PRESETS["w4a16-awq"].weights.clip = "output"

PRESET_HELP = {
    "w8a8": "static: uint8 activations per tensor (calibrated), int8 weights per channel, as QDQ",
    "w8a8-dynamic": "int8 weights per channel, activations per tensor at run time (MLP "
                    "down-projections: per block of 32); no calibration",
    "w8a8-fp8": "FP8 E4M3: weights per channel, activations per token at run time (GPUs with FP8 "
                "tensor cores via --target triton; on ort-int8 an accuracy reference in float)",
    "w8a8-fp8-gptq": "w8a8-fp8 with GPTQ rounding on the E4M3 grid (needs calibration data)",
    "w4a16": "4-bit weights in groups of 128 as MatMulNBits (accuracy_level 4); float activations",
    "w4a16-e4": "4-bit symmetric groups of 32 everywhere, the tied embedding / lm_head included "
                "(no zero points): the preset for decoding on CPU",
    "w4a16-gptq": "w4a16 with GPTQ rounding (needs calibration data)",
    "w4a16-e4-gptq": "w4a16-e4 with GPTQ rounding: same layout and speed, lower perplexity "
                     "(needs calibration data)",
    "w4a16-e4-gptq-g64": "w4a16-e4-gptq in groups of 64: a tenth fewer bytes a decode step, "
                         "the fastest CPU decode preset measured on x86 with VNNI (needs "
                         "calibration data)",
    "w8a8-sq": "w8a8 after SmoothQuant (alpha searched per norm -> linear group)",
    "auto": "outlier-aware w8a8: SmoothQuant and GPTQ, then static int8 where the measured "
            "layer SQNR >= 32 dB, else int8 per token (or, below 32 dB per token too, per block) "
            "at run time (needs calibration data)",
    "auto-avx2": "auto for x86 CPUs without VNNI: layers that fail both the static and the "
                 "per-token check stay float (not per block), then those whose measured KL is "
                 "cheapest are promoted to per-token int8 within +1 % estimated perplexity "
                 "(needs calibration data)",
    "auto-vnni": "auto for x86 CPUs with VNNI or AMX: int8 weights stored as int8, run by ONNX "
                 "Runtime's u8 x s8 kernels (saturate without VNNI: use auto-avx2 there) "
                 "(needs calibration data)",
    "w4a16-mixed": "4 / 8 bits / float per weight from measured KL sensitivity, 5 bits per "
                   "weight on average (needs calibration data)",
    "w4a16-awq": "w4a16 after AWQ: activation-aware scales folded into the graph, output-error "
                 "clip search (needs calibration data)",
}


def preset(name: str, group_size: int | None = None) -> Recipe:
    if name not in PRESETS:
        raise BadInputError(f"unknown preset {name!r}.",
                            f"Choose one of: {', '.join(PRESETS)}, or pass --recipe FILE.toml.")
    recipe = copy.deepcopy(PRESETS[name])
    if group_size is not None:
        if recipe.weights.bits != 4:
            raise BadInputError(f"--group-size applies to 4-bit presets, not {name!r}.",
                                "Drop --group-size, or use --preset w4a16.")
        recipe.weights.group_size = group_size
    return recipe


_SECTIONS = {"weights": WeightSpec, "activations": ActivationSpec, "calibration": CalibrationSpec,
             "smoothing": SmoothingSpec, "mixed_precision": MixedPrecisionSpec}
_TOP_KEYS = {"base", "name", "weights", "activations", "calibration", "smoothing", "layers",
             "quantize_embedding", "mixed_precision"}


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _unknown(keys: set[str], allowed: set[str], where: str, path: str) -> None:
    extra = sorted(keys - allowed)
    if extra:
        import difflib

        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, allowed, 1))
                 else repr(k) for k in extra]
        raise BadInputError(f"recipe {path}: unknown key(s) {', '.join(hints)} in {where}.",
                            f"Allowed keys there: {', '.join(sorted(allowed))}.")


def recipe_from_dict(data: dict[str, Any], path: str = "<dict>",
                     default_base: str | None = None) -> Recipe:
    """A recipe from parsed TOML; ``base`` (or ``default_base``) names the preset it starts from."""
    _unknown(set(data), _TOP_KEYS, "the top level", path)
    base = data.get("base", default_base)
    recipe = preset(base) if base else Recipe(name="custom")
    recipe.name = str(data.get("name", Path(path).stem if path != "<dict>" else recipe.name))
    for section, cls in _SECTIONS.items():
        if section in data:
            table = data[section]
            if not isinstance(table, dict):
                raise BadInputError(f"recipe {path}: [{section}] must be a table.",
                                    f"Write it as [{section}] with key = value lines.")
            _unknown(set(table), _fields(cls), f"[{section}]", path)
            target = getattr(recipe, section)
            for k, v in table.items():
                if section == "weights" and k == "group_size" and v == "channel":
                    v = None
                setattr(target, k, v)
    if "quantize_embedding" in data:
        recipe.quantize_embedding = bool(data["quantize_embedding"])
    for i, rule in enumerate(data.get("layers", [])):
        _unknown(set(rule), _fields(LayerOverride), f"[[layers]] #{i + 1}", path)
        if "match" not in rule:
            raise BadInputError(f"recipe {path}: [[layers]] #{i + 1} has no 'match' pattern.",
                                "Add match = \"model.layers.*.mlp.down_proj\" (fnmatch syntax).")
        rule = dict(rule)
        if rule.get("group_size") == "channel":
            rule["group_size"] = None
        recipe.layers.append(LayerOverride(**rule))
    validate(recipe, path)
    return recipe


def load_recipe(path: str | Path, default_base: str | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"recipe file {str(path)!r} does not exist.", "Check the path.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"recipe {path} is not valid TOML: {exc}.",
                            "Fix the syntax (see the README's recipe example).") from None
    return recipe_from_dict(data, str(path), default_base)


def _check_format(w: WeightSpec, act: str, where: str) -> None:
    """FP8 weights: 8 bits, symmetric, per channel, with FP8-per-token or float activations."""
    from lbcc.numerics import WEIGHT_FORMATS

    if w.format not in WEIGHT_FORMATS:
        raise BadInputError(f"{where}: weights.format must be one of {', '.join(WEIGHT_FORMATS)}, "
                            f"not {w.format!r}.", "")
    if w.format != "e4m3":
        return
    if w.bits != 8 or not w.symmetric or w.group_size is not None:
        raise BadInputError(f"{where}: format = \"e4m3\" is 8-bit, symmetric and per channel, "
                            f"not {w.bits}-bit{'' if w.symmetric else ' asymmetric'}"
                            f"{'' if w.group_size is None else f' in groups of {w.group_size}'}.",
                            "Set bits = 8, symmetric = true, group_size = \"channel\" (or use "
                            "--preset w8a8-fp8).")
    if act not in ("dynamic-token", "none"):
        raise BadInputError(f"{where}: e4m3 weights run with activations FP8 per token "
                            f"(dynamic-token) or float (none), not {act!r}.",
                            "Set activations.mode = \"dynamic-token\".")


def validate(recipe: Recipe, where: str = "recipe") -> None:
    """Value checks independent of any target (a target checks what it can run separately)."""
    w, a = recipe.weights, recipe.activations
    if recipe.smoothing.method not in ("none", "smoothquant", "awq"):
        raise BadInputError(f"{where}: smoothing.method must be none, smoothquant or awq, not "
                            f"{recipe.smoothing.method!r}.", "")
    if w.method not in ("rtn", "gptq"):
        raise BadInputError(f"{where}: weights.method must be rtn or gptq, not {w.method!r}.", "")
    for rule_where, spec, act in [("weights", w, a.mode)] + [
            (f"[[layers]] match={r.match!r}", *r.apply(w, a.mode)) for r in recipe.layers
            if not r.skip]:
        _check_format(spec, act, f"{where}: {rule_where}")
    if w.format == "e4m3" and (recipe.smoothing.method != "none"
                               or recipe.mixed_precision.enabled):
        raise BadInputError(f"{where}: SmoothQuant, AWQ and mixed precision score integer grids "
                            "and are not implemented for e4m3 weights.",
                            "Use smoothing.method = \"none\" and no [mixed_precision] with "
                            "format = \"e4m3\" (weights.method = \"gptq\" works).")
    if w.format == "e4m3" and recipe.quantize_embedding:
        raise BadInputError(f"{where}: e4m3 recipes keep the embedding table in float (its "
                            "lookup has no FP8 form in the targets).",
                            "Set quantize_embedding = false (as --preset w8a8-fp8 does).")
    if w.clip not in ("none", "mse", "output", "auto"):
        raise BadInputError(f"{where}: weights.clip must be none, mse, output or auto, not "
                            f"{w.clip!r}.",
                            "")
    if a.mode not in ACTIVATION_MODES:
        raise BadInputError(f"{where}: activations.mode must be one of "
                            f"{', '.join(ACTIVATION_MODES)}, not {a.mode!r}.", "")
    if a.method not in ("mse", "minmax", "percentile", "output"):
        raise BadInputError(f"{where}: activations.method must be mse, minmax, percentile or "
                            f"output, not "
                            f"{a.method!r}.", "")
    if a.criterion not in ("estimate", "measured"):
        raise BadInputError(f"{where}: activations.criterion must be estimate or measured, not "
                            f"{a.criterion!r}.", "")
    if a.fallback not in ("dynamic-block", "dynamic-token", "none", "float"):
        raise BadInputError(f"{where}: activations.fallback must be dynamic-block, dynamic-token, "
                            f"none or float, not {a.fallback!r}.", "")
    if a.token_fallback not in ("dynamic-block", "float"):
        raise BadInputError(f"{where}: activations.token_fallback must be dynamic-block or float, "
                            f"not {a.token_fallback!r}.", "")
    if a.promote_max_ppl_increase is not None and (
            not isinstance(a.promote_max_ppl_increase, (int, float))
            or not 0 <= a.promote_max_ppl_increase <= 1):
        raise BadInputError(f"{where}: activations.promote_max_ppl_increase must be a fraction "
                            f"in [0, 1], not {a.promote_max_ppl_increase!r}.",
                            "Write e.g. promote_max_ppl_increase = 0.005 (+0.5 % perplexity).")
    if a.min_token_sqnr_db is not None and not isinstance(a.min_token_sqnr_db, (int, float)):
        raise BadInputError(f"{where}: activations.min_token_sqnr_db must be a number (dB), not "
                            f"{a.min_token_sqnr_db!r}.", "Write e.g. min_token_sqnr_db = 30.0.")
    mp = recipe.mixed_precision
    if mp.avg_bits is not None and mp.max_ppl_increase is not None:
        raise BadInputError(f"{where}: [mixed_precision] takes one budget, avg_bits or "
                            "max_ppl_increase, not both.", "Remove one of them.")
    if mp.avg_bits is not None and not 4.0 <= float(mp.avg_bits) <= 32.0:
        raise BadInputError(f"{where}: mixed_precision.avg_bits must be between 4 and 32, not "
                            f"{mp.avg_bits!r}.", "E.g. avg_bits = 5.0 (bits per weight, scales "
                            "included).")
    if mp.max_ppl_increase is not None and not float(mp.max_ppl_increase) > 0:
        raise BadInputError(f"{where}: mixed_precision.max_ppl_increase must be > 0, not "
                            f"{mp.max_ppl_increase!r}.", "E.g. max_ppl_increase = 0.05 (5 %).")
    if mp.enabled and w.bits != 4:
        raise BadInputError(f"{where}: mixed precision chooses among 4 / 8 bits / float and "
                            f"starts from 4-bit weights, not {w.bits}-bit.",
                            "Use base = \"w4a16\" (or weights.bits = 4).")
    if recipe.calibration.samples < 1 or recipe.calibration.seq_len < 2:
        raise BadInputError(f"{where}: calibration needs samples >= 1 and seq_len >= 2.", "")
