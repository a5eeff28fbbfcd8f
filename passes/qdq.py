"""``insert-qdq``: quantize the activation inputs of planned MatMuls.

- ``static``: one ``QuantizeLinear(x, s, z)`` per activation tensor (uint8), and one
  ``DequantizeLinear`` per consumer (QDQ groups must not share a DQ), with
  s = (hi - lo) / 255, z = round(-lo / s) from the calibrated range (lo <= 0 <= hi);
- ``dynamic``: ``DynamicQuantizeLinear(x) -> (y, s, z)`` once per tensor and a DQ per consumer;
  the range is the tensor's own min/max at run time.

``dynamic-block`` and ``none`` are left float here: the first has no standard ONNX form and is
produced by the target's lowering; the second is weight-only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from lbcc.irutils import add_initializer, copy_identity
from lbcc.pipeline import Pass
from lbcc.passes.calibrate import ACTIVATION_STATS
from lbcc.passes.precision import plan_of


def affine_uint8(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """(scale, zero_point) of the uint8 grid covering [min(lo,0), max(hi,0)] with 0 exact."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-12:
        return np.float32(1.0), np.uint8(0)
    scale = np.float32((hi - lo) / 255.0)
    zp = int(np.clip(np.rint(-lo / scale), 0, 255))
    return scale, np.uint8(zp)


class InsertQDQ(Pass):
    """QuantizeLinear/DequantizeLinear (static) or DynamicQuantizeLinear (dynamic) on MatMul inputs."""

    name = "insert-qdq"
    preserves = frozenset({ACTIVATION_STATS})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        groups: dict[ir.Value, list[tuple[ir.Node, dict[str, Any]]]] = {}
        for node in graph:
            plan = plan_of(node)
            if (plan and node.op_type == "MatMul"
                    and plan.get("activation") in ("static", "dynamic")):
                groups.setdefault(node.inputs[0], []).append((node, plan))
        counts = {"static": 0, "dynamic": 0}
        for x, consumers in groups.items():
            mode = consumers[0][1]["activation"]
            first = consumers[0][0]
            if mode == "static":
                lo = min(p["range"][0] for _, p in consumers)
                hi = max(p["range"][1] for _, p in consumers)
                scale, zp = affine_uint8(lo, hi)
                s = add_initializer(graph, f"{x.name}_scale", np.array(scale, np.float32))
                z = add_initializer(graph, f"{x.name}_zero_point", np.array(zp, np.uint8))
                q = ir.node("QuantizeLinear", [x, s, z], name=f"{x.name}_quantize")
                q.outputs[0].name = f"{x.name}_quantized"
                q.outputs[0].type = ir.TensorType(ir.DataType.UINT8)
                q.outputs[0].shape = x.shape
                qparams = [q.outputs[0], s, z]
            else:
                q = ir.node("DynamicQuantizeLinear", [x], num_outputs=3,
                            name=f"{x.name}_dynamic_quantize")
                for out, suffix, dt in zip(q.outputs, ("quantized", "scale", "zero_point"),
                                           (ir.DataType.UINT8, ir.DataType.FLOAT,
                                            ir.DataType.UINT8)):
                    out.name = f"{x.name}_{suffix}"
                    out.type = ir.TensorType(dt)
                q.outputs[0].shape = x.shape
                qparams = list(q.outputs)
            copy_identity(first, q)
            graph.insert_before(first, q)
            for node, _ in consumers:
                dq = ir.node("DequantizeLinear", qparams, name=f"{node.name}_input_dq")
                dq.outputs[0].name = f"{node.name}_input_dequantized"
                dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
                dq.outputs[0].shape = x.shape
                copy_identity(node, dq)
                graph.insert_before(node, dq)
                node.replace_input_with(0, dq.outputs[0])
                counts[mode] += 1
        self.note("quantized_inputs", counts)
        return ir.passes.PassResult(model, modified=any(counts.values()))
