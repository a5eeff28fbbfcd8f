"""From the QDQ graph (the graph ``ort-int8`` hands ONNX Runtime) to a :class:`Program` of C calls.

The C program must compute what ONNX Runtime computes on the same graph, so the integer patterns
are the ones ONNX Runtime's QDQ transformer fuses (x: activation, q: int8 constant weight):

- ``Q(MatMul(DQ(x), DQ(q)))`` (the MatMul output's only use is a QuantizeLinear)
  -> QLinearMatMul: ``y = sat(rne((float)acc * (s_x * s_w[n] / s_y)) + z_y)``, 8-bit output;
- ``MatMul(DQ(x), DQ(q))`` otherwise -> MatMulIntegerToFloat: ``y = (float)acc * (s_x * s_w[n])``;
- ``MatMul(DQ(x), Transpose(DQ(q[N, K])))`` (a tied lm_head) is the same with the weight already
  stored one row per output;
- ``Q(Conv(DQ(x), DQ(q), DQ(b_int32)))`` -> QLinearConv (requantized as above, int32 bias);
- ``Q(Mul(DQ(a), DQ(b)))`` -> QLinearMul, ``y = sat(rne((float)((a-z_a)(b-z_b)) * r + z_y))``,
  r = s_a s_b / s_y (ORT's x86 kernel); ``Q(Add(DQ(a), DQ(b)))`` (QLinearAdd) equals the plain
  dequantize, float add, quantize, and runs as that;
- ``Gather(DQ(q[V, D], s[V]), ids)`` -> int8 rows times their scale (an embedding; a tied lm_head
  reads the same constant, stored once);
- a Relu/Clip whose only use is such a Q and that clamps no more than it is dropped first, as
  ORT's ReluQuantFusion / ClipQuantFusion do;

with ``acc = sum_k (x[m, k] - z_x) * q[n, k]`` in int32 and every product of scales computed in
float32 at compile time exactly as ONNX Runtime computes it. QuantizeLinear and DequantizeLinear of
activations run as they are. Everything else runs in float32 with the plain C kernels; elementwise
arithmetic, Relu/Clip, max pooling and data movement are exact, while ops that call libm (exp,
tanh: Softmax, Sigmoid) or sum in a different order (float MatMul, AveragePool) are within a few
float32 ulps (the step records which).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from lbcc.errors import TargetError
from lbcc.targets.c.cformat import c_float, c_ident, c_int_list
from lbcc.targets.c.program import Program, Step, Tensor

_DTYPES = {ir.DataType.FLOAT: "f32", ir.DataType.UINT8: "u8", ir.DataType.INT8: "s8",
           ir.DataType.INT32: "s32", ir.DataType.INT64: "s64"}
_BINARY = {"Add": "LBCC_ADD", "Sub": "LBCC_SUB", "Mul": "LBCC_MUL", "Div": "LBCC_DIV",
           "Max": "LBCC_MAX", "Min": "LBCC_MIN"}
_UNARY = {"Relu": "LBCC_RELU", "Sigmoid": "LBCC_SIGMOID", "Tanh": "LBCC_TANH", "Exp": "LBCC_EXP",
          "Neg": "LBCC_NEG", "Sqrt": "LBCC_SQRT", "Reciprocal": "LBCC_RECIPROCAL",
          "Abs": "LBCC_ABS", "Identity": "LBCC_IDENTITY", "Clip": "LBCC_CLIP"}
_LIBM = {"Sigmoid", "Tanh", "Exp"}
_VIEWS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
SUPPORTED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "MatMul", "Conv", "Transpose",
                           "Concat", "Softmax", "Gather", "MaxPool", "AveragePool",
                           "GlobalAveragePool", *_BINARY, *_UNARY, *_VIEWS})
ULP_NOTE = "float32 within a few ulps of ONNX Runtime ({})"


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _scalar_qparams(dq_or_q: ir.Node) -> tuple[np.float32, int, str] | None:
    """(scale, zero point, 'u8'|'s8') of a per-tensor Q/DQ with constant parameters."""
    s = _const(dq_or_q.inputs[1])
    zv = dq_or_q.inputs[2] if len(dq_or_q.inputs) > 2 else None
    z = _const(zv)
    if s is None or s.size != 1 or (zv is not None and z is None):
        return None
    dtype = "u8" if z is None or z.dtype == np.uint8 else "s8" if z.dtype == np.int8 else None
    if dtype is None:
        return None
    return np.float32(s.reshape(())), int(z.reshape(())) if z is not None else 0, dtype


def _static_shape(v: ir.Value) -> tuple[int, ...]:
    if v.shape is None:
        raise TargetError(f"tensor {v.name!r} has no known shape; the c target plans memory "
                          "statically.", "Export the model with fixed input shapes.")
    dims = []
    for d in v.shape:
        if not isinstance(d, int):
            raise TargetError(f"tensor {v.name!r} has a dynamic dimension ({d}); the c target "
                              "plans memory statically.",
                              "Export the model with fixed shapes (e.g. batch 1, fixed length).")
        dims.append(d)
    return tuple(dims)


def broadcast_strides(shape: tuple[int, ...], out: tuple[int, ...]) -> list[int]:
    """Element strides of ``shape`` read along ``out`` (numpy broadcasting; 0 where repeated)."""
    pad = (1,) * (len(out) - len(shape)) + tuple(shape)
    strides, acc = [0] * len(out), 1
    for d in range(len(out) - 1, -1, -1):
        strides[d] = 0 if pad[d] == 1 and out[d] != 1 else acc
        acc *= pad[d]
    return strides


class Lowering:
    """Builds the Program; one instance per model."""

    def __init__(self, model: ir.Model):
        self.graph = model.graph
        self.tensors: dict[int, Tensor] = {}
        self.consts: list[Tensor] = []
        self.steps: list[Step] = []
        self.skip: set[int] = set()         # ids of nodes folded into a fused step
        self.fused: dict[int, dict[str, Any]] = {}  # id(MatMul/Conv) -> match
        self.symbols: set[str] = set()
        self.const_cache: dict[tuple, Tensor] = {}

    @staticmethod
    def _is_output(v: ir.Value) -> bool:
        return v.is_graph_output()

    # ------------------------------------------------------------------ tensors
    def tensor(self, v: ir.Value) -> Tensor:
        t = self.tensors.get(id(v))
        if t is not None:
            return t
        data = _const(v)
        if data is not None:
            t = self.const(np.asarray(data), v.name)
        else:
            dt = _DTYPES.get(v.dtype)
            if dt is None:
                raise TargetError(f"tensor {v.name!r} has dtype {v.dtype}; the c target runs "
                                  "float32, uint8, int8, int32 and int64 tensors.", "")
            t = Tensor(v.name, dt, _static_shape(v))
        self.tensors[id(v)] = t
        return t

    def const(self, data: np.ndarray, name: str) -> Tensor:
        data = np.ascontiguousarray(data)
        if data.dtype == np.float64:
            data = data.astype(np.float32)
        dt = {np.dtype(np.float32): "f32", np.dtype(np.uint8): "u8", np.dtype(np.int8): "s8",
              np.dtype(np.int32): "s32", np.dtype(np.int64): "s64"}.get(data.dtype)
        if dt is None:
            raise TargetError(f"constant {name!r} has dtype {data.dtype}; the c target stores "
                              "float32 and 8/32/64-bit integer constants.", "")
        key = (dt, data.shape, data.tobytes())
        if key in self.const_cache:
            return self.const_cache[key]
        t = Tensor(name, dt, tuple(int(d) for d in data.shape), kind="const", data=data,
                   symbol=c_ident(name, self.symbols, "w_"))
        self.consts.append(t)
        self.const_cache[key] = t
        return t

    def add(self, op: str, node: ir.Node, inputs: list[Tensor], outputs: list[Tensor],
            render: Callable[[Callable[[Tensor], str]], str], inplace=(), exactness="exact",
            info: dict | None = None):
        self.steps.append(Step(op, node.name or node.op_type, inputs, outputs, render,
                               list(inplace), exactness, info or {}))

    # ------------------------------------------------------------------ driver
    def run(self) -> Program:
        graph = self.graph
        inputs = []
        for v in graph.inputs:
            t = self.tensor(v)
            t.kind, t.symbol = "input", c_ident(v.name, self.symbols, "in_")
            inputs.append(t)
        outputs = []
        for v in graph.outputs:
            t = self.tensor(v)
            if t.kind != "arena":
                raise TargetError(f"graph output {v.name!r} is a graph input or a constant.",
                                  "The c target computes outputs from inputs.")
            t.kind, t.symbol = "output", c_ident(v.name, self.symbols, "out_")
            outputs.append(t)
        self._match_fusions()
        for node in graph:
            if id(node) in self.skip:
                continue
            if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
                raise TargetError(f"the c target has no kernel for {node.domain or 'ai.onnx'}::"
                                  f"{node.op_type} (node {node.name!r}).",
                                  f"Supported ops: {', '.join(sorted(SUPPORTED_OPS))}.")
            handler = getattr(self, f"_op_{node.op_type}", None)
            if handler is None:
                handler = self._op_binary if node.op_type in _BINARY else \
                    self._op_unary if node.op_type in _UNARY else self._op_view
            handler(node)
        consts = [c for c in self.consts if any(c in [*s.inputs] for s in self.steps)]
        return Program(inputs, outputs, consts, self.steps)

    # ------------------------------------------------------------------ fusions
    def _act_dq(self, v: ir.Value) -> tuple[ir.Node, tuple] | None:
        p = v.producer() if v is not None else None
        if p is None or p.op_type != "DequantizeLinear" or p.inputs[0].const_value is not None:
            return None
        qp = _scalar_qparams(p)
        return (p, qp) if qp is not None else None

    @staticmethod
    def _weight_dq(v: ir.Value, kind: str) -> tuple[list[ir.Node], np.ndarray, np.ndarray] | None:
        """(nodes, int8 weight with output channels first, per-output scales) or None."""
        p = v.producer() if v is not None else None
        nodes = []
        transposed = False
        if kind == "matmul" and p is not None and p.op_type == "Transpose" and \
                list(p.attributes.get_ints("perm", [1, 0])) == [1, 0]:
            nodes.append(p)
            p, transposed = p.inputs[0].producer(), True
        if p is None or p.op_type != "DequantizeLinear":
            return None
        q, s = _const(p.inputs[0]), _const(p.inputs[1])
        z = _const(p.inputs[2]) if len(p.inputs) > 2 and p.inputs[2] is not None else None
        if q is None or s is None or q.dtype != np.int8 or p.attributes.get_int("block_size", 0):
            return None
        if z is not None and np.any(z != 0):
            return None  # asymmetric int8 weights: not a pattern this target runs
        axis = p.attributes.get_int("axis", 1)
        if kind == "matmul":
            if q.ndim != 2:
                return None
            out_axis = 0 if transposed else 1
            if s.size != 1 and (axis % 2 != out_axis or s.size != q.shape[out_axis]):
                return None
            w = q if transposed else q.T
        else:  # conv: [C_out, C_in/g, kh, kw], per output channel
            if q.ndim != 4 or (s.size != 1 and (axis != 0 or s.size != q.shape[0])):
                return None
            w = q
        scales = np.broadcast_to(s.reshape(-1).astype(np.float32), (w.shape[0],))
        return [*nodes, p], np.ascontiguousarray(w), np.ascontiguousarray(scales)

    def _requant_q(self, out: ir.Value) -> tuple[ir.Node, tuple] | None:
        """The QuantizeLinear that ONNX Runtime folds into a QLinear op, if there is one."""
        uses = list(out.uses())
        if len(uses) != 1 or self._is_output(out):
            return None
        q = uses[0].node
        if id(q) in self.skip:  # a Relu/Clip that ONNX Runtime drops before this Q
            return self._requant_q(q.outputs[0])
        if q.op_type != "QuantizeLinear":
            return None
        qp = _scalar_qparams(q)
        return (q, qp) if qp is not None else None

    def _drop_clamps_before_q(self) -> None:
        """ONNX Runtime's ReluQuantFusion / ClipQuantFusion: a Relu (Clip) whose only use is a
        QuantizeLinear that clamps at least as much (zero point at the bottom of the 8-bit range;
        Clip bounds outside the quantized range) is removed, Q(relu(x)) = Q(x) exactly."""
        for node in self.graph:
            if node.op_type not in ("Relu", "Clip"):
                continue
            out = node.outputs[0]
            uses = list(out.uses())
            if len(uses) != 1 or self._is_output(out) or uses[0].node.op_type != "QuantizeLinear":
                continue
            qp = _scalar_qparams(uses[0].node)
            if qp is None:
                continue
            s, z, dt = qp
            qmin, qmax = (0, 255) if dt == "u8" else (-128, 127)
            if node.op_type == "Relu":
                if z != qmin:
                    continue
            else:
                lo = _const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
                    else np.float32(-np.inf)
                hi = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None \
                    else np.float32(np.inf)
                if lo is None or hi is None or float(lo) > float(np.float32(s) * (qmin - z)) or \
                        float(hi) < float(np.float32(s) * (qmax - z)):
                    continue
            self.skip.add(id(node))
            self.tensors[id(out)] = self.tensor(node.inputs[0])

    def _match_fusions(self) -> None:
        self._drop_clamps_before_q()
        claimed: dict[int, int] = {}  # id(DQ node) -> fused consumers
        for node in self.graph:
            if node.op_type == "MatMul":
                a = self._act_dq(node.inputs[0])
                w = self._weight_dq(node.inputs[1], "matmul")
                if a is None or w is None or w[1].shape[1] != _static_shape(node.inputs[0])[-1]:
                    continue
                bias = None
            elif node.op_type == "Conv":
                a = self._act_dq(node.inputs[0])
                w = self._weight_dq(node.inputs[1], "conv")
                if a is None or w is None:
                    continue
                bias = None
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    bp = node.inputs[2].producer()
                    bq = _const(bp.inputs[0]) if bp is not None and \
                        bp.op_type == "DequantizeLinear" else None
                    if bq is None or bq.dtype != np.int32:
                        continue  # a float bias: ONNX Runtime keeps this Conv in float
                    bias = (bp, bq.reshape(-1).astype(np.int32))
            else:
                continue
            q = self._requant_q(node.outputs[0])
            if node.op_type == "Conv" and q is None:
                continue  # ONNX Runtime has no Conv-to-float integer kernel
            self.fused[id(node)] = {"a": a, "w": w, "q": q, "bias": bias}
            for dq in [a[0], *w[0]] + ([bias[0]] if bias else []):
                claimed[id(dq)] = claimed.get(id(dq), 0) + 1
            if q is not None:
                self.skip.add(id(q[0]))
        for node in self.graph:  # Q(Mul(DQ(a), DQ(b))) -> QLinearMul
            if node.op_type != "Mul":
                continue
            a, b = self._act_dq(node.inputs[0]), self._act_dq(node.inputs[1])
            q = self._requant_q(node.outputs[0])
            if a is None or b is None or q is None or a[1][2] != b[1][2]:
                continue
            self.fused[id(node)] = {"a": a, "b": b, "q": q}
            for dq in (a[0], b[0]):
                claimed[id(dq)] = claimed.get(id(dq), 0) + 1
            self.skip.add(id(q[0]))
        for node in self.graph:  # embeddings: Gather rows of an int8 table, scale per row
            if node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0:
                continue
            p = node.inputs[0].producer()
            if p is None or p.op_type != "DequantizeLinear" or p.attributes.get_int("block_size", 0):
                continue
            q, s = _const(p.inputs[0]), _const(p.inputs[1])
            z = _const(p.inputs[2]) if len(p.inputs) > 2 and p.inputs[2] is not None else None
            if (q is None or s is None or q.dtype != np.int8 or q.ndim != 2
                    or (z is not None and np.any(z != 0))
                    or (s.size != 1 and (p.attributes.get_int("axis", 1) % 2 != 0
                                         or s.size != q.shape[0]))):
                continue
            scales = np.broadcast_to(s.reshape(-1).astype(np.float32), (q.shape[0],))
            self.fused[id(node)] = {"table": q, "scales": np.ascontiguousarray(scales)}
            claimed[id(p)] = claimed.get(id(p), 0) + 1
        for node in self.graph:
            if node.op_type in ("DequantizeLinear", "Transpose") and id(node) in claimed:
                if claimed[id(node)] == len(list(node.outputs[0].uses())) and \
                        not self._is_output(node.outputs[0]):
                    self.skip.add(id(node))

    # ------------------------------------------------------------------ integer ops
    def _op_MatMul(self, node: ir.Node) -> None:
        m = self.fused.get(id(node))
        if m is None:
            return self._float_matmul(node)
        (_, (s_a, z_a, dt_a)), (_, w, s_w), q = m["a"], m["w"], m["q"]
        x = self.tensor(node.inputs[0].producer().inputs[0])
        n, k = w.shape
        rows = x.size // k
        wt = self.const(w, f"{node.name}_weight")
        wsum = self.const(w.astype(np.int32).sum(axis=1).astype(np.int32), f"{node.name}_wsum")
        prod = (np.float32(s_a) * s_w).astype(np.float32)  # ORT: a_scale * b_scale[n], float32
        signed_a = int(dt_a == "s8")
        if q is None:
            mult = self.const(prod, f"{node.name}_mult")
            y = self.tensor(node.outputs[0])
            self.add("qmatmul -> f32 (MatMulIntegerToFloat)", node, [x, wt, wsum, mult], [y],
                     lambda r: f"lbcc_qmatmul_f32({r(x)}, {signed_a}, {z_a}, {r(wt)}, {r(wsum)}, "
                               f"{r(mult)}, NULL, {r(y)}, {rows}, {k}, {n});")
        else:
            qnode, (s_y, z_y, dt_y) = q
            mult = self.const((prod / np.float32(s_y)).astype(np.float32), f"{node.name}_mult")
            y = self.tensor(qnode.outputs[0])
            self.add("qmatmul -> 8-bit (QLinearMatMul)", node, [x, wt, wsum, mult], [y],
                     lambda r: f"lbcc_qmatmul_q8({r(x)}, {signed_a}, {z_a}, {r(wt)}, {r(wsum)}, "
                               f"{r(mult)}, {r(y)}, {int(dt_y == 's8')}, {z_y}, {rows}, {k}, {n});")

    def _op_Conv(self, node: ir.Node) -> None:
        m = self.fused.get(id(node))
        if m is None:
            raise TargetError(f"Conv {node.name!r} is not quantized (QDQ on its input, weight, "
                              "int32 bias and output); the c target runs Conv in int8 only.",
                              "Quantize the model's convolutions (the w8a8 preset does).")
        (_, (s_a, z_a, dt_a)), (_, w, s_w), (qnode, (s_y, z_y, dt_y)) = m["a"], m["w"], m["q"]
        x, y = self.tensor(node.inputs[0].producer().inputs[0]), self.tensor(qnode.outputs[0])
        xs, ys = x.shape, y.shape
        if len(xs) != 4:
            raise TargetError(f"Conv {node.name!r}: only 2-D convolutions (NCHW) are supported.",
                              "")
        kh, kw = w.shape[2], w.shape[3]
        strides = node.attributes.get_ints("strides", [1, 1])
        dil = node.attributes.get_ints("dilations", [1, 1])
        pads = node.attributes.get_ints("pads", [0, 0, 0, 0])
        group = node.attributes.get_int("group", 1)
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise TargetError(f"Conv {node.name!r}: auto_pad SAME_* is not supported.",
                              "Export with explicit pads.")
        wt = self.const(w, f"{node.name}_weight")
        prod = (np.float32(s_a) * s_w).astype(np.float32)
        mult = self.const((prod / np.float32(s_y)).astype(np.float32), f"{node.name}_mult")
        ins = [x, wt, mult]
        bias = "NULL"
        if m["bias"] is not None:
            bt = self.const(m["bias"][1], f"{node.name}_bias")
            ins.append(bt)
        shape = [xs[0], xs[1], xs[2], xs[3], ys[1], ys[2], ys[3], kh, kw, strides[0], strides[1],
                 dil[0], dil[1], pads[0], pads[1], group]

        def render(r):
            b = r(ins[3]) if m["bias"] is not None else bias
            return (f"{{ static const lbcc_conv_shape s = {c_int_list(shape)};\n"
                    f"      lbcc_qconv2d(&s, {r(x)}, {int(dt_a == 's8')}, {z_a}, {r(wt)}, {b}, "
                    f"{r(mult)}, {r(y)}, {int(dt_y == 's8')}, {z_y}, NULL); }}")
        self.add("qconv2d -> 8-bit (QLinearConv)", node, ins, [y], render)

    def _activation_qdq(self, node: ir.Node, unsupported: str):
        """(scale, zero point, 'u8'|'s8', input, output) of a Quantize/DequantizeLinear on an
        activation with per-tensor constant parameters; a TargetError naming the node and
        saying ``unsupported`` otherwise."""
        qp = _scalar_qparams(node)
        if qp is None:
            raise TargetError(f"{node.op_type} {node.name!r}: {unsupported}", "")
        return (*qp, self.tensor(node.inputs[0]), self.tensor(node.outputs[0]))

    def _op_QuantizeLinear(self, node: ir.Node) -> None:
        s, z, dt, x, y = self._activation_qdq(node, "only per-tensor constant scale and 8-bit "
                                                    "zero point are supported.")
        self.add("quantize", node, [x], [y],
                 lambda r: f"lbcc_quantize_{dt}({r(x)}, {r(y)}, {x.size}, {c_float(s)}, {z});",
                 inplace=[(0, 0)], info={"tensor": x.name, "scale": float(s), "zero_point": z,
                                         "dtype": "uint8" if dt == "u8" else "int8"})

    def _op_DequantizeLinear(self, node: ir.Node) -> None:
        if node.inputs[0].const_value is not None:  # a weight used in float: dequantize it now
            q = _const(node.inputs[0]).astype(np.int32)
            s = _const(node.inputs[1]).astype(np.float32)
            z = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None \
                else np.zeros_like(s, np.int32)
            axis = node.attributes.get_int("axis", 1) % q.ndim
            block = node.attributes.get_int("block_size", 0)
            if block:  # blocked: scale [.., K/g, ..] repeats g times along the axis
                s = np.repeat(s, block, axis=axis).take(range(q.shape[axis]), axis=axis)
                z = np.repeat(z, block, axis=axis).take(range(q.shape[axis]), axis=axis)
            elif s.size != 1:
                shape = [1] * q.ndim
                shape[axis] = s.size
                s, z = s.reshape(shape), z.reshape(shape)
            deq = ((q - z.astype(np.int32)).astype(np.float32) * s).astype(np.float32)
            self.tensors[id(node.outputs[0])] = self.const(deq, node.outputs[0].name)
            return
        s, z, dt, x, y = self._activation_qdq(node, "only per-tensor activation quantization "
                                                    "is supported.")
        self.add("dequantize", node, [x], [y],
                 lambda r: f"lbcc_dequantize_{dt}({r(x)}, {r(y)}, {x.size}, {c_float(s)}, {z});")

    # ------------------------------------------------------------------ float ops
    def _float_matmul(self, node: ir.Node) -> None:
        a, b, y = (self.tensor(v) for v in (node.inputs[0], node.inputs[1], node.outputs[0]))
        if len(a.shape) < 2 or len(b.shape) < 2:
            raise TargetError(f"MatMul {node.name!r}: 1-D operands are not supported.", "")
        k, n = b.shape[-2], b.shape[-1]
        if len(b.shape) == 2:
            batch, m, sa, sb = 1, a.size // k, 0, 0
        else:
            m = a.shape[-2]
            batch = y.size // (m * n)
            if a.shape[:-2] != b.shape[:-2] or a.size != batch * m * k:
                raise TargetError(f"MatMul {node.name!r}: broadcast batch dimensions "
                                  f"{a.shape} x {b.shape} are not supported.", "")
            sa, sb = m * k, k * n
        self.add("matmul f32", node, [a, b], [y],
                 lambda r: f"lbcc_matmul_f32({r(a)}, {r(b)}, {r(y)}, {batch}, {m}, {k}, {n}, "
                           f"{sa}, {sb});", exactness=ULP_NOTE.format("summation order"))

    def _qmul(self, node: ir.Node, m: dict) -> None:
        """QLinearMul as ONNX Runtime's x86 kernel computes it (see lbcc_qmul_q8)."""
        (_, (s_a, z_a, dt)), (_, (s_b, z_b, _)), (qnode, (s_y, z_y, dt_y)) = m["a"], m["b"], m["q"]
        a = self.tensor(node.inputs[0].producer().inputs[0])
        b = self.tensor(node.inputs[1].producer().inputs[0])
        y = self.tensor(qnode.outputs[0])
        ratio = np.float32(np.float32(s_a) * np.float32(s_b)) / np.float32(s_y)
        shape = list(y.shape) or [1]
        sa = broadcast_strides(a.shape, y.shape) or [0]
        sb = broadcast_strides(b.shape, y.shape) or [0]
        rank = len(shape)
        self.add("qmul -> 8-bit (QLinearMul)", node, [a, b], [y],
                 lambda r: (f"{{ static const int32_t sa[] = {c_int_list(sa)}, sb[] = "
                            f"{c_int_list(sb)}, sh[] = {c_int_list(shape)};\n"
                            f"      lbcc_qmul_q8({r(a)}, sa, {z_a}, {r(b)}, sb, {z_b}, "
                            f"{int(dt == 's8')}, {c_float(ratio)}, {r(y)}, {int(dt_y == 's8')}, "
                            f"{z_y}, sh, {rank}); }}"))

    def _op_binary(self, node: ir.Node) -> None:
        if node.op_type == "Mul" and id(node) in self.fused:
            return self._qmul(node, self.fused[id(node)])
        a, b, y = (self.tensor(v) for v in (node.inputs[0], node.inputs[1], node.outputs[0]))
        if y.dtype != "f32":
            raise TargetError(f"{node.op_type} {node.name!r}: only float32 elementwise "
                              f"arithmetic is supported, not {y.dtype}.", "")
        out = y.shape
        sa, sb = broadcast_strides(a.shape, out), broadcast_strides(b.shape, out)
        rank = max(len(out), 1)
        if rank > 6:
            raise TargetError(f"{node.op_type} {node.name!r}: rank {rank} > 6.", "")
        shape = list(out) or [1]
        sa, sb = sa or [0], sb or [0]
        op = _BINARY[node.op_type]
        inplace = [(0, i) for i, t in enumerate((a, b)) if t.shape == out and t.dtype == "f32"]
        self.add(f"{node.op_type.lower()} f32", node, [a, b], [y],
                 lambda r: (f"{{ static const int32_t sa[] = {c_int_list(sa)}, sb[] = "
                            f"{c_int_list(sb)}, sh[] = {c_int_list(shape)};\n"
                            f"      lbcc_binary_f32({op}, {r(a)}, sa, {r(b)}, sb, {r(y)}, sh, "
                            f"{rank}); }}"), inplace=inplace)

    def _op_unary(self, node: ir.Node) -> None:
        x, y = self.tensor(node.inputs[0]), self.tensor(node.outputs[0])
        lo, hi = -np.inf, np.inf
        if node.op_type == "Clip":
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                lo = float(_const(node.inputs[1]))
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                hi = float(_const(node.inputs[2]))
        if x.dtype != "f32":
            raise TargetError(f"{node.op_type} {node.name!r}: only float32 is supported.", "")
        op = _UNARY[node.op_type]
        self.add(f"{node.op_type.lower()} f32", node, [x], [y],
                 lambda r: f"lbcc_unary_f32({op}, {r(x)}, {r(y)}, {x.size}, {c_float(lo)}, "
                           f"{c_float(hi)});", inplace=[(0, 0)],
                 exactness=ULP_NOTE.format("libm") if node.op_type in _LIBM else "exact")

    def _op_view(self, node: ir.Node) -> None:
        x = self.tensor(node.inputs[0])
        out = node.outputs[0]
        y = self.tensor(out)
        if y.kind == "output":  # the caller's buffer: copy into it
            self.add("copy", node, [x], [y],
                     lambda r: f"lbcc_copy({r(x)}, {r(y)}, {x.nbytes});")
            return
        view = Tensor(out.name, x.dtype, y.shape, kind="view", base=x)
        self.tensors[id(out)] = view

    def _op_Transpose(self, node: ir.Node) -> None:
        x, y = self.tensor(node.inputs[0]), self.tensor(node.outputs[0])
        rank = len(x.shape)
        perm = list(node.attributes.get_ints("perm", list(range(rank))[::-1]))
        in_strides = [int(np.prod(x.shape[d + 1:], dtype=np.int64)) for d in range(rank)]
        strides = [in_strides[p] for p in perm]
        elem = x.nbytes // max(x.size, 1)
        self.add("transpose", node, [x], [y],
                 lambda r: (f"{{ static const int32_t sh[] = {c_int_list(y.shape)}, st[] = "
                            f"{c_int_list(strides)};\n"
                            f"      lbcc_transpose({r(x)}, {r(y)}, {elem}, sh, st, {rank}); }}"))

    def _op_Concat(self, node: ir.Node) -> None:
        xs = [self.tensor(v) for v in node.inputs]
        y = self.tensor(node.outputs[0])
        axis = node.attributes.get_int("axis", 0) % len(y.shape)
        inner = int(np.prod(y.shape[axis + 1:], dtype=np.int64))
        outer = int(np.prod(y.shape[:axis], dtype=np.int64))
        elem = y.nbytes // max(y.size, 1)
        parts, off = [], 0
        for x in xs:
            parts.append((x, x.shape[axis] * inner, off))
            off += x.shape[axis] * inner
        yb = y.shape[axis] * inner
        self.add("concat", node, xs, [y],
                 lambda r: "\n    ".join(f"lbcc_concat_part({r(x)}, {r(y)}, {elem}, {outer}, "
                                         f"{xb}, {yb}, {o});" for x, xb, o in parts))

    def _op_Softmax(self, node: ir.Node) -> None:
        x, y = self.tensor(node.inputs[0]), self.tensor(node.outputs[0])
        axis = node.attributes.get_int("axis", -1) % len(x.shape)
        if axis != len(x.shape) - 1:
            raise TargetError(f"Softmax {node.name!r}: only the last axis is supported.", "")
        cols = x.shape[-1]
        self.add("softmax f32", node, [x], [y],
                 lambda r: f"lbcc_softmax_f32({r(x)}, {r(y)}, {x.size // cols}, {cols});",
                 inplace=[(0, 0)], exactness=ULP_NOTE.format("libm expf"))

    def _op_Gather(self, node: ir.Node) -> None:
        m = self.fused.get(id(node))
        if m is not None:  # int8 rows, dequantized as DequantizeLinear does: (float)q * s[row]
            table = self.const(m["table"], f"{node.name}_table")
            scales = self.const(m["scales"], f"{node.name}_row_scales")
            ids, y = self.tensor(node.inputs[1]), self.tensor(node.outputs[0])
            if ids.dtype != "s64":
                raise TargetError(f"Gather {node.name!r}: only int64 indices.", "")
            rows, cols = m["table"].shape
            self.add("gather int8 rows", node, [table, scales, ids], [y],
                     lambda r: f"lbcc_gather_dq_s8({r(table)}, {r(scales)}, {r(ids)}, {r(y)}, "
                               f"{cols}, {ids.size}, {rows});")
            return
        table, ids, y = (self.tensor(v) for v in (node.inputs[0], node.inputs[1],
                                                  node.outputs[0]))
        if node.attributes.get_int("axis", 0) != 0 or ids.dtype != "s64":
            raise TargetError(f"Gather {node.name!r}: only axis 0 with int64 indices.", "")
        row = table.nbytes // table.shape[0]
        self.add("gather rows", node, [table, ids], [y],
                 lambda r: f"lbcc_gather_rows({r(table)}, {r(ids)}, {r(y)}, {row}, {ids.size}, "
                           f"{table.shape[0]});")

    def _pool_shape(self, node: ir.Node, x: Tensor, y: Tensor, global_: bool) -> list[int]:
        if len(x.shape) != 4:
            raise TargetError(f"{node.op_type} {node.name!r}: only 2-D pooling (NCHW).", "")
        if global_:
            k, s, p = [x.shape[2], x.shape[3]], [1, 1], [0, 0, 0, 0]
        else:
            k = list(node.attributes.get_ints("kernel_shape"))
            s = list(node.attributes.get_ints("strides", [1, 1]))
            p = list(node.attributes.get_ints("pads", [0, 0, 0, 0]))
            if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or \
                    list(node.attributes.get_ints("dilations", [1, 1])) != [1, 1]:
                raise TargetError(f"{node.op_type} {node.name!r}: auto_pad SAME_* and dilations "
                                  "are not supported.", "")
        cip = node.attributes.get_int("count_include_pad", 0)
        return [x.shape[0], x.shape[1], x.shape[2], x.shape[3], y.shape[2], y.shape[3], k[0],
                k[1], s[0], s[1], p[0], p[1], p[2], p[3], cip]

    def _pool(self, node: ir.Node, kind: str, global_: bool = False) -> None:
        x, y = self.tensor(node.inputs[0]), self.tensor(node.outputs[0])
        shape = self._pool_shape(node, x, y, global_)
        if kind == "max" and x.dtype in ("u8", "s8"):
            call = f"lbcc_maxpool_q8(&s, {{x}}, {int(x.dtype == 's8')}, {{y}})"
        elif x.dtype == "f32":
            call = f"lbcc_{kind}pool_f32(&s, {{x}}, {{y}})"
        else:
            raise TargetError(f"{node.op_type} {node.name!r}: dtype {x.dtype} not supported.", "")
        self.add(f"{kind}pool", node, [x], [y],
                 lambda r: (f"{{ static const lbcc_pool_shape s = {c_int_list(shape)};\n"
                            f"      " + call.format(x=r(x), y=r(y)) + "; }"),
                 exactness="exact" if kind == "max" else ULP_NOTE.format("summation order"))

    def _op_MaxPool(self, node: ir.Node) -> None:
        if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
            raise TargetError(f"MaxPool {node.name!r}: the Indices output is not supported.", "")
        self._pool(node, "max")

    def _op_AveragePool(self, node: ir.Node) -> None:
        self._pool(node, "avg")

    def _op_GlobalAveragePool(self, node: ir.Node) -> None:
        self._pool(node, "avg", global_=True)


def lower(model: ir.Model) -> Program:
    """The Program for ``model`` (a TargetError names the first op or tensor it cannot run)."""
    return Lowering(model).run()
