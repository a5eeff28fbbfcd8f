"""From the compiled IR to what ``model.py`` runs: the decoder's structure and packed tensors.

The IR after weight rounding holds every quantized weight as ``DequantizeLinear(q, scale[, zp])``
in front of its ``MatMul`` / ``Gather`` (see ``passes/rounding.py``), RMSNorms as
``(Skip)SimplifiedLayerNormalization`` and rotary embeddings as ``RotaryEmbedding`` with their
cos/sin caches (``passes/fusion.py``). This module reads them by layer name and graph structure
and finds the fusion groups the runtime executes as one kernel:

* ``qkv``: the q/k/v projections read the same normalized input -> one GEMM over the
  concatenated weights (N = q + k + v), the RMSNorm in front fused into the activation
  quantization when the group is W8A8;
* ``gate_up``: gate and up read the same input and meet in ``silu(gate) * up`` -> one GEMM;
* the residual adds after ``o_proj`` / ``down_proj`` (``SkipSimplifiedLayerNormalization``).

Packing (:mod:`packing`) is done here, once, at compile time. Concatenation along N keeps the
layout (rows are independent), so a group is stored exactly like a single layer.
"""

from __future__ import annotations

import re
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lbcc.errors import TargetError
from lbcc.irutils import layer_name

from . import packing

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj|"
                       r"input_layernorm|post_attention_layernorm)$")
_SIGNED = {np.dtype(np.int8), np.dtype(ml_dtypes.int4)}


def _dq_of(value: ir.Value | None) -> tuple[ir.Node | None, bool]:
    """(DequantizeLinear producing ``value`` (through one Transpose), transposed?)."""
    p = value.producer() if value is not None else None
    if p is not None and p.op_type == "Transpose":
        pp = p.inputs[0].producer()
        return (pp, True) if pp is not None and pp.op_type == "DequantizeLinear" else (None, True)
    return (p, False) if p is not None and p.op_type == "DequantizeLinear" else (None, False)


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def weight_record(node: ir.Node, w: ir.Value, activation: str) -> dict[str, Any]:
    """The out-major weight ``[N, K]`` read by MatMul ``node`` through input ``w``."""
    dq, transposed = _dq_of(w)
    if dq is not None:
        return dq_record(dq, transposed, layer_name(node), activation)
    p = w.producer()
    arr = _const(p.inputs[0]) if transposed and p is not None else _const(w)
    if arr is None:
        raise TargetError(f"node {node.name!r} ({layer_name(node)}): weight is neither a "
                          "constant nor a DequantizeLinear of one.",
                          "The triton target runs MatMuls with constant weights only.")
    arr = arr if transposed else arr.T  # MatMul(x, W[K, N]) -> [N, K]
    return {"kind": "fp16", "weight": np.ascontiguousarray(arr, np.float16)}


