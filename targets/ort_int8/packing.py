"""Packing of sibling projections after lowering: ``pack-qkv`` and ``pack-nbits``.

``pack-qkv`` (KV-cache graphs): the Q, K and V projections of a ``GroupQueryAttention`` become
one projection, GQA's packed-QKV input (the form onnxruntime-genai's builder emits: one
projection a layer at decode instead of three), *after* each of them was planned and lowered as
its own layer, as in the cache-free graph. They are packed only when they were lowered alike:

* three ``MatMulNBits`` on one input with one signature (bits, block, accuracy level): their
  rows stacked (see below);
* three static int8 ``MatMul(DequantizeLinear(q(x)), DequantizeLinear(W_i, s_i, z_i, axis=1))``
  on one quantized input: ``W = [W_q | W_k | W_v]`` with the per-column scales and zero points
  side by side;
* three float ``MatMul(x, W_i)`` (layers left float): ``MatMul(x, [W_q | W_k | W_v])``.

Projections with biases (``Add(MatMul(x, W_i), b_i)``, Qwen2's) pack the same way, followed by one
``Add`` of ``[b_q | b_k | b_v]``.

Every output column is then computed from the same numbers as before. Projections lowered
differently (say V at int8 per block of the input at run time because its static SQNR fell short,
Q and K static) stay three inputs of the attention: packing them first and planning the packed
projection as one layer would hand V the plan that suits Q and K. The cache-free scoring graph is
left to ``pack-nbits``, whose Slices keep a per-layer output for ``lbcc.debug.compare``.

``pack-nbits``: sibling ``MatMulNBits`` that read one input become one, then a ``Slice`` each.

    y_i = MatMulNBits(x, B_i, s_i, z_i)  (i = 1..m, same K / bits / block / accuracy level)
    ->  y_i = Slice(MatMulNBits(x, [B_1; ...; B_m], [s_1; ...], [z_1; ...]), columns of y_i)

MatMulNBits stores everything output-row major (``B[N, K/block, block*bits/8]``, ``scales[N *
K/block]``, ``zero_points[N * ceil(K/block * bits/8)]``), so stacking the rows of the siblings is
the packed weight: every output column is computed from the same bytes as before, and the result
is bit-identical. What it saves is per-call work: at decode (one token, M = 1) a small
MatMulNBits costs about as much in dispatch, activation quantization (``accuracy_level`` 4) and
thread synchronization as in arithmetic; a SwiGLU MLP's gate and up projections (or unpacked
Q / K / V) become one call. Runs after ``lower-ort``; per-layer choices are untouched (the
siblings' layers keep their names in the report, with ``packed_into`` naming the packed node).
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


def _stacked_nbits(graph: ir.Graph, nodes: list[ir.Node], base: str) -> ir.Node:
    """One ``MatMulNBits`` over the rows of ``nodes`` (same input and signature), not yet in the
    graph: weights, scales and zero points stacked, N the sum, output typed like the first's."""
    first = nodes[0]
    ns = [n.attributes.get_int("N", 0) for n in nodes]
    inputs = [first.inputs[0]] + [
        add_initializer(graph, f"{base}_{suffix}", _stack([n.inputs[i] for n in nodes], ns))
        for i, suffix in ((1, "B"), (2, "scales"), (3, "zero_points")) if i < len(first.inputs)]
    attrs = {k: first.attributes.get_int(k, 0) for k in _KEYS}
    mm = ir.node("MatMulNBits", inputs, domain=MS, name=base,
                 attributes={**attrs, "N": int(sum(ns))})
    out0 = first.outputs[0]
    mm.outputs[0].type = out0.type
    if out0.shape is not None:
        mm.outputs[0].shape = ir.Shape([*list(out0.shape)[:-1], int(sum(ns))])
    return mm


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
        mm = _stacked_nbits(graph, nodes, base)
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


# ---------------------------------------------------------------------------------------------
# pack-qkv


def _same(a: ir.Value | None, b: ir.Value | None) -> bool:
    """One value, or two constants with equal contents (or both absent)."""
    if a is b:
        return True
    if a is None or b is None or a.const_value is None or b.const_value is None:
        return False
    x, y = a.const_value.numpy(), b.const_value.numpy()
    return x.dtype == y.dtype and x.shape == y.shape and bool(np.array_equal(x, y))


