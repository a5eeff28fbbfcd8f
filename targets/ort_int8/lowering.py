"""``lower-ort``: turn the standard-ONNX quantized patterns into ONNX Runtime's integer kernels.

Patterns (W stored as produced by ``round-weights-rtn``; x float; q int):

- 4-bit or 8-bit blocked weights, float / dynamic-block activations:
  ``MatMul(x, DQ(q[K,N], axis=0, block=g))`` or ``MatMul(x, Transpose(DQ(q[N,K], axis=1, block=g)))``
  -> ``MatMulNBits(x, pack(q as [N, K/g, g]), scales[N*K/g], zero_points)`` (com.microsoft),
  ``accuracy_level=4``: activations quantized to int8 per block at run time, int8 dot products.
- tied lm_head with per-channel int8: ``MatMul(X, Transpose(DQ(q[N,K], axis=0)))``
  -> ``MatMul(X, DQ(q^T[K,N], axis=1))`` so that ONNX Runtime's QDQ fusion sees the usual form.
- ``MatMul(DQ(DynamicQuantizeLinear(x)), DQ(q[K,N] int8, axis=1))``
  -> ``DynamicQuantizeMatMul(x, q, scale[N])`` (com.microsoft).
- embedding ``Gather(DQ(q[V,D]...), ids)``:
  4-bit blocked -> ``GatherBlockQuantized`` (com.microsoft, uint8 nibble-packed data);
  int8 per row -> ``Mul(Cast(Gather(q, ids)), Unsqueeze(Gather(scale, ids)))``, which reads the
  same int8 table the lm_head uses when the two are tied.
- static QDQ (``MatMul(DQ(Q(x)), DQ(q[K,N] int8, axis=1))``) is left as it is: ONNX Runtime fuses
  it into ``MatMulIntegerToFloat`` at load time.
- per-token dynamic activations (plan ``dynamic-token``, per-channel int8 weights):
  ``s = max(ReduceMax(|x|, -1) / 127, tiny)``, ``u = QuantizeLinear(x / s, 1, 128)`` (uint8, once
  per input tensor), ``y = MatMulIntegerToFloat(u, q, 1, w_scale, 128, zp) * s``: ONNX Runtime's
  integer kernel with the per-row scale applied after it (its own scales are per tensor).
- FP8 E4M3 weights (``DQ(q float8e4m3fn, axis)``) become ``Mul(Cast(q, float), s)``, which ONNX
  Runtime folds into a float weight at load time, and stay a float ``MatMul`` on their values
  (its CPU provider has no FP8 products); with ``dynamic-token`` activations the input
  becomes ``Cast(Cast(x / s, float8e4m3fn), float) `` with ``s = max|x| / 448`` per row and the
  product is multiplied by ``s``: the triton target's FP8 numerics, for accuracy, not speed.
- ``uint8_weights`` (the recipe's ``weights.saturation_safe``): the int8 weights of static and
  dynamic per-tensor layers are stored as ``q + 128`` (uint8) with zero point 128. The value
  ``DQ`` gives is unchanged; ONNX Runtime then runs u8 x u8 kernels, which widen both operands
  to 16 bits before multiplying, where its x86 u8 x s8 kernels without VNNI add pairs of
  products in 16 bits with saturation (255 * 127 * 2 > 2^15).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from lbcc.errors import TargetError
from lbcc.irutils import add_initializer, copy_identity, layer_name
from lbcc.numerics import pack_uint4
from lbcc.pipeline import Pass
from lbcc.passes.precision import plan_of

MS = "com.microsoft"


def _dq_parts(dq: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int | None]:
    q = dq.inputs[0].const_value.numpy()
    scale = dq.inputs[1].const_value.numpy()
    zp = dq.inputs[2].const_value.numpy() if len(dq.inputs) > 2 and dq.inputs[2] is not None \
        else None
    axis = dq.attributes.get_int("axis", 1)
    block = dq.attributes.get_int("block_size", 0) or None
    return q, scale, zp, axis, block


def _weight_dq(node: ir.Node) -> tuple[ir.Node | None, bool]:
    """(DQ node feeding the MatMul weight, whether through a Transpose)."""
    w = node.inputs[1]
    p = w.producer() if w is not None else None
    if p is not None and p.op_type == "DequantizeLinear" and p.inputs[0].const_value is not None:
        return p, False
    if p is not None and p.op_type == "Transpose":
        pp = p.inputs[0].producer()
        if pp is not None and pp.op_type == "DequantizeLinear" and \
                pp.inputs[0].const_value is not None:
            return pp, True
    return None, False


def _out_major(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, transposed: bool
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Integer weight, scales and zero points as [N, K] / [N, nb] whatever the storage."""
    if transposed:  # stored [N, K] already
        return q, scale, zp
    return q.T, scale.T, (zp.T if zp is not None else None)