def dq_record(dq: ir.Node, transposed: bool, where: str, activation: str) -> dict[str, Any]:
    """``{kind, bits, group, codes, scales, zeros}`` of ``DequantizeLinear`` node ``dq``;
    ``transposed``: q is stored out-major ``[N, K]`` (else ``[K, N]``).

    Codes are unsigned: signed ``q`` becomes ``u = q + 2**(bits-1)`` with the implied zero point
    ``2**(bits-1)``; unsigned ``q`` keeps its stored zero point (0 when none is stored).
    """
    q = _const(dq.inputs[0])
    scale = _const(dq.inputs[1])
    zp = _const(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if q is None or scale is None:
        raise TargetError(f"{where}: DequantizeLinear of a non-constant weight.", "")
    axis = dq.attributes.get_int("axis", 1)
    block = dq.attributes.get_int("block_size", 0) or None
    if np.dtype(q.dtype) == np.dtype(ml_dtypes.float8_e4m3fn):
        if block is not None or activation != "dynamic-token":
            raise TargetError(f"{where}: FP8 weights run per channel with FP8 activations per "
                              "token only.", "Use --preset w8a8-fp8.")
        q, scale = (q, scale) if transposed else (q.T, scale.T)
        if q.shape[1] % 32:
            raise TargetError(f"{where}: FP8 products need an input width divisible by 32, "
                              f"not {q.shape[1]}.",
                              "Use an integer preset (w8a8, w4a16) for this model.")
        return {"kind": "fp8", "weight": np.ascontiguousarray(q).view(np.uint8),
                "wscale": scale.reshape(-1).astype(np.float32)}
    signed = np.dtype(q.dtype) in _SIGNED
    bits = 4 if np.dtype(q.dtype) in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)) else 8
    # to out-major [N, K] (MatMul weights are stored [K, N] unless read through a Transpose)
    if not transposed:
        q, scale = q.T, scale.T
        zp = zp.T if zp is not None else None
        channel_axis = 1
    else:
        channel_axis = 0
    n, k = q.shape
    if block is None:  # per channel: one group spanning K
        if axis != channel_axis:
            raise TargetError(f"{where}: per-tensor / other-axis weight scales.", "")
        group = k
        scale = scale.reshape(n, 1)
        zp = zp.reshape(n, 1) if zp is not None else None
    else:
        group = block
    q32 = q.astype(np.int32)
    half = 1 << (bits - 1)
    if signed:
        codes = (q32 + half).astype(np.uint8)
        if zp is not None and np.any(zp.astype(np.int32) != 0):
            raise TargetError(f"{where}: signed weights with a zero point.", "")
        zeros = None
    else:
        codes = q32.astype(np.uint8)
        zeros = (np.zeros(scale.shape, np.uint8) if zp is None else zp.astype(np.uint8))
        if np.all(zeros == half):
            zeros = None
    scales = scale.astype(np.float16)
    if bits == 8 and block is None and zeros is None and activation in ("static", "dynamic"):
        return {"kind": "w8a8", "weight": (codes.astype(np.int16) - half).astype(np.int8),
                "wscale": scale.reshape(n).astype(np.float32)}
    return {"kind": "wq", "bits": bits, "group": group, "codes": codes, "scales": scales,
            "zeros": zeros, "shape": (n, k)}


def pack_record(rec: dict[str, Any], name: str, tensors: dict[str, np.ndarray]) -> dict:
    """Store ``rec`` under ``name`` in ``tensors``; returns its manifest entry."""
    if rec["kind"] == "wq":
        n, k = rec["shape"]
        bits, group = rec["bits"], rec["group"]
        zeros = rec["zeros"]
        pad = (1 << (bits - 1)) if zeros is None else zeros[:, -1]
        tensors[name + ".qweight"] = packing.pack(rec["codes"], bits, group, pad)
        scales, zeros = packing.pad_groups(rec["scales"], zeros, k, bits, group)
        tensors[name + ".scales"] = np.ascontiguousarray(scales)
        if zeros is not None:
            tensors[name + ".zeros"] = np.ascontiguousarray(zeros)
        return {"kind": "wq", "bits": bits, "group": group, "out": n, "in": k,
                "zeros": zeros is not None}
    if rec["kind"] in ("w8a8", "fp8"):  # fp8: the E4M3 bytes as uint8
        tensors[name + ".weight"] = np.ascontiguousarray(rec["weight"])
        tensors[name + ".wscale"] = rec["wscale"]
        n, k = rec["weight"].shape
        return {"kind": rec["kind"], "out": n, "in": k}
    tensors[name + ".weight"] = rec["weight"]
    n, k = rec["weight"].shape
    return {"kind": "fp16", "out": n, "in": k}


