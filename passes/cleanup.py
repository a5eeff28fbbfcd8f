"""``cleanup``: remove nodes and initializers nothing uses any more, omit the optional outputs
nothing reads, and sort topologically."""

from __future__ import annotations

import onnx_ir as ir

from lbcc.pipeline import Pass


#: norms -> their optional outputs: 1 and 2 the mean / inverse standard deviation, 3 (the skip
#: forms) the sum of input and skip, which the last layer's norm computes for no one
_NORM_OPTIONAL_OUTPUTS = {"SimplifiedLayerNormalization": (1, 2), "LayerNormalization": (1, 2),
                          "SkipSimplifiedLayerNormalization": (1, 2, 3),
                          "SkipLayerNormalization": (1, 2, 3)}


def drop_unused_norm_stats(model: ir.Model, debug: bool = False) -> int:
    """Omit the unused ``mean`` / ``inv_std_var`` outputs (1, 2) of the (fused) norms, and an
    unused ``input_skip_bias_sum`` (3) of the skip norms.

    onnxscript's fusions name every output of ``(Skip)SimplifiedLayerNormalization`` (and its
    rewriter names outputs that were omitted before it ran); ONNX Runtime then allocates and writes
    the statistics that nothing reads, twice a layer each step: on SmolLM2's decode step the skip
    norms took 0.89 ms a step with them and 0.65-0.70 ms without (ONNX Runtime's profiler). An
    omitted optional output is an empty name, as in onnxruntime-genai's graphs. Returns how many
    nodes changed."""
    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type not in _NORM_OPTIONAL_OUTPUTS \
                or node.domain not in ("", "ai.onnx", "com.microsoft"):
            continue
        outs = node.outputs
        drop = {i for i in _NORM_OPTIONAL_OUTPUTS[node.op_type] if i < len(outs) and outs[i].name
                and not outs[i].uses() and not outs[i].is_graph_output()}
        if not drop:
            continue
        new = ir.Node(node.domain, node.op_type, list(node.inputs),
                      attributes=list(node.attributes.values()), num_outputs=len(outs),
                      name=node.name, metadata_props=dict(node.metadata_props))
        graph.insert_before(node, new)
        for i, (old_out, new_out) in enumerate(zip(outs, new.outputs)):
            if i in drop:
                new_out.name = ""
                continue
            new_out.name, new_out.shape, new_out.type = old_out.name, old_out.shape, old_out.type
            old_out.name = None
            old_out.replace_all_uses_with(new_out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        count += 1
    if debug and not count:
        print("Rule: DropUnusedNormStats failed: no RMS norm with unused mean / inv_std_var")
    return count


class Cleanup(Pass):
    """Dead-node / dead-initializer removal (rewrites leave old initializers behind), and the
    unused statistics outputs of the fused norms omitted (:func:`drop_unused_norm_stats`)."""

    name = "cleanup"
    preserves = frozenset({"activation-stats"})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = (len(model.graph), len(model.graph.initializers))
        ir.passes.common.RemoveUnusedNodesPass()(model)
        for name in [n for n, v in model.graph.initializers.items() if not v.uses()
                     and v not in model.graph.outputs]:
            del model.graph.initializers[name]
        omitted = drop_unused_norm_stats(model)
        ir.passes.common.TopologicalSortPass()(model)
        ir.passes.common.RemoveUnusedOpsetsPass()(model)
        after = (len(model.graph), len(model.graph.initializers))
        self.note("nodes_removed", before[0] - after[0])
        self.note("initializers_removed", before[1] - after[1])
        self.note("norm_stats_omitted", omitted)
        return ir.passes.PassResult(model, modified=before != after or bool(omitted))
