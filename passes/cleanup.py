"""``cleanup``: remove nodes and initializers nothing uses any more, and sort topologically."""

from __future__ import annotations

import onnx_ir as ir

from lbcc.pipeline import Pass


class Cleanup(Pass):
    """Dead-node / dead-initializer removal (rewrites leave old initializers behind)."""

    name = "cleanup"
    preserves = frozenset({"activation-stats"})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = (len(model.graph), len(model.graph.initializers))
        ir.passes.common.RemoveUnusedNodesPass()(model)
        for name in [n for n, v in model.graph.initializers.items() if not v.uses()
                     and v not in model.graph.outputs]:
            del model.graph.initializers[name]
        ir.passes.common.TopologicalSortPass()(model)
        ir.passes.common.RemoveUnusedOpsetsPass()(model)
        after = (len(model.graph), len(model.graph.initializers))
        self.note("nodes_removed", before[0] - after[0])
        self.note("initializers_removed", before[1] - after[1])
        return ir.passes.PassResult(model, modified=before != after)
