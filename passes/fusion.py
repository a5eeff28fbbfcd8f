"""``fuse-ort``: ONNX Runtime fusions from onnxscript's rewriter, with a count per fusion.

RMSNorm -> ``SimplifiedLayerNormalization``, residual Add + RMSNorm ->
``SkipSimplifiedLayerNormalization``, rotary -> ``RotaryEmbedding`` (with its cos/sin cache),
Attention fusions (GQA / MHA) need the KV-cache
graph and are not applied to the cache-free scoring graph: an SDPA that no MHA/GQA consumes is
not an op ONNX Runtime can run. On a KV-cache graph (:mod:`lbcc.kvcache`) the fusions of
:mod:`lbcc.passes.kv_fusions` run too (rotary with cos/sin caches from position ids, attention).
A fusion that matched nothing reports why, from onnxscript's matching tracer (``why_not``).
Runs on the float graph
right after capture: onnxscript's pre-fusion optimizer folds constants, which must never see a
DequantizeLinear of a weight. Fused nodes take the layer name of the node they replaced.
"""

from __future__ import annotations

from typing import Callable

import onnx_ir as ir

from lbcc.irutils import LAYER_KEY, layer_name, op_histogram
from lbcc.pipeline import Pass


#: the KV-cache graph's attention fusions (the rotary first: the GQA fusion takes RotaryEmbedding)
KV_ATTENTION_FUSIONS = ("rotary_from_position_ids", "softcap_sdpa", "sdpa", "identity_reshapes",
                        "guard_attention", "gqa", "restore_attention", "share_attention_lengths",
                        "sdpa_via_mha")

FUSED_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
             "MultiHeadAttention", "GroupQueryAttention", "Attention"}


#: steps with nothing to explain when they do nothing: not fusions, or forms most models do not
#: have (Gemma 2's soft-capped attention, Phi-3's reshape of the attention to its own shape),
#: whose blocks the SDPA / GQA fusions' explanations cover when those do not match
_SILENT = ("guard_attention", "restore_attention", "softcap_sdpa", "identity_reshapes")


def _fusions(kv_cache: bool = False) -> list[tuple[str, Callable[..., int], dict]]:
    from onnxscript.rewriter.ort_fusions import (  # noqa: I001 - lazy: onnxscript is slow to import
        cos_sin_cache,
        rms_normalization,
        rotary_embedding,
        skip_normalization,
    )

    from lbcc.passes.kv_fusions import kv_cache_fusions

    return [
        ("rms_normalization", rms_normalization.fuse_rms_normalization, {}),
        ("skip_rms_normalization", skip_normalization.fuse_skip_rms_normalization, {}),
        ("rotary_embedding", rotary_embedding.fuse_rotary_embedding, {}),
        ("cos_sin_cache", cos_sin_cache.fuse_cos_sin_cache, {}),
    ] + (kv_cache_fusions() if kv_cache else [])