class LowerORT(Pass):
    """Pattern lowering to MatMulNBits / DynamicQuantizeMatMul / GatherBlockQuantized."""

    name = "lower-ort"

    def __init__(self, accuracy_level: int = 4, uint8_weights: bool = True):
        super().__init__()
        self.accuracy_level = accuracy_level
        self.uint8_weights = uint8_weights

    def options(self) -> dict[str, Any]:
        return {"accuracy_level": self.accuracy_level, "uint8_weights": self.uint8_weights}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        counts: dict[str, int] = {}
        layers = self.context.notes.setdefault("layers", {})
        self._nbits: dict[int, dict[str, Any]] = {}  # id(DQ node) -> MatMulNBits initializers
        self._transposed_int8: dict[int, ir.Value] = {}  # id(DQ node) -> its q^T [K, N]
        # (id(x), fp8) -> (quantized x, scale)
        self._per_token: dict[tuple[int, bool], tuple[ir.Value, ir.Value]] = {}
        self._consts: dict[str, ir.Value] = {}

        fp8_weights: dict[int, ir.Node] = {}

        def bump(key: str, node: ir.Node, lowered_to: str) -> None:
            counts[key] = counts.get(key, 0) + 1
            if node.name in layers:
                layers[node.name]["lowered_to"] = lowered_to

        for node in list(graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "MatMul":
                dq, transposed = _weight_dq(node)
                if dq is None:
                    continue
                plan = plan_of(node) or {}
                if dq.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN:
                    fp8_weights.setdefault(id(dq), dq)
                    if plan.get("activation") == "dynamic-token":
                        self._to_fp8_token_matmul(graph, node)
                    bump("FP8 MatMul (in float)", node, "E4M3 values in a float MatMul"
                         + (", E4M3 activations per token" if plan.get("activation") ==
                            "dynamic-token" else ""))
                    continue
                _, _, _, axis, block = _dq_parts(dq)
                group = (plan.get("weight") or {}).get("group_size")
                if block is None and group and plan.get("activation") in ("none",
                                                                         "dynamic-block"):
                    block = group  # K <= group: one group (zero-padded) per output channel
                if block is not None:
                    self._to_matmulnbits(graph, node, dq, transposed, block)
                    bump("MatMulNBits", node, "com.microsoft::MatMulNBits")
                elif plan.get("activation") == "dynamic":
                    self._to_dynamic_quantize_matmul(graph, node, dq, transposed)
                    bump("DynamicQuantizeMatMul", node, "com.microsoft::DynamicQuantizeMatMul")
                elif plan.get("activation") == "dynamic-token":
                    self._to_per_token_matmul(graph, node, dq, transposed)
                    bump("per-token MatMulIntegerToFloat", node,
                         "per-token int8 -> com.microsoft::MatMulIntegerToFloat")
                elif transposed:
                    self._untranspose(graph, node, dq)
                    bump("QDQ MatMul (transposed weight re-stored)", node,
                         "QDQ MatMul -> MatMulIntegerToFloat")
                else:
                    if self._offset_weight(node):
                        self._store_uint8(graph, node, dq, dq.inputs[0].const_value.numpy(),
                                          dq.inputs[0].name.removesuffix("_q"))
                    bump("QDQ MatMul", node, "QDQ MatMul -> MatMulIntegerToFloat")
        for node in list(graph):
            if node.op_type == "Gather" and node.domain in ("", "ai.onnx"):
                p = node.inputs[0].producer()
                if p is None or p.op_type != "DequantizeLinear" or \
                        p.inputs[0].const_value is None:
                    continue
                block = p.attributes.get_int("block_size", 0) or None
                if block is None and id(p) in self._nbits:  # tied with a one-group lm_head
                    block = self._nbits[id(p)]["block"]
                if block is not None:
                    self._to_gather_block_quantized(graph, node, p, block)
                    bump("GatherBlockQuantized", node, "com.microsoft::GatherBlockQuantized")
                else:
                    self._to_int8_gather(graph, node, p)
                    bump("int8 Gather", node, "Gather(int8) * Gather(scale)")
        for dq in fp8_weights.values():
            self._fp8_weight_as_cast(graph, dq)
        if any(n.domain == MS for n in graph):
            model.opset_imports.setdefault(MS, 1)
        self.note("lowered", counts)
        return ir.passes.PassResult(model, modified=bool(counts))

    # --- uint8 storage of int8 weights
    def _offset_weight(self, node: ir.Node) -> bool:
        """Whether this MatMul's int8 weight is stored as uint8 (see the module docstring)."""
        plan = plan_of(node) or {}
        return self.uint8_weights and plan.get("activation") in ("static", "dynamic",
                                                                  "dynamic-token")

    @staticmethod
    def _uint8_parts(graph: ir.Graph, base: str, q: np.ndarray, zp: np.ndarray | None,
                     n: int) -> tuple[ir.Value, ir.Value]:
        """(q + 128 as uint8, its zero points zp + 128 (128 when symmetric)) as initializers."""
        if q.dtype != np.int8:
            raise TargetError(f"weight {base!r}: uint8 storage needs int8 weights, got {q.dtype}.",
                              "Use 8-bit weights or set weights.saturation_safe = false.")
        qu = (q.astype(np.int16) + 128).astype(np.uint8)
        zpu = np.full(n, 128, np.uint8) if zp is None else \
            (zp.astype(np.int16).reshape(-1) + 128).astype(np.uint8)
        return (add_initializer(graph, f"{base}_u8", np.ascontiguousarray(qu)),
                add_initializer(graph, f"{base}_u8_zero_point", zpu))

    def _store_uint8(self, graph: ir.Graph, node: ir.Node, dq: ir.Node, q: np.ndarray,
                     base: str) -> ir.Value:
        """Replace the weight DQ of ``node`` by one reading uint8 storage of q[K, N] (axis 1)."""
        zp = dq.inputs[2].const_value.numpy() if len(dq.inputs) > 2 and \
            dq.inputs[2] is not None else None
        qu, zpu = self._uint8_parts(graph, base, q, zp, q.shape[1])
        new_dq = ir.node("DequantizeLinear", [qu, dq.inputs[1], zpu], attributes={"axis": 1},
                         name=f"{base}_u8_dq")
        copy_identity(node, new_dq)
        new_dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        new_dq.outputs[0].shape = node.inputs[1].shape
        graph.insert_before(node, new_dq)
        node.replace_input_with(1, new_dq.outputs[0])
        return qu

    # --- MatMulNBits
    def _to_matmulnbits(self, graph: ir.Graph, node: ir.Node, dq: ir.Node, transposed: bool,
                        block: int) -> None:
        q, scale, zp, axis, _ = _dq_parts(dq)
        if scale.ndim == 1:  # per channel: one group of K per output channel
            scale = scale.reshape(1, -1) if axis == 1 else scale.reshape(-1, 1)
            zp = None if zp is None else zp.reshape(scale.shape)
        q, scale, zp = _out_major(q, scale, zp, transposed)
        n, k = q.shape
        nb = scale.shape[1]
        bits = 4 if q.dtype.itemsize == 1 and str(q.dtype) in ("int4", "uint4") else 8
        signed = str(q.dtype) in ("int4", "int8")
        offset = 2 ** (bits - 1) if signed else 0
        qu = (q.astype(np.int16) + offset).astype(np.uint8)  # MatMulNBits stores unsigned
        padded = np.zeros((n, nb * block), np.uint8)
        padded[:, :k] = qu
        if signed:
            padded[:, k:] = offset
        blocks = padded.reshape(n, nb, block)
        packed = pack_uint4(blocks) if bits == 4 else blocks
        base = dq.inputs[0].name.removesuffix("_q")
        inputs = [node.inputs[0],
                  add_initializer(graph, f"{base}_nbits", np.ascontiguousarray(packed)),
                  add_initializer(graph, f"{base}_nbits_scales",
                                  np.ascontiguousarray(scale.reshape(-1), np.float32))]
        if zp is not None:
            zpu = (zp.astype(np.int16) + offset).astype(np.uint8)
            zp_packed = pack_uint4(zpu).reshape(-1) if bits == 4 else zpu.reshape(-1)
            inputs.append(add_initializer(graph, f"{base}_nbits_zero_points",
                                          np.ascontiguousarray(zp_packed)))
        self._nbits[id(dq)] = {"B": inputs[1], "scales": inputs[2],
                               "zero_points": inputs[3] if len(inputs) > 3 else None,
                               "K": k, "N": n, "block": block, "bits": bits}
        new = ir.node("MatMulNBits", inputs, domain=MS, name=f"{node.name}_nbits",
                      attributes={"K": k, "N": n, "bits": bits, "block_size": block,
                                  "accuracy_level": self.accuracy_level})
        self._replace(graph, node, new)

    # --- DynamicQuantizeMatMul
    def _to_dynamic_quantize_matmul(self, graph: ir.Graph, node: ir.Node, dq: ir.Node,
                                    transposed: bool) -> None:
        x = node.inputs[0]
        xp = x.producer()
        if xp is None or xp.op_type != "DequantizeLinear":
            raise self.fail("dynamic activation plan without a DynamicQuantizeLinear input",
                            node=node)
        dql = xp.inputs[0].producer()
        raw_x = dql.inputs[0]
        q, scale, zp, axis, _ = _dq_parts(dq)
        if transposed:
            q, scale = q.T, scale
        if q.dtype != np.int8:
            raise TargetError(f"layer {layer_name(node)!r}: DynamicQuantizeMatMul needs int8 "
                              f"weights, got {q.dtype}.", "Use symmetric 8-bit weights.")
        base = dq.inputs[0].name.removesuffix("_q")
        scale_v = add_initializer(graph, f"{base}_dqmm_scale",
                                  np.ascontiguousarray(scale.reshape(-1), np.float32))
        if self._offset_weight(node):
            qv, zpv = self._uint8_parts(graph, f"{base}_dqmm", np.ascontiguousarray(q), None,
                                        q.shape[1])
            inputs = [raw_x, qv, scale_v, zpv]
        else:
            qv = add_initializer(graph, f"{base}_dqmm", np.ascontiguousarray(q))
            inputs = [raw_x, qv, scale_v]
        if transposed:
            self._transposed_int8[id(dq)] = qv
        new = ir.node("DynamicQuantizeMatMul", inputs, domain=MS, name=f"{node.name}_dqmm")
        self._replace(graph, node, new)

    # --- per-token dynamic int8 / FP8
    def _token_quantize(self, graph: ir.Graph, node: ir.Node, fp8: bool = False
                        ) -> tuple[ir.Value, ir.Value]:
        """(quantized x, per-row scale [..., 1]) of ``node``'s input, made once per input tensor
        and inserted before its first quantized consumer: uint8 with zero point 128 and
        s = max|x| / 127, or (``fp8``) the E4M3 values back in float with s = max|x| / 448
        (``Cast`` to float8e4m3fn rounds to nearest even and saturates)."""
        x = node.inputs[0]
        if (id(x), fp8) in self._per_token:
            return self._per_token[(id(x), fp8)]
        base = x.name or node.name
        qmax, tag = (448, "fp8_") if fp8 else (127, "")

        def const(name: str, value: np.ndarray) -> ir.Value:
            return self._shared_const(graph, name, value)
        nodes = [ir.node("Abs", [x])]
        nodes.append(ir.node("ReduceMax", [nodes[-1].outputs[0],
                                           const("per_token_axes", np.array([-1], np.int64))],
                             attributes={"keepdims": 1}))
        nodes.append(ir.node("Mul", [nodes[-1].outputs[0],
                                     const(f"per_token_inv{qmax}",
                                           np.array(1 / qmax, np.float32))]))
        nodes.append(ir.node("Max", [nodes[-1].outputs[0],
                                     const("per_token_tiny", np.array(1e-30, np.float32))],
                             name=f"{base}_{tag}token_scale"))
        scale = nodes[-1].outputs[0]
        nodes.append(ir.node("Div", [x, scale]))
        if fp8:
            nodes.append(ir.node("Cast", [nodes[-1].outputs[0]],
                                 attributes={"to": ir.DataType.FLOAT8E4M3FN, "saturate": 1}))
            nodes.append(ir.node("Cast", [nodes[-1].outputs[0]],
                                 attributes={"to": ir.DataType.FLOAT},
                                 name=f"{base}_fp8_token_quantize"))
        else:
            nodes.append(ir.node("QuantizeLinear", [nodes[-1].outputs[0],
                                                    const("per_token_one",
                                                          np.array(1, np.float32)),
                                                    const("per_token_zero_point",
                                                          np.array(128, np.uint8))],
                                 name=f"{base}_token_quantize"))
        for n in nodes:
            copy_identity(node, n)
        graph.insert_before(node, nodes)
        self._per_token[(id(x), fp8)] = (nodes[-1].outputs[0], scale)
        return self._per_token[(id(x), fp8)]

    @staticmethod
    def _fp8_weight_as_cast(graph: ir.Graph, dq: ir.Node) -> None:
        """``DQ(q e4m3, s, axis)`` -> ``Mul(Cast(q, float), s)`` (s shaped to broadcast along
        the axis): the same float32 values, which ONNX Runtime folds into a float initializer
        when it loads the model, where it runs ``DequantizeLinear`` at every call."""
        q, scale, _, axis, _ = _dq_parts(dq)
        shape = [1] * q.ndim
        shape[axis] = -1
        base = dq.inputs[0].name.removesuffix("_q")
        s = add_initializer(graph, f"{base}_fp8_scale", scale.reshape(shape).astype(np.float32))
        cast = ir.node("Cast", [dq.inputs[0]], attributes={"to": ir.DataType.FLOAT},
                       name=f"{base}_fp8_cast")
        mul = ir.node("Mul", [cast.outputs[0], s], name=f"{base}_fp8_weight")
        for n in (cast, mul):
            copy_identity(dq, n)
        graph.insert_before(dq, [cast, mul])
        LowerORT._swap_output(graph, dq, mul)

    def _to_fp8_token_matmul(self, graph: ir.Graph, node: ir.Node) -> None:
        """``MatMul(x, DQ(e4m3 W))`` -> ``MatMul(e4m3(x / s), DQ(e4m3 W)) * s``: FP8 numerics in
        float (per-token x, the weight's E4M3 values and per-channel scales unchanged)."""
        xq, s = self._token_quantize(graph, node, fp8=True)
        mm = ir.node("MatMul", [xq, node.inputs[1]], name=f"{node.name}_fp8")
        mul = ir.node("Mul", [mm.outputs[0], s], name=f"{node.name}_fp8_token_scale")
        for n in (mm, mul):
            copy_identity(node, n)
        self._copy_plan(node, mm)
        mm.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        graph.insert_before(node, [mm, mul])
        self._swap_output(graph, node, mul)

    def _to_per_token_matmul(self, graph: ir.Graph, node: ir.Node, dq: ir.Node,
                             transposed: bool) -> None:
        q, scale, zp, axis, _ = _dq_parts(dq)
        if transposed:  # stored [N, K] with one scale per row
            q, zp = q.T, (zp.T if zp is not None else None)
        if q.dtype != np.int8 or zp is not None and np.any(zp != 0):
            raise TargetError(f"layer {layer_name(node)!r}: per-token activations need "
                              "symmetric int8 weights.", "Use symmetric 8-bit weights.")
        base = dq.inputs[0].name.removesuffix("_q")
        n = q.shape[1]
        if self._offset_weight(node):
            qv, zpv = self._uint8_parts(graph, f"{base}_tok", np.ascontiguousarray(q), None, n)
        else:
            qv = add_initializer(graph, f"{base}_tok", np.ascontiguousarray(q))
            zpv = add_initializer(graph, f"{base}_tok_zero_point", np.zeros(n, np.int8))
        if transposed:
            self._transposed_int8[id(dq)] = qv
        xq, s = self._token_quantize(graph, node)
        one = self._shared_const(graph, "per_token_one", np.array(1, np.float32))
        x_zp = self._shared_const(graph, "per_token_zero_point", np.array(128, np.uint8))
        w_scale = add_initializer(graph, f"{base}_tok_scale",
                                  np.ascontiguousarray(scale.reshape(-1), np.float32))
        mm = ir.node("MatMulIntegerToFloat", [xq, qv, one, w_scale, x_zp, zpv], domain=MS,
                     name=f"{node.name}_token")
        mul = ir.node("Mul", [mm.outputs[0], s], name=f"{node.name}_token_scale")
        for n in (mm, mul):
            copy_identity(node, n)
        self._copy_plan(node, mm)  # the plan stays with the integer MatMul
        mm.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        graph.insert_before(node, [mm, mul])
        self._swap_output(graph, node, mul)

    def _shared_const(self, graph: ir.Graph, name: str, value: np.ndarray) -> ir.Value:
        """One initializer per name for the small constants every per-token layer uses."""
        if name not in self._consts:
            self._consts[name] = add_initializer(graph, name, value)
        return self._consts[name]

    # --- tied per-channel int8: store q^T so the QDQ MatMul pattern is the plain one
    def _untranspose(self, graph: ir.Graph, node: ir.Node, dq: ir.Node) -> None:
        q, scale, zp, axis, _ = _dq_parts(dq)
        base = dq.inputs[0].name.removesuffix("_q")
        if self._offset_weight(node):
            self._transposed_int8[id(dq)] = self._store_uint8(
                graph, node, dq, np.ascontiguousarray(q.T), f"{base}_t")
            return
        qt = add_initializer(graph, f"{base}_t_q", np.ascontiguousarray(q.T))
        self._transposed_int8[id(dq)] = qt
        inputs = [qt, dq.inputs[1]] + ([dq.inputs[2]] if zp is not None else [])
        new_dq = ir.node("DequantizeLinear", inputs, attributes={"axis": 1},
                         name=f"{base}_t_dq")
        copy_identity(node, new_dq)
        new_dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        graph.insert_before(node, new_dq)
        node.replace_input_with(1, new_dq.outputs[0])
        # the embedding Gather (if tied) will read q^T as well, see _to_int8_gather

    # --- embeddings
    def _to_gather_block_quantized(self, graph: ir.Graph, node: ir.Node, dq: ir.Node,
                                   block: int) -> None:
        q, scale, zp, axis, _ = _dq_parts(dq)
        if scale.ndim == 1 and axis == 0:  # one scale per row: a single group along the row
            scale, zp, axis = scale.reshape(-1, 1), None if zp is None else zp.reshape(-1, 1), 1
        if axis != 1:
            raise self.fail("blocked embedding must be quantized along its columns", node=node)
        bits = 4 if str(q.dtype) in ("int4", "uint4") else 8
        signed = str(q.dtype) in ("int4", "int8")
        offset = 2 ** (bits - 1) if signed else 0
        pack = pack_uint4 if bits == 4 else (lambda a: a.astype(np.uint8))
        qu = (q.astype(np.int16) + offset).astype(np.uint8)
        base = dq.inputs[0].name.removesuffix("_q")
        if zp is not None:
            zpu = (zp.astype(np.int16) + offset).astype(np.uint8)
        else:
            zpu = np.full(scale.shape, offset, np.uint8)
        shared = self._nbits.get(id(dq))
        if shared is not None and shared["K"] % block == 0:
            # tied with a MatMulNBits lm_head: read its bytes through Reshapes (folded at load)
            n, k = q.shape
            reshapes = [ir.node("Reshape", [shared["B"], add_initializer(
                graph, f"{base}_gbq_shape", np.array([n, k * bits // 8], np.int64))]),
                ir.node("Reshape", [shared["scales"], add_initializer(
                    graph, f"{base}_gbq_scales_shape", np.array(scale.shape, np.int64))])]
            if shared["zero_points"] is not None:
                reshapes.append(ir.node("Reshape", [shared["zero_points"], add_initializer(
                    graph, f"{base}_gbq_zp_shape", np.array([n, -1], np.int64))]))
            for r in reshapes:
                copy_identity(node, r)
            graph.insert_before(node, reshapes)
            inputs = [reshapes[0].outputs[0], node.inputs[1], reshapes[1].outputs[0]]
            if len(reshapes) > 2:
                inputs.append(reshapes[2].outputs[0])
            elif signed:
                inputs.append(add_initializer(graph, f"{base}_gbq_zero_points",
                                              np.ascontiguousarray(pack(zpu))))
        else:
            inputs = [add_initializer(graph, f"{base}_gbq", np.ascontiguousarray(pack(qu))),
                      node.inputs[1],
                      add_initializer(graph, f"{base}_gbq_scales", np.ascontiguousarray(scale))]
            if zp is not None or signed:
                inputs.append(add_initializer(graph, f"{base}_gbq_zero_points",
                                              np.ascontiguousarray(pack(zpu))))
        new = ir.node("GatherBlockQuantized", inputs, domain=MS, name=f"{node.name}_gbq",
                      attributes={"bits": bits, "block_size": block, "gather_axis": 0,
                                  "quantize_axis": 1})
        self._replace(graph, node, new)

    def _to_int8_gather(self, graph: ir.Graph, node: ir.Node, dq: ir.Node) -> None:
        """Gather rows of an int8 table and scale them: Mul(Cast(Gather(q)), Gather(s)[..., None])."""
        q_val, s_val = dq.inputs[0], dq.inputs[1]
        zp_val = dq.inputs[2] if len(dq.inputs) > 2 else None
        ids = node.inputs[1]
        if q_val.const_value.dtype in (ir.DataType.INT4, ir.DataType.UINT4):
            # ORT's Gather has no 4-bit kernel: a per-row 4-bit table is gathered from a byte copy
            wide = np.int8 if q_val.const_value.dtype == ir.DataType.INT4 else np.uint8
            base = q_val.name.removesuffix("_q")
            q_val = add_initializer(graph, f"{base}_q_bytes",
                                    q_val.const_value.numpy().astype(wide))
            if zp_val is not None:
                zp_val = add_initializer(graph, f"{base}_zero_point_bytes",
                                         zp_val.const_value.numpy().astype(wide))
        # a tied table re-stored transposed for the lm_head: gather its columns instead
        twin = self._transposed_int8.get(id(dq))
        if twin is not None and twin.const_value.dtype in (ir.DataType.INT4, ir.DataType.UINT4):
            twin = None  # gather from the byte copy made above, not the 4-bit lm_head table
        nodes: list[ir.Node] = []
        if twin is not None:
            # Gather(Transpose(twin)) rows, not twin's columns: ONNX Runtime folds the Transpose
            # of the constant once at load (the file keeps one copy of the table), and each
            # token then reads one contiguous row instead of K bytes strided by the vocabulary
            # (a 128-token prefill on SmolLM2: 4 ms -> under 0.1 ms, about 2 % of the W8A8 run)
            t = ir.node("Transpose", [twin], attributes={"perm": [1, 0]})
            g = ir.node("Gather", [t.outputs[0], ids], attributes={"axis": 0})
            nodes += [t, g]
            rows = g.outputs[0]
            if twin.const_value.dtype == ir.DataType.UINT8 and \
                    q_val.const_value.dtype == ir.DataType.INT8:  # uint8 storage of int8 values
                zp = np.zeros(q_val.const_value.shape[0], np.int16) if zp_val is None \
                    else zp_val.const_value.numpy().astype(np.int16).reshape(-1)
                zp_val = add_initializer(graph, f"{twin.name}_row_offsets",
                                         (zp + 128).astype(np.uint8))
        else:
            g = ir.node("Gather", [q_val, ids], attributes={"axis": 0})
            nodes.append(g)
            rows = g.outputs[0]
        cast = ir.node("Cast", [rows], attributes={"to": ir.DataType.FLOAT})
        nodes.append(cast)
        values = cast.outputs[0]
        if zp_val is not None:
            gz = ir.node("Gather", [zp_val, ids], attributes={"axis": 0})
            cz = ir.node("Cast", [gz.outputs[0]], attributes={"to": ir.DataType.FLOAT})
            axes = add_initializer(graph, "unsqueeze_last_axis", np.array([-1], np.int64))
            uz = ir.node("Unsqueeze", [cz.outputs[0], axes])
            sub = ir.node("Sub", [values, uz.outputs[0]])
            nodes += [gz, cz, uz, sub]
            values = sub.outputs[0]
        gs = ir.node("Gather", [s_val, ids], attributes={"axis": 0})
        axes = add_initializer(graph, "unsqueeze_last_axis", np.array([-1], np.int64))
        us = ir.node("Unsqueeze", [gs.outputs[0], axes])
        mul = ir.node("Mul", [values, us.outputs[0]], name=f"{node.name}_int8")
        nodes += [gs, us, mul]
        for n in nodes:
            copy_identity(node, n)
        graph.insert_before(node, nodes)
        self._swap_output(graph, node, mul)

    # --- helpers
    def _replace(self, graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
        copy_identity(old, new)
        self._copy_plan(old, new)
        graph.insert_before(old, new)
        self._swap_output(graph, old, new)

    @staticmethod
    def _copy_plan(old: ir.Node, new: ir.Node) -> None:
        """lbcc's metadata (layer, plan) of ``old`` onto ``new``."""
        for k, v in old.metadata_props.items():
            if k.startswith("lbcc."):
                new.metadata_props[k] = v

    @staticmethod
    def _swap_output(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
        out_old, out_new = old.outputs[0], new.outputs[0]
        out_new.type, out_new.shape = out_old.type, out_old.shape
        name = out_old.name
        out_old.replace_all_uses_with(out_new, replace_graph_outputs=True)
        graph.remove(old, safe=True)
        out_new.name = name

