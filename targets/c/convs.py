"""Convolutions in int8 for the c target, and ONNX Runtime's QuantizeLinear propagation.

``quantize-conv``: every ``Conv(x, W[C_out, C_in/g, kh, kw] (, b))`` with constant float weights
becomes the QDQ form ONNX Runtime fuses into QLinearConv (and the C into ``lbcc_qconv2d``):

- x: ``DQ(Q(x))`` uint8 per tensor, s = (hi - lo) / 255, z = round(-lo / s), the range [lo, hi]
  chosen by the recipe's method from calibration statistics of x measured on the current graph;
- W: int8 per output channel, symmetric, s_w[c] = max|W[c]| / 63 (values in [-64, 63], the
  saturation-safe grid of ``WeightSpec.saturation_safe``; / 127 when that is off);
- b: int32 ``round(b[c] / (s_x * s_w[c]))`` behind ``DequantizeLinear(scale = s_x * s_w[c])``.

The output is quantized by whatever quantizes the tensor next (the input Q of the next Conv or
MatMul); a Conv whose output reaches no QuantizeLinear stays a float Conv in ONNX Runtime and the
c target rejects it. Runs after ``insert-qdq``, so the statistics include the MatMul inputs'
quantization. Belongs in ``passes/`` once another target wants it.

``hoist-quantize``: ``Q(MaxPool(x)) -> MaxPool(Q(x))`` and ``Q(Reshape(x)) -> Reshape(Q(x))`` when
the moved-over op has no other use: exact (quantization is monotonic, so it commutes with max;
Reshape moves bytes), and what ONNX Runtime's QDQ propagation does, so a Conv's output meets its
QuantizeLinear (-> QLinearConv) and max pooling runs on uint8.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from lbcc.irutils import add_initializer, copy_identity, layer_name
from lbcc.pipeline import Pass

HOIST_OVER = ("MaxPool", "Reshape")


def _conv_weight(node: ir.Node) -> np.ndarray | None:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None or not w.const_value.dtype.is_floating_point():
        return None
    arr = w.const_value.numpy()
    return arr if arr.ndim == 4 else None


class QuantizeConv(Pass):
    """Conv -> QDQ Conv with int8 per-channel weights and an int32 bias (see module docstring)."""

    name = "quantize-conv"

    def __init__(self, method: str = "mse", percentile: float = 99.99,
                 saturation_safe: bool = True):
        super().__init__()
        self.method = method
        self.percentile = percentile
        self.saturation_safe = saturation_safe

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from lbcc.calibration import collect_activation_stats
        from lbcc.passes.qdq import affine_uint8

        convs = [n for n in model.graph if n.op_type == "Conv" and n.domain in ("", "ai.onnx")
                 and _conv_weight(n) is not None]
        convs = [n for n in convs if (p := n.inputs[0].producer()) is None
                 or p.op_type != "DequantizeLinear"]
        if not convs:
            return ir.passes.PassResult(model, modified=False)
        if self.context.calibration is None:
            raise self.fail("static int8 convolutions need calibration data.",
                            "Pass --calib FILE.npz (arrays named after the model inputs).")
        names = list(dict.fromkeys(n.inputs[0].name for n in convs))
        stats = collect_activation_stats(model, self.context.calibration, names,
                                         progress=self.context.progress)
        layers = self.context.notes.setdefault("layers", {})
        qmax = 63 if self.saturation_safe else 127
        quantized_inputs: dict[str, tuple[ir.Value, ir.Value, ir.Value, np.float32]] = {}
        ranges: dict[str, list[float]] = {}
        for node in convs:
            x = node.inputs[0]
            if x.name not in quantized_inputs:
                lo, hi = stats[x.name].choose_range(self.method, self.percentile)
                ranges[x.name] = [float(lo), float(hi)]
                s, z = affine_uint8(lo, hi)
                sv = add_initializer(model.graph, f"{x.name}_scale", np.array(s, np.float32))
                zv = add_initializer(model.graph, f"{x.name}_zero_point", np.array(z, np.uint8))
                q = ir.node("QuantizeLinear", [x, sv, zv], name=f"{x.name}_quantize")
                q.outputs[0].name = f"{x.name}_quantized"
                q.outputs[0].type = ir.TensorType(ir.DataType.UINT8)
                q.outputs[0].shape = x.shape
                copy_identity(node, q)
                model.graph.insert_before(node, q)
                quantized_inputs[x.name] = (q.outputs[0], sv, zv, np.float32(s))
            xq, sv, zv, s_x = quantized_inputs[x.name]
            dq = ir.node("DequantizeLinear", [xq, sv, zv], name=f"{node.name}_input_dq")
            dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), x.shape
            new = [dq]
            w = _conv_weight(node).astype(np.float32)
            amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
            s_w = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
            wq = np.clip(np.rint(w / s_w[:, None, None, None]), -qmax - 1, qmax).astype(np.int8)
            base = node.inputs[1].name
            wdq = ir.node("DequantizeLinear", [add_initializer(model.graph, f"{base}_q", wq),
                                               add_initializer(model.graph, f"{base}_scale", s_w)],
                          attributes={"axis": 0}, name=f"{base}_dq")
            wdq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            wdq.outputs[0].shape = ir.Shape(list(w.shape))
            new.append(wdq)
            entry: dict[str, Any] = {"node": node.name, "op": "Conv", "layer": layer_name(node),
                                     "status": "quantized", "kind": "conv",
                                     "plan": {"activation": "static", "range": ranges[x.name],
                                         "weight": {"bits": 8, "value_bits": 7 if qmax == 63
                                                    else 8, "per_channel": True}}}
            b = node.inputs[2] if len(node.inputs) > 2 else None
            if b is not None and b.const_value is not None:
                b_s = (s_x * s_w).astype(np.float32)  # the scale ONNX Runtime expects: s_x s_w
                bq = np.rint(b.const_value.numpy().astype(np.float32) / b_s)
                bq = np.clip(bq, -2**31, 2**31 - 1).astype(np.int32)
                bdq = ir.node("DequantizeLinear", [add_initializer(model.graph, f"{b.name}_q", bq),
                                                   add_initializer(model.graph, f"{b.name}_scale",
                                                                   b_s)],
                              attributes={"axis": 0}, name=f"{b.name}_dq")
                bdq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
                bdq.outputs[0].shape = ir.Shape([w.shape[0]])
                new.append(bdq)
            for n in new:
                copy_identity(node, n)
            model.graph.insert_before(node, new)
            node.replace_input_with(0, dq.outputs[0])
            node.replace_input_with(1, wdq.outputs[0])
            if len(new) > 2:
                node.replace_input_with(2, new[2].outputs[0])
            layers[node.name] = entry
        for name in [n for n, v in model.graph.initializers.items() if not v.uses()]:
            del model.graph.initializers[name]
        self.note("convs_quantized", len(convs))
        return ir.passes.PassResult(model, modified=True)


class HoistQuantize(Pass):
    """Q(MaxPool(x)) -> MaxPool(Q(x)), Q(Reshape(x)) -> Reshape(Q(x)) (see module docstring)."""

    name = "hoist-quantize"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        outputs = {id(v) for v in model.graph.outputs}
        moved = 0
        changed = True
        while changed:
            changed = False
            for q in list(model.graph):
                if q.op_type != "QuantizeLinear":
                    continue
                p = q.inputs[0].producer()
                if p is None or p.op_type not in HOIST_OVER:
                    continue
                mid, src = p.outputs[0], p.inputs[0]
                if (len(list(mid.uses())) != 1 or id(mid) in outputs or id(src) in outputs
                        or (p.op_type == "MaxPool" and len(p.outputs) > 1
                            and p.outputs[1] is not None and p.outputs[1].uses())):
                    continue
                out = q.outputs[0]
                new_q = ir.node("QuantizeLinear", [src, *q.inputs[1:]], name=f"{q.name}_hoisted")
                new_q.outputs[0].type = out.type
                new_q.outputs[0].shape = src.shape
                copy_identity(q, new_q)
                model.graph.insert_before(p, new_q)
                p.replace_input_with(0, new_q.outputs[0])
                mid.type = out.type
                name = out.name
                out.replace_all_uses_with(mid, replace_graph_outputs=True)
                model.graph.remove(q, safe=True)
                mid.name = name
                moved += 1
                changed = True
        self.note("moved", moved)
        return ir.passes.PassResult(model, modified=bool(moved))