def _why_not(fuse: Callable[..., int], model: ir.Model, kwargs: dict) -> str:
    """The matching tracer's best partial match, one line: the rule and where it failed."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fuse(model, debug=True, **kwargs)  # matched nothing before, so it changes nothing
    lines = [ln.strip() for ln in buf.getvalue().splitlines() if ln.strip()]
    rule = next((ln for ln in lines if ln.startswith("Rule:")), "")
    reason = next((ln for ln in lines if any(w in ln.lower() for w in
                                            ("failed", "mismatch", "fail:", "not "))), "")
    return " ".join(x for x in (rule, reason) if x)[:300] or "no partial match"


class FuseORT(Pass):
    """onnxscript ORT fusions; ``only`` restricts them by name (e.g. ``["rms_normalization"]``).

    ``pack_qkv=False`` leaves a GroupQueryAttention's Q, K and V projections separate: a compile
    that quantizes plans each projection as its own layer (as in the cache-free graph, where they
    are separate) and the ``ort-int8`` target packs them afterwards where the plans agree
    (:class:`lbcc.targets.ort_int8.packing.PackQKV`). ``kv_attention=False`` leaves a KV-cache
    graph's attention as exported (:class:`FuseKVAttention` fuses it later)."""

    name = "fuse-ort"

    def __init__(self, only: list[str] | None = None, explain: bool = True,
                 pack_qkv: bool = True, kv_attention: bool = True):
        super().__init__()
        self.only = only
        self.explain = explain
        self.pack_qkv = pack_qkv
        self.kv_attention = kv_attention

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from lbcc.kvcache import kv_layout

        counts: dict[str, int] = {}
        why_not: dict[str, str] = {}
        fusions = _fusions(kv_cache=kv_layout(model) is not None)
        for name, fuse, kwargs in fusions:
            if (self.only is not None and name not in self.only) or (
                    name == "pack_qkv" and not self.pack_qkv) or (
                    name in KV_ATTENTION_FUSIONS and not self.kv_attention):
                continue
            counts[name] = int(fuse(model, **kwargs) or 0)
            if counts[name] == 0 and self.explain and name not in _SILENT and not (
                    name == "sdpa" and counts.get("softcap_sdpa")):  # Gemma 2: capped blocks
                why_not[name] = _why_not(fuse, model, kwargs)
        # inline fusion helper functions that no other fusion consumed, drop dead nodes
        if model.functions:
            ir.passes.common.InlinePass()(model)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        ir.passes.common.RemoveUnusedFunctionsPass()(model)
        self._name_fused_nodes(model)
        # a match can be undone when a helper function is inlined back (rotary without a
        # cos/sin cache fusion): report what is in the graph at the end, too
        self.note("matched", counts)
        if why_not:
            self.note("why_not", why_not)
        guard = next((f for _, f, _ in fusions if hasattr(f, "reasons")), None)
        if guard is not None and guard.reasons:  # blocks left alone on purpose, and why
            self.note("attention_kept_unfused", guard.reasons)
        if guard is not None and guard.windows:
            self.note("sliding_windows", guard.windows)
        self.note("fused_ops_in_graph", {k: v for k, v in op_histogram(model).items()
                                         if k.split("::")[-1] in FUSED_OPS})
        return ir.passes.PassResult(model, modified=any(counts.values()))

    @staticmethod
    def _name_fused_nodes(model: ir.Model) -> None:
        for node in model.graph:
            if LAYER_KEY in node.metadata_props:
                continue
            # a fused node has no exporter metadata: borrow the layer of its first consumer
            for out in node.outputs:
                users = [u.node for u in out.uses() if LAYER_KEY in u.node.metadata_props]
                if users:
                    node.metadata_props[LAYER_KEY] = layer_name(users[0])
                    break


class FuseKVAttention(FuseORT):
    """``fuse-kv-attention``: a KV-cache graph's attention -> ``GroupQueryAttention`` (rotary from
    the position ids inside), run by a quantizing compile after the weights are rounded.

    Until then the attention stays as exported, the same operations the cache-free graph runs
    (whose attention the ``ort-int8`` target fuses at the end too), so calibration, outlier
    detection, SmoothQuant / AWQ and every error measurement see the activations the cache-free
    compile sees, and both compiles make the same choices: fused before calibration, ONNX
    Runtime's attention kernel changed the calibrated ranges in their last bits, enough to flip
    near-tied clip and range searches (measured: 0.1-0.2 % perplexity apart on SmolLM2). The
    fusions touch no weight: their patterns start at the projections' outputs."""

    name = "fuse-kv-attention"

    def __init__(self, explain: bool = True):
        super().__init__(only=["rotary_embedding", *KV_ATTENTION_FUSIONS], explain=explain,
                         pack_qkv=False)

    def options(self) -> dict:
        return {"fusions": self.only, "explain": self.explain}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from lbcc.kvcache import kv_layout

        if kv_layout(model) is None:
            self.note("matched", "not a KV-cache graph")
            return ir.passes.PassResult(model, modified=False)
        return super().call(model)