def _qdq_weight(mm: ir.Node) -> ir.Node | None:
    """The weight's ``DequantizeLinear(W, s, z, axis=1)`` of a static int8 MatMul whose input is a
    ``DequantizeLinear`` (constant weight, per-column scales and zero points), else None. The
    packed projection gets copies: the originals go when nothing reads them any more."""
    if mm.op_type != "MatMul" or mm.domain not in ("", "ai.onnx"):
        return None
    act, dq = (v.producer() if v is not None else None for v in mm.inputs[:2])
    if act is None or act.op_type != "DequantizeLinear" or dq is None \
            or dq.op_type != "DequantizeLinear" or "block_size" in dq.attributes:
        return None
    if any(v is None or v.const_value is None for v in dq.inputs):
        return None
    w, scale = dq.inputs[0].const_value, dq.inputs[1].const_value
    if len(w.shape) != 2 or dq.attributes.get_int("axis", 1) != 1 or len(scale.shape) != 1:
        return None
    return dq


def _qkv_form(mms: list[ir.Node]) -> tuple[str, str]:
    """("nbits" | "qdq", "") when the three projections can be packed, else ("", why not)."""
    if all(_packable(m) for m in mms):
        if len({id(m.inputs[0]) for m in mms}) != 1:
            return "", "the projections do not read one input"
        if len({_signature(m) for m in mms}) != 1:
            return "", "the MatMulNBits differ in bits, block size or accuracy level"
        return "nbits", ""
    dqs = [_qdq_weight(m) for m in mms]
    if all(dq is not None for dq in dqs):
        acts = [m.inputs[0].producer() for m in mms]
        if not all(acts[0].inputs[0] is a.inputs[0] and all(
                _same(x, y) for x, y in zip(acts[0].inputs[1:], a.inputs[1:])) for a in acts):
            return "", "the projections quantize their input differently"
        dtypes = {tuple(v.const_value.dtype for v in dq.inputs) for dq in dqs}
        if len(dtypes) != 1 or len({len(dq.inputs) for dq in dqs}) != 1:
            return "", "the int8 weights differ in storage type"
        return "qdq", ""
    kinds = sorted({m.op_type if m.op_type != "MatMul" else (
        "static int8" if _qdq_weight(m) is not None else "MatMul") for m in mms})
    return "", "the projections were lowered differently (" + " / ".join(kinds) + ")"


def _columns(mm: ir.Node) -> int:
    """Output columns of a lowered projection (MatMulNBits, or a MatMul on a constant or
    dequantized weight)."""
    if mm.op_type == "MatMulNBits":
        return mm.attributes.get_int("N", 0)
    w = mm.inputs[1]
    dq = w.producer()
    if w.const_value is None and dq is not None and dq.op_type == "DequantizeLinear":
        w = dq.inputs[0]
    return int(w.const_value.shape[1])


def _concat_columns(graph: ir.Graph, name: str, values: list[ir.Value], axis: int) -> ir.Value:
    return add_initializer(graph, name, np.concatenate([v.const_value.numpy() for v in values],
                                                       axis=axis))


