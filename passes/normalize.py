"""``capture-normalize``: bring any captured graph into the form the other passes expect.

- opset: the default domain is converted to opset >= 21 (int4/uint4 and blocked DequantizeLinear);
- Gemm(A, B, C; alpha, beta, transA, transB) -> MatMul(A', B') (+ Add(beta * C)), with
  B' = alpha * B^T folded into the initializer when B is constant;
- constant folding (onnxscript's optimizer; large tensors such as a tied embedding's transpose are
  left alone, so a tied weight stays one initializer);
- shape inference;
- symbolic dims that are sums spelled in different orders get one spelling (the terms sorted):
  the exporter names each dim after its own expression, so in one graph a layer's keys can be
  ``past_seq + seq`` long and its values ``seq + past_seq`` (eager attention with a KV cache),
  and fusion rules that compare shapes by name (onnxscript's SDPA) then skip the layer;
- layer names resolved from the exporter's metadata into ``lbcc.layer`` on every node;
- float initializers checked for NaN / inf (a clear error naming the tensor and its layer).
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from lbcc.errors import BadInputError
from lbcc.irutils import LAYER_KEY, add_initializer, copy_identity, layer_name
from lbcc.pipeline import Pass

TARGET_OPSET = 21


#: a term of a symbolic sum that may be reordered: a name or an integer
_SUM_TERM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")


def _canonical_sum(dim: object) -> object:
    """``SymbolicDim("seq + past_seq")`` -> ``SymbolicDim("past_seq + seq")``: the terms of a pure
    sum of names and integers sorted; any other dim unchanged."""
    if not isinstance(dim, ir.SymbolicDim) or not dim.value or "+" not in dim.value:
        return dim
    terms = [t.strip() for t in dim.value.split("+")]
    if not all(_SUM_TERM.fullmatch(t) for t in terms):
        return dim
    canon = " + ".join(sorted(terms))
    return dim if canon == dim.value else ir.SymbolicDim(canon)


def canonical_sum_dims(model: ir.Model) -> int:
    """Give every symbolic dim that is a sum one spelling (:func:`_canonical_sum`), in the graph's
    inputs, outputs and every node's outputs (subgraphs included). Returns how many values
    changed."""
    values = list(model.graph.inputs) + list(model.graph.outputs)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        values.extend(node.outputs)
    changed = 0
    for value in dict.fromkeys(values):
        if value.shape is None:
            continue
        dims = [_canonical_sum(d) for d in value.shape.dims]
        if any(a is not b for a, b in zip(dims, value.shape.dims)):
            value.shape = ir.Shape(dims)
            changed += 1
    return changed


class CaptureNormalize(Pass):
    """Gemm -> MatMul, opset >= 21, constant folding, shape inference, layer names, NaN check."""

    name = "capture-normalize"

    def __init__(self, fold_constants: bool = True):
        super().__init__()
        self.fold_constants = fold_constants

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._check_finite(model)
        gemms = self._gemm_to_matmul(model)
        opset = model.opset_imports.get("", 0)
        if opset < TARGET_OPSET:
            from onnxscript import version_converter

            version_converter.convert_version(model, TARGET_OPSET)
            model.opset_imports[""] = max(model.opset_imports.get("", 0), TARGET_OPSET)
        if self.fold_constants:
            from onnxscript import optimizer

            optimizer.optimize(model, num_iterations=2)
        ir.passes.common.ShapeInferencePass()(model)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        respelled = canonical_sum_dims(model)
        for node in model.graph:
            node.metadata_props[LAYER_KEY] = layer_name(node)
        self.note("gemm_to_matmul", gemms)
        self.note("sum_dims_respelled", respelled)
        self.note("opset", {"from": opset, "to": model.opset_imports.get("")})
        return ir.passes.PassResult(model, modified=True)

    def _check_finite(self, model: ir.Model) -> None:
        """NaN anywhere, or inf in a weight (a 2-D+ tensor feeding MatMul/Gemm/Gather), is an error;
        -inf in an attention-mask constant is legitimate."""
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or not tensor.dtype.is_floating_point():
                continue
            arr = tensor.numpy()
            weight = arr.ndim >= 2 and any(u.node.op_type in ("MatMul", "Gemm", "Gather")
                                           for u in value.uses())
            bad_mask = ~np.isfinite(arr) if weight else np.isnan(arr)
            if bad_mask.any():
                bad = int(bad_mask.sum())
                users = [layer_name(u.node) for u in value.uses()][:3]
                raise BadInputError(
                    f"initializer {value.name!r} (used by {users or 'nothing'}) holds {bad} NaN "
                    f"or infinite value(s) out of {arr.size}.",
                    "The weights are corrupt or the model diverged in training; fix them before "
                    "quantizing (quantization scales cannot be computed from NaN/inf).")

    def _gemm_to_matmul(self, model: ir.Model) -> int:
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
                continue
            a, b = node.inputs[0], node.inputs[1]
            c = node.inputs[2] if len(node.inputs) > 2 else None
            attr = {k: v.value for k, v in node.attributes.items()}
            alpha, beta = float(attr.get("alpha", 1.0)), float(attr.get("beta", 1.0))
            trans_a, trans_b = int(attr.get("transA", 0)), int(attr.get("transB", 0))
            new_nodes: list[ir.Node] = []
            if trans_a:
                t = ir.node("Transpose", [a], attributes={"perm": [1, 0]})
                new_nodes.append(t)
                a = t.outputs[0]
            if b.const_value is not None:
                w = b.const_value.numpy().astype(np.float32)
                w = (w.T if trans_b else w) * alpha
                b = add_initializer(graph, f"{b.name}_matmul", np.ascontiguousarray(w))
            else:
                if trans_b:
                    t = ir.node("Transpose", [b], attributes={"perm": [1, 0]})
                    new_nodes.append(t)
                    b = t.outputs[0]
                if alpha != 1.0:
                    s = add_initializer(graph, f"{node.name}_alpha", np.array(alpha, np.float32))
                    m = ir.node("Mul", [b, s])
                    new_nodes.append(m)
                    b = m.outputs[0]
            mm = ir.node("MatMul", [a, b], name=f"{node.name}_matmul")
            new_nodes.append(mm)
            out = mm.outputs[0]
            if c is not None:
                if beta != 1.0:
                    if c.const_value is not None:
                        c = add_initializer(graph, f"{c.name}_beta",
                                            c.const_value.numpy().astype(np.float32) * beta)
                    else:
                        s = add_initializer(graph, f"{node.name}_beta", np.array(beta, np.float32))
                        m = ir.node("Mul", [c, s])
                        new_nodes.append(m)
                        c = m.outputs[0]
                add = ir.node("Add", [out, c], name=f"{node.name}_bias")
                new_nodes.append(add)
                out = add.outputs[0]
            for n in new_nodes:
                copy_identity(node, n)
            out.name = node.outputs[0].name
            out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
            graph.insert_before(node, new_nodes)
            node.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            count += 1
        return count
