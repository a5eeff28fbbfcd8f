"""Small QDQ / float ONNX graphs for the c target's kernel tests (helpers, not tests).

Each builder returns an ``onnx_ir.Model`` with shapes inferred, at opset 21, the form
``insert-qdq`` produces: ``QuantizeLinear`` / ``DequantizeLinear`` pairs on activations and
``DequantizeLinear`` on int8 constant weights. Int8 weights stay on the 7-bit grid [-64, 63]
(``reduce_range``), which ONNX Runtime's x86 u8 x s8 kernels compute without saturation.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
_ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.uint8): TensorProto.UINT8,
         np.dtype(np.int8): TensorProto.INT8, np.dtype(np.int64): TensorProto.INT64,
         np.dtype(np.int32): TensorProto.INT32}


def finish(nodes, inputs, outputs, inits) -> ir.Model:
    """Graph -> checked, shape-inferred onnx_ir model. ``inputs``/``outputs``: (name, dtype, shape)."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, _ELEM[np.dtype(d)], list(s)) for n, d, s in inputs],
        [helper.make_tensor_value_info(n, _ELEM[np.dtype(d)], None if s is None else list(s))
         for n, d, s in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return ir.serde.deserialize_model(model)


def act_qdq(name: str, scale: float, zp: int, signed: bool, inits: dict) -> list:
    """Q -> DQ on activation ``name``; returns the nodes, output ``{name}_dq``."""
    inits[f"{name}_s"] = np.float32(scale)
    inits[f"{name}_z"] = np.array(zp, np.int8 if signed else np.uint8)
    return [helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_q"]),
            helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"],
                             [f"{name}_dq"])]


def weight_dq(name: str, q: np.ndarray, scale: np.ndarray, axis: int, inits: dict) -> list:
    inits[f"{name}_q"] = q.astype(np.int8)
    inits[f"{name}_ws"] = scale.astype(np.float32)
    return [helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_ws"], [f"{name}_w"],
                             axis=axis)]


def qmatmul(rng: np.random.Generator, m: int, k: int, n: int, *, per_channel: bool = True,
            requant: bool = False, transposed: bool = False, signed: bool = False,
            x_zp: int = 128, y_zp: int = 128) -> ir.Model:
    """x[m, k] -> Q/DQ -> MatMul(DQ(w)) [-> Q -> y uint8], y float otherwise."""
    inits: dict = {}
    x_scale = float(rng.uniform(0.005, 0.05))
    nodes = act_qdq("x", x_scale, x_zp, signed, inits)
    q = rng.integers(-64, 64, (n, k) if transposed else (k, n))
    scale = rng.uniform(0.001, 0.02, n if per_channel else 1)
    if transposed:
        nodes += weight_dq("w", q, scale if per_channel else scale[0], 0, inits)
        nodes.append(helper.make_node("Transpose", ["w_w"], ["w_t"], perm=[1, 0]))
        w = "w_t"
    else:
        nodes += weight_dq("w", q, scale if per_channel else scale[0], 1, inits)
        w = "w_w"
    nodes.append(helper.make_node("MatMul", ["x_dq", w], ["h"]))
    if requant:
        inits["y_s"] = np.float32(rng.uniform(0.05, 0.5))
        inits["y_z"] = np.array(y_zp, np.uint8)
        nodes.append(helper.make_node("QuantizeLinear", ["h", "y_s", "y_z"], ["y"]))
        out = ("y", np.uint8, (m, n))
    else:
        out = ("h", np.float32, (m, n))
    return finish(nodes, [("x", np.float32, (m, k))], [out], inits)


def qconv(rng: np.random.Generator, n: int, c_in: int, h: int, w: int, c_out: int, k: int,
          stride: int, pad: int, group: int, bias: bool = True, relu: bool = False) -> ir.Model:
    """x NCHW -> Q/DQ -> Conv(DQ(w), DQ(b int32)) [-> Relu] -> Q -> y uint8."""
    inits: dict = {}
    x_scale, x_zp = float(rng.uniform(0.01, 0.05)), int(rng.integers(0, 256))
    nodes = act_qdq("x", x_scale, x_zp, False, inits)
    q = rng.integers(-64, 64, (c_out, c_in // group, k, k))
    ws = rng.uniform(0.001, 0.02, c_out).astype(np.float32)
    nodes += weight_dq("w", q, ws, 0, inits)
    ins = ["x_dq", "w_w"]
    if bias:
        bscale = (np.float32(x_scale) * ws).astype(np.float32)
        inits["b_q"] = rng.integers(-2000, 2000, c_out).astype(np.int32)
        inits["b_s"] = bscale
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_s"], ["b"], axis=0))
        ins.append("b")
    nodes.append(helper.make_node("Conv", ins, ["c"], kernel_shape=[k, k], strides=[stride] * 2,
                                  pads=[pad] * 4, group=group))
    last = "c"
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["r"]))
        last = "r"
    inits["y_s"] = np.float32(rng.uniform(0.05, 0.3))
    inits["y_z"] = np.array(0 if relu else int(rng.integers(0, 256)), np.uint8)
    nodes.append(helper.make_node("QuantizeLinear", [last, "y_s", "y_z"], ["y"]))
    oh = (h + 2 * pad - k) // stride + 1
    ow = (w + 2 * pad - k) // stride + 1
    return finish(nodes, [("x", np.float32, (n, c_in, h, w))],
                  [("y", np.uint8, (n, c_out, oh, ow))], inits)


def single(op: str, inputs: list[tuple[str, type, tuple]], out: tuple[str, type, tuple],
           inits: dict | None = None, extra_inputs: list[str] | None = None, **attrs
           ) -> ir.Model:
    """One node ``op`` on graph inputs (plus constant ``inits``)."""
    names = [n for n, _, _ in inputs] + (extra_inputs or [])
    node = helper.make_node(op, names, [out[0]], **attrs)
    return finish([node], inputs, [out], inits or {})