def concat_records(recs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One record for weights concatenated along N, or None when their storage differs."""
    kinds = {(r["kind"], r.get("bits"), r.get("group"), r.get("zeros") is None) for r in recs}
    if len(kinds) != 1:
        return None
    kind = recs[0]["kind"]
    if kind == "wq":
        if len({r["shape"][1] for r in recs}) != 1:
            return None
        zeros = None if recs[0]["zeros"] is None else np.concatenate([r["zeros"] for r in recs])
        return dict(recs[0], codes=np.concatenate([r["codes"] for r in recs]),
                    scales=np.concatenate([r["scales"] for r in recs]), zeros=zeros,
                    shape=(sum(r["shape"][0] for r in recs), recs[0]["shape"][1]))
    if kind in ("w8a8", "fp8"):
        return dict(recs[0], weight=np.concatenate([r["weight"] for r in recs]),
                    wscale=np.concatenate([r["wscale"] for r in recs]))
    return dict(recs[0], weight=np.concatenate([r["weight"] for r in recs]))


def _norm_nodes(graph: ir.Graph) -> dict[str, tuple[ir.Node, np.ndarray]]:
    out = {}
    for node in graph:
        if node.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
            idx = 1 if node.op_type == "SimplifiedLayerNormalization" else 2
            gamma = _const(node.inputs[idx])
            if gamma is None:
                raise TargetError(f"{layer_name(node)}: RMSNorm weight is not a constant.", "")
            out[layer_name(node)] = (node, gamma)
    return out


def _head_dim(graph: ir.Graph, q_node: ir.Node, rope_cos: np.ndarray | None) -> int:
    if rope_cos is not None:
        return 2 * int(rope_cos.shape[-1])
    # no rotary: the Reshape after q_proj splits heads: [..., heads, head_dim]
    for use in q_node.outputs[0].uses():
        user = use.node if hasattr(use, "node") else use[0]
        if user.op_type != "Reshape":
            continue
        shape = _const(user.inputs[1])
        if shape is None and user.inputs[1].producer() is not None and \
                user.inputs[1].producer().op_type == "Concat":
            last = _const(user.inputs[1].producer().inputs[-1])
            shape = last
        if shape is not None and int(shape.reshape(-1)[-1]) > 0:
            return int(shape.reshape(-1)[-1])
    raise TargetError("cannot find the attention head size (no rotary cache, no Reshape of "
                      "q_proj's output into heads).", "")


MAX_POSITIONS = 8192


def rotary_tables(graph: ir.Graph) -> tuple[np.ndarray | None, np.ndarray | None]:
    """cos/sin ``[positions, head_dim/2]`` of the rotary embedding (rotate-half form), or None.

    From a fused ``RotaryEmbedding``'s caches, else from the ``inv_freq`` initializer a
    Hugging Face export keeps: ``cos[p, i] = cos(p * inv_freq[i])``. A graph with Cos/Sin but
    neither is refused (its rotary form is unknown).
    """
    rope = [n for n in graph if n.op_type == "RotaryEmbedding"]
    if rope:
        if rope[0].attributes.get_int("interleaved", 0):
            raise TargetError("interleaved rotary embeddings are not supported.", "")
        return _const(rope[0].inputs[2]), _const(rope[0].inputs[3])
    inv = [v for k, v in graph.initializers.items() if k.endswith("rotary_emb.inv_freq")]
    if inv:
        f = np.arange(MAX_POSITIONS, dtype=np.float64)[:, None] * \
            inv[0].const_value.numpy().astype(np.float64)[None, :]
        return np.cos(f).astype(np.float32), np.sin(f).astype(np.float32)
    if any(n.op_type in ("Cos", "Sin") for n in graph):
        raise TargetError("the graph computes a rotary embedding lbcc cannot read (neither a "
                          "RotaryEmbedding node nor a rotary_emb.inv_freq initializer).", "")
    return None, None


def extract(model: ir.Model, plan_activation: dict[str, str]) -> tuple[dict, dict]:
    """(manifest, tensors) of a Llama-family decoder; TargetError for anything else."""
    from lbcc.passes.precision import plan_of

    graph = model.graph
    linears: dict[str, tuple[ir.Node, dict]] = {}
    lm_head = embed = None
    for node in graph:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            name = layer_name(node)
            w = node.inputs[1]
            if not (_const(w) is not None or _dq_of(w)[0] is not None):
                continue  # activation x activation (attention scores)
            plan = plan_of(node) or {}
            act = plan.get("activation", plan_activation.get(name, "none"))
            m = _LAYER_RE.search(name)
            key = f"layers.{m.group(1)}.{m.group(2).split('.')[-1]}" if m else \
                ("lm_head" if name.endswith("lm_head") else None)
            if key is None:
                raise TargetError(f"MatMul {node.name!r} ({name}) is not a Llama decoder layer "
                                  "the triton target knows.",
                                  "The triton target emits Llama-family decoders "
                                  "(q/k/v/o, gate/up/down, lm_head).")
            linears[key] = (node, weight_record(node, w, act))
            if key == "lm_head":
                lm_head = node
        elif node.op_type == "Gather" and node.inputs[1] is not None and \
                node.inputs[1].name == graph.inputs[0].name:
            embed = node
    if lm_head is None or embed is None:
        raise TargetError("no embedding Gather / lm_head MatMul found.",
                          "The triton target emits decoder LMs with input_ids -> logits.")
    n_layers = 1 + max(int(k.split(".")[1]) for k in linears if k.startswith("layers."))
    norms = _norm_nodes(graph)
    cos, sin = rotary_tables(graph)
    tensors: dict[str, np.ndarray] = {}
    man: dict[str, Any] = {"linears": {}, "fusion_groups": []}

    def get(key: str) -> dict:
        if key not in linears:
            raise TargetError(f"decoder layer {key} not found in the graph.", "")
        return linears[key][1]

    for i in range(n_layers):
        p = f"layers.{i}."
        for group, parts in (("qkv", ["q_proj", "k_proj", "v_proj"]),
                             ("gate_up", ["gate_proj", "up_proj"])):
            recs = [get(p + x) for x in parts]
            cat = concat_records(recs)
            if cat is None:
                raise TargetError(f"{p}{'/'.join(parts)} are stored differently "
                                  "(bits / group / kind); the runtime fuses them into one GEMM.",
                                  "Give them the same [[layers]] settings.")
            entry = pack_record(cat, p + group, tensors)
            entry["splits"] = [r["shape"][0] if r["kind"] == "wq" else r["weight"].shape[0]
                               for r in recs]
            man["linears"][p + group] = entry
            if i == 0:
                man["fusion_groups"].append(
                    {"group": group, "layers": parts, "kernel": entry["kind"],
                     "prologue": "rmsnorm" + {"w8a8": "+int8-quant", "fp8": "+fp8-quant"}.get(
                         entry["kind"], ""),
                     "epilogue": "silu*mul" if group == "gate_up" else "rotary+kv-write"})
        for x in ("o_proj", "down_proj"):
            man["linears"][p + x] = pack_record(get(p + x), p + x, tensors)
        for nm in ("input_layernorm", "post_attention_layernorm"):
            found = [v for k, v in norms.items() if k.endswith(f"layers.{i}.{nm}")]
            if not found:
                raise TargetError(f"RMSNorm layers.{i}.{nm} not found.", "")
            tensors[p + nm] = found[0][1].astype(np.float16)
    man["fusion_groups"].append({"group": "residual", "layers": ["o_proj", "down_proj"],
                                 "epilogue": "residual add"})
    final = [v for k, v in norms.items() if k == "norm" or k.endswith(".norm")]
    if not final:
        raise TargetError("final RMSNorm not found.", "")
    tensors["norm"] = final[0][1].astype(np.float16)
    eps = float(final[0][0].attributes.get_float("epsilon", 1e-5))
    man["linears"]["lm_head"] = pack_record(linears["lm_head"][1], "lm_head", tensors)
    # embedding: the table behind the Gather (shared with a tied lm_head when it is the same)
    e_dq, _ = _dq_of(embed.inputs[0])
    head_dq, _ = _dq_of(lm_head.inputs[1])
    lm = man["linears"]["lm_head"]
    if e_dq is not None and e_dq is head_dq and lm["kind"] == "wq":
        man["embedding"] = {"kind": "wq", "name": "lm_head", "bits": lm["bits"],
                            "group": lm["group"], "tied": True}
    elif e_dq is not None:
        rec = dq_record(e_dq, True, layer_name(embed), "none")  # q stored [V, D]: rows
        entry = pack_record(rec, "embed", tensors)
        man["embedding"] = {"kind": "wq", "name": "embed", "bits": entry["bits"],
                            "group": entry["group"], "tied": False}
    else:
        table = _const(embed.inputs[0])
        if table is None:
            raise TargetError("embedding table is not a constant.", "")
        tensors["embed.weight"] = table.astype(np.float16)
        man["embedding"] = {"kind": "fp16", "tied": False}
    q_node = linears["layers.0.q_proj"][0]
    hd = _head_dim(graph, q_node, cos)
    splits = man["linears"]["layers.0.qkv"]["splits"]
    if cos is not None:
        tensors["rope.cos"] = cos.astype(np.float32)
        tensors["rope.sin"] = sin.astype(np.float32)
    man["config"] = {"layers": n_layers, "hidden": man["linears"]["layers.0.qkv"]["in"],
                     "heads": splits[0] // hd,
                     "kv_heads": splits[1] // hd, "head_dim": hd, "eps": eps,
                     "vocab": lm["out"], "rope": cos is not None,
                     "max_positions": int(cos.shape[0]) if cos is not None else None}
    return man, tensors