class PackQKV(Pass):
    """Q, K, V projections of each GroupQueryAttention -> GQA's packed QKV, where lowered alike."""

    name = "pack-qkv"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from lbcc.kvcache import kv_layout
        from lbcc.passes.kv_fusions import add_packed_bias, pack_qkv, peel_bias

        if kv_layout(model) is None:
            self.note("packed", "not a KV-cache graph")
            return ir.passes.PassResult(model, modified=False)
        graph = model.graph
        layers = self.context.notes.setdefault("layers", {})
        packed = {"float": pack_qkv(model), "nbits": 0, "qdq": 0}
        separate: dict[str, str] = {}
        for gqa in list(graph):
            if gqa.op_type != "GroupQueryAttention" or gqa.domain != MS \
                    or len(gqa.inputs) < 3 or any(v is None for v in gqa.inputs[:3]):
                continue
            if any(len(v.uses()) != 1 or v.is_graph_output() for v in gqa.inputs[:3]):
                separate[gqa.name] = "a projection output has another consumer"
                continue
            peeled = [peel_bias(v) for v in gqa.inputs[:3]]
            mms = [y.producer() for y, _ in peeled]
            if any(m is None for m in mms) or len({id(m) for m in mms}) != 3:
                separate[gqa.name] = "the projections are not three nodes"
                continue
            form, why = _qkv_form(mms)
            if not form:
                separate[gqa.name] = why
                continue
            node = self._pack_nbits(graph, mms) if form == "nbits" else self._pack_qdq(graph, mms)
            add = add_packed_bias(graph, node, [b for _, b in peeled], [_columns(m) for m in mms])
            gqa.replace_input_with(0, (add or node).outputs[0])
            gqa.replace_input_with(1, None)
            gqa.replace_input_with(2, None)
            graph.remove([y.uses()[0].node for y, b in peeled if b is not None] + mms, safe=True)
            for m in mms:
                for key in (m.name, m.name.removesuffix("_nbits")):
                    if key in layers:
                        layers[key]["packed_into"] = node.name
            packed[form] += 1
        self.note("packed", packed)
        if separate:
            self.note("kept_separate", len(separate))
            self.note("why_separate", dict(list(separate.items())[:4]))
        return ir.passes.PassResult(model, modified=any(packed.values()))

    @staticmethod
    def _qkv_node(graph: ir.Graph, mms: list[ir.Node], node: ir.Node, n: int) -> ir.Node:
        """``node`` as the layer ``<attention>.qkv_proj``, inserted before the Q projection."""
        from lbcc.passes.kv_fusions import name_qkv_projection

        name_qkv_projection(node, mms[0], n)
        graph.insert_before(mms[0], node)
        return node

    def _pack_nbits(self, graph: ir.Graph, mms: list[ir.Node]) -> ir.Node:
        node = _stacked_nbits(graph, mms, f"{mms[0].name}_qkv")
        return self._qkv_node(graph, mms, node, node.attributes.get_int("N", 0))

    def _pack_qdq(self, graph: ir.Graph, mms: list[ir.Node]) -> ir.Node:
        dqs = [m.inputs[1].producer() for m in mms]
        base = f"{mms[0].name}_qkv"
        parts = [_concat_columns(graph, f"{base}_weight", [d.inputs[0] for d in dqs], axis=1)]
        parts += [_concat_columns(graph, f"{base}_{suffix}", [d.inputs[i] for d in dqs], axis=0)
                  for i, suffix in ((1, "scale"), (2, "zero_point")) if i < len(dqs[0].inputs)]
        weight = ir.node("DequantizeLinear", parts, attributes={"axis": 1},
                         name=f"{base}_weight_dq")
        weight.outputs[0].type = dqs[0].outputs[0].type
        graph.insert_before(mms[0], weight)
        n = int(parts[0].shape[1])
        node = ir.node("MatMul", [mms[0].inputs[0], weight.outputs[0]])
        return self._qkv_node(graph, mms, node, n)


# ---------------------------------------------------------------------------------------------
# fold-nbits-bias

#: MatMulNBits' optional bias input (after A, B, scales, zero_points, g_idx)
_NBITS_BIAS = 5


class FoldNBitsBias(Pass):
    """``Add(MatMulNBits(x, ...), b)`` -> ``MatMulNBits(x, ..., bias=b)``: a projection's constant
    bias (Qwen2's Q / K / V, packed or not; GPT-style MLPs) added inside the kernel, one node
    fewer a projection each step. ONNX Runtime's CPU kernel adds the bias to the same float32
    result the Add would read (bit-identical, checked in the tests). The folded projection's
    output takes the Add's output name, so a per-layer comparison by name meets the biased
    value. Runs after ``pack-nbits`` (which packs bias-free siblings)."""

    name = "fold-nbits-bias"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, folded = model.graph, 0
        for mm in list(graph):
            add, bias = self._foldable(mm)
            if add is None:
                continue
            if len(mm.inputs) <= _NBITS_BIAS:
                mm.resize_inputs(_NBITS_BIAS + 1)
            mm.replace_input_with(_NBITS_BIAS, bias)
            out, summed = mm.outputs[0], add.outputs[0]
            name = summed.name
            summed.replace_all_uses_with(out, replace_graph_outputs=True)
            graph.remove(add, safe=True)
            out.name = name
            folded += 1
        self.note("folded", folded)
        return ir.passes.PassResult(model, modified=bool(folded))

    @staticmethod
    def _foldable(mm: ir.Node) -> tuple[ir.Node | None, ir.Value | None]:
        """(the Add, its bias) when ``mm``'s output goes to one Add of a constant [N] vector of
        the kernel's float type, and ``mm`` has no bias yet."""
        if mm.op_type != "MatMulNBits" or mm.domain != MS or (
                len(mm.inputs) > _NBITS_BIAS and mm.inputs[_NBITS_BIAS] is not None):
            return None, None
        out = mm.outputs[0]
        if out.is_graph_output() or len(out.uses()) != 1:
            return None, None
        add = out.uses()[0].node
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
            return None, None
        bias = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        scales = mm.inputs[2]
        if bias is None or bias is out or bias.const_value is None or scales is None \
                or scales.const_value is None:
            return None, None
        n = mm.attributes.get_int("N", 0)
        if tuple(bias.const_value.shape) != (n,) or bias.const_value.dtype != \
                scales.const_value.dtype:
            return None, None
        return add, bias
