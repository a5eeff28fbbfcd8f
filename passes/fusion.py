"""``fuse-ort``: ONNX Runtime fusions from onnxscript's rewriter, with a count per fusion.

RMSNorm -> ``SimplifiedLayerNormalization``, residual Add + RMSNorm ->
``SkipSimplifiedLayerNormalization``, rotary -> ``RotaryEmbedding`` (with its cos/sin cache),
Attention fusions (GQA / MHA) need the KV-cache
graph and are not applied to the cache-free scoring graph: an SDPA that no MHA/GQA consumes is
not an op ONNX Runtime can run. Runs on the float graph
right after capture: onnxscript's pre-fusion optimizer folds constants, which must never see a
DequantizeLinear of a weight. Fused nodes take the layer name of the node they replaced.
"""

from __future__ import annotations

from typing import Callable

import onnx_ir as ir

from lbcc.irutils import LAYER_KEY, layer_name, op_histogram
from lbcc.pipeline import Pass


FUSED_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
             "MultiHeadAttention", "GroupQueryAttention", "Attention"}


def _fusions() -> list[tuple[str, Callable[..., int], dict]]:
    from onnxscript.rewriter.ort_fusions import (
        cos_sin_cache,
        rms_normalization,
        rotary_embedding,
        skip_normalization,
    )

    return [
        ("rms_normalization", rms_normalization.fuse_rms_normalization, {}),
        ("skip_rms_normalization", skip_normalization.fuse_skip_rms_normalization, {}),
        ("rotary_embedding", rotary_embedding.fuse_rotary_embedding, {}),
        ("cos_sin_cache", cos_sin_cache.fuse_cos_sin_cache, {}),
    ]


class FuseORT(Pass):
    """onnxscript ORT fusions; ``only`` restricts them by name (e.g. ``["rms_normalization"]``)."""

    name = "fuse-ort"

    def __init__(self, only: list[str] | None = None):
        super().__init__()
        self.only = only

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        counts: dict[str, int] = {}
        for name, fuse, kwargs in _fusions():
            if self.only is not None and name not in self.only:
                continue
            counts[name] = int(fuse(model, **kwargs) or 0)
        # inline fusion helper functions that no other fusion consumed, drop dead nodes
        if model.functions:
            ir.passes.common.InlinePass()(model)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        ir.passes.common.RemoveUnusedFunctionsPass()(model)
        self._name_fused_nodes(model)
        # a match can be undone when a helper function is inlined back (rotary without a
        # cos/sin cache fusion): report what is in the graph at the end, too
        self.note("matched", counts)
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
