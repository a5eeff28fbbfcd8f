"""Targets: what a backend can run, as data, and the registry that finds them by name.

A target declares :class:`Capabilities`; :func:`check_recipe` compares a recipe with them before any
pass runs (a failure is a :class:`TargetError`, exit code 2). A target adds its own lowering passes
to the pipeline and writes the result. ``lbcc`` never imports ``lbcc.targets`` except through here.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lbcc.errors import BadInputError, TargetError

if TYPE_CHECKING:
    import onnx_ir as ir

    from lbcc.pipeline import Pass
    from lbcc.recipes import Recipe


@dataclasses.dataclass(frozen=True)
class Capabilities:
    weight_bits: frozenset[int]
    #: group sizes per weight bit width; None in the set means per-channel is allowed
    weight_granularity: dict[int, frozenset[int | None]]
    activation_modes: dict[int, frozenset[str]]  # weight bits -> activation modes allowed with it
    activation_dtype: str
    quantizable_ops: frozenset[str]
    #: activation modes that need per-channel weights ("channel") or grouped weights ("group")
    weight_layout_for_mode: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the largest |int8 weight| the target multiplies with uint8 activations exactly on every
    #: CPU it supports. Below 127, ``weights.saturation_safe`` recipes round int8 weights of
    #: uint8-activation layers to [-(m+1), m] (x86 u8 x s8 kernels without VNNI saturate pairs
    #: of products at 2^15: 255 * 64 * 2 = 32640 is safe, 255 * 127 * 2 is not).
    int8_weight_max_exact: int = 127
    #: element types the target can keep a KV cache in (``--kv-cache-dtype``)
    kv_cache_dtypes: frozenset[str] = frozenset({"float"})
    #: activation modes the target runs with FP8 E4M3 weights (``weights.format = "e4m3"``);
    #: empty: no FP8 weights
    fp8_activation_modes: frozenset[str] = frozenset()


class Target(Protocol):
    name: str
    capabilities: Capabilities

    def passes(self, recipe: "Recipe") -> list["Pass"]: ...

    def emit(self, model: "ir.Model", path: Path, **options: Any) -> list[Path]: ...


_REGISTRY = {"ort-int8": "lbcc.targets.ort_int8:OrtInt8Target"}
_REGISTRY["c"] = "lbcc.targets.c:CTarget"
_REGISTRY["triton"] = "lbcc.targets.triton:TritonTarget"


def available_targets() -> list[str]:
    return sorted(_REGISTRY)


def get_target(name: str) -> Target:
    if name not in _REGISTRY:
        raise BadInputError(f"unknown target {name!r}.",
                            f"Available targets: {', '.join(available_targets())}.")
    module, _, cls = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def check_recipe(recipe: "Recipe", target: Target, layer_names: list[str] | None = None) -> None:
    """Raise TargetError if the recipe (or any per-layer override) asks what the target can't run."""
    caps = target.capabilities
    specs = [("recipe", recipe.weights, recipe.activations.mode)]
    for rule in recipe.layers:
        if rule.skip:
            continue
        specs.append((f"[[layers]] match={rule.match!r}",
                      *rule.apply(recipe.weights, recipe.activations.mode)))
    for where, w, act in specs:
        if w.format == "e4m3":
            if act not in caps.fp8_activation_modes:
                hint = (f"With FP8 weights it runs activation modes: "
                        f"{', '.join(sorted(caps.fp8_activation_modes))}."
                        if caps.fp8_activation_modes else
                        "Use --target triton (FP8 tensor cores) or ort-int8 (an accuracy "
                        "reference in float), or an integer preset such as w8a8.")
                raise TargetError(f"{where}: target {target.name!r} cannot run FP8 (e4m3) "
                                  f"weights with activation mode {act!r}.", hint)
            continue
        if w.bits not in caps.weight_bits:
            raise TargetError(f"{where}: target {target.name!r} cannot run {w.bits}-bit weights.",
                              f"Supported weight widths: {sorted(caps.weight_bits)}.")
        allowed = caps.weight_granularity[w.bits]
        if w.group_size not in allowed:
            shown = ["per-channel" if g is None else str(g) for g in
                     sorted(allowed, key=lambda g: -1 if g is None else g)]
            gran = "per-channel" if w.group_size is None else f"group size {w.group_size}"
            raise TargetError(f"{where}: target {target.name!r} cannot run {w.bits}-bit weights "
                              f"with {gran}.", f"Use one of: {', '.join(shown)}.")
        need = caps.weight_layout_for_mode.get(act)
        if need == "channel" and w.group_size is not None:
            raise TargetError(f"{where}: target {target.name!r} runs activation mode {act!r} only "
                              f"with per-channel weights, not groups of {w.group_size}.",
                              "Set weights.group_size = \"channel\", or use activation mode "
                              "dynamic-block with grouped weights.")
        if need == "group" and w.group_size is None:
            raise TargetError(f"{where}: activation mode {act!r} quantizes per block of the "
                              "weight groups, and the weights are per-channel.",
                              "Set weights.group_size (e.g. 32).")
        fallback = recipe.activations.fallback
        if act == "static" and fallback == "dynamic-token" and \
                fallback not in caps.activation_modes.get(8, frozenset()):
            raise TargetError(f"{where}: target {target.name!r} has no per-token dynamic "
                              "activations for the static fallback (activations.fallback = "
                              "\"dynamic-token\").",
                              "Use activations.fallback = \"dynamic-block\", \"float\" or "
                              "\"none\".")
        if act not in caps.activation_modes[w.bits]:
            raise TargetError(f"{where}: target {target.name!r} cannot run {w.bits}-bit weights "
                              f"with activation mode {act!r}.",
                              f"With {w.bits}-bit weights it runs: "
                              f"{', '.join(sorted(caps.activation_modes[w.bits]))}.")

