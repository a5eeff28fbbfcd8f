"""``pack-nbits``: sibling ``MatMulNBits`` that read one input become one, then a ``Slice`` each.

    y_i = MatMulNBits(x, B_i, s_i, z_i)  (i = 1..m, same K / bits / block / accuracy level)
    ->  y_i = Slice(MatMulNBits(x, [B_1; ...; B_m], [s_1; ...], [z_1; ...]), columns of y_i)

MatMulNBits stores everything output-row major (``B[N, K/block, block*bits/8]``, ``scales[N *
K/block]``, ``zero_points[N * ceil(K/block * bits/8)]``), so stacking the rows of the siblings is
the packed weight: every output column is computed from the same bytes as before, and the result
is bit-identical. What it saves is per-call work: at decode (one token, M = 1) a small
MatMulNBits costs about as much in dispatch, activation quantization (``accuracy_level`` 4) and
thread synchronization as in arithmetic; a SwiGLU MLP's gate and up projections (or unpacked
Q / K / V) become one call. Runs after ``lower-ort``; per-layer choices are untouched (the
siblings' layers keep their names in the report, with ``lowered_to`` naming the packed node).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from lbcc.irutils import add_initializer, copy_identity
from lbcc.pipeline import Pass

MS = "com.microsoft"
_KEYS = ("K", "bits", "block_size", "accuracy_level")


def _packable(node: ir.Node) -> bool:
    """A MatMulNBits whose B / scales (/ zero points) are constants read by it alone."""
    if node.op_type != "MatMulNBits" or node.domain != MS or not 3 <= len(node.inputs) <= 4:
        return False
    if node.outputs[0].is_graph_output():
        return False
    for v in node.inputs[1:]:
        if v is None or v.const_value is None or len(v.uses()) != 1 or v.is_graph_output():
            return False
    return True


def _signature(node: ir.Node) -> tuple:
    attrs = tuple(node.attributes.get_int(k, 0) for k in _KEYS)
    dtypes = tuple(v.const_value.dtype for v in node.inputs[1:])
    return attrs + (len(node.inputs),) + dtypes


def _stack(values: list[ir.Value], ns: list[int]) -> np.ndarray:
    """Concatenate per-output-row tensors (rank kept; 1-D ones as [N, -1] rows)."""
    arrays = [v.const_value.numpy() for v in values]
    if arrays[0].ndim == 1:
        return np.concatenate([a.reshape(n, -1) for a, n in zip(arrays, ns)]).reshape(-1)
    return np.concatenate(arrays, axis=0)


class PackNBits(Pass):
    """Siblings ``MatMulNBits(x, ...)`` with one signature -> one MatMulNBits + a Slice each."""

    name = "pack-nbits"

    def __init__(self, min_siblings: int = 2):
        super().__init__()
        self.min_siblings = min_siblings

    def options(self) -> dict[str, Any]:
        return {"min_siblings": self.min_siblings}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layers = self.context.notes.setdefault("layers", {})
        groups: dict[tuple, list[ir.Node]] = {}
        for node in graph:  # graph order: the packed columns follow the first sibling's order
            if _packable(node):
                groups.setdefault((id(node.inputs[0]), _signature(node)), []).append(node)
        packed: list[list[str]] = []
        for nodes in groups.values():
            if len(nodes) < self.min_siblings:
                continue
            self._pack(graph, nodes)
            packed.append([n.name for n in nodes])
            for n in nodes:
                if n.name.removesuffix("_nbits") in layers:
                    layers[n.name.removesuffix("_nbits")]["packed_into"] = f"{nodes[0].name}_packed"
        self.note("packed", len(packed))
        self.note("groups", packed[:4] + ([f"... {len(packed) - 4} more"] if len(packed) > 4
                                           else []))
        return ir.passes.PassResult(model, modified=bool(packed))

    @staticmethod
    def _pack(graph: ir.Graph, nodes: list[ir.Node]) -> None:
        first = nodes[0]
        ns = [n.attributes.get_int("N", 0) for n in nodes]
        base = f"{first.name}_packed"
        inputs = [first.inputs[0]]
        for i, suffix in ((1, "B"), (2, "scales"), (3, "zero_points")):
            if i < len(first.inputs):
                inputs.append(add_initializer(graph, f"{base}_{suffix}",
                                              _stack([n.inputs[i] for n in nodes], ns)))
        attrs = {k: first.attributes.get_int(k, 0) for k in _KEYS}
        mm = ir.node("MatMulNBits", inputs, domain=MS, name=base,
                     attributes={**attrs, "N": int(sum(ns))})
        out0 = first.outputs[0]
        mm.outputs[0].type = out0.type
        if out0.shape is not None:
            mm.outputs[0].shape = ir.Shape([*list(out0.shape)[:-1], int(sum(ns))])
        copy_identity(first, mm)
        # one Slice per sibling, with that sibling's identity: each layer keeps an output of its
        # own (per-layer debugging compares layers by name), where one Split node would carry
        # a single layer's name for all of them
        axis = add_initializer(graph, f"{base}_axis", np.array([-1], np.int64))
        bounds = np.concatenate([[0], np.cumsum(ns)]).astype(np.int64)
        slices = []
        for i, old in enumerate(nodes):
            sl = ir.node("Slice", [mm.outputs[0],
                                   add_initializer(graph, f"{base}_start", bounds[i:i + 1]),
                                   add_initializer(graph, f"{base}_end", bounds[i + 1:i + 2]),
                                   axis], name=f"{old.name}_slice")
            copy_identity(old, sl)
            slices.append(sl)
        graph.insert_before(first, [mm, *slices])
        for old, sl in zip(nodes, slices):
            out, new = old.outputs[0], sl.outputs[0]
            new.type, new.shape = out.type, out.shape
            name = out.name
            out.replace_all_uses_with(new)
            graph.remove(old, safe=True)
            new.name = name
