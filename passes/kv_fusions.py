"""Fusions for KV-cache graphs (:mod:`lbcc.kvcache`): rotary cos/sin from position ids, attention.

``RotaryFromPositionIds``: transformers >= 5 computes RoPE angles as
``freqs[b, s, e] = float(position_ids[b, s]) * inv_freq[e]`` (a Mul once the exporter's MatMul by
a size-1 dim is folded), then ``emb = concat(freqs, freqs)``, ``cos(emb)``, ``sin(emb)``. onnxscript's
``cos_sin_cache`` rules expect the older ``Transpose(MatMul(inv_freq, pos))`` form, so the
``RotaryEmbedding`` fused from the rotation is inlined back. This rule rewrites the whole thing to
ORT's ``com.microsoft::RotaryEmbedding(x, position_ids, cos_cache, sin_cache)`` with
``cos_cache[p, e] = cos(p * inv_freq[e])``, shared by every layer, computed in the graph (a
Range, a Mul, Cos, Sin) from the float32 angles ``float(p) * inv_freq[e]`` of the exported graph.
Where the capture recorded the model's context length ``P`` (metadata ``lbcc.max_positions``:
``max_position_embeddings``), ``p`` runs over ``[0, P)``: every input of that subgraph is a
constant, so ONNX Runtime folds it into two initializers when it loads the session (no rotary
arithmetic in a decode step, as with onnxruntime-genai's stored caches, and nothing added to the
file). Otherwise ``p`` runs over ``[0, max(position_ids)]`` each step, so that any length works.

Attention: onnxscript's SDPA and GQA fusions (SDPA -> ``com.microsoft::MultiHeadAttention`` with
the mask as an additive bias where GQA does not apply).

``pack_qkv``: ``GroupQueryAttention(MatMul(x, Wq), MatMul(x, Wk), MatMul(x, Wv), ...)`` ->
``GroupQueryAttention(MatMul(x, [Wq | Wk | Wv]), -, -, ...)``, GQA's packed-QKV form (the one
onnxruntime-genai's builder emits): one projection a layer instead of three; the fused MatMul is
the layer ``<attention>.qkv_proj``. This form packs float weights (``fuse-ort`` on a float graph);
a quantizing compile keeps Q, K and V separate while it plans and rounds them (recipe rules on
``*.k_proj`` match as in the cache-free graph) and packs them after lowering where they were
lowered alike (``pack-qkv`` of the ``ort-int8`` target).

``share_attention_lengths``: onnxscript's GQA fusion computes each layer's ``seqlens_k`` and
``total_sequence_length`` from the mask or positions on its own (four small ops a layer, every
decode step); layers whose lengths are the same computation read the first layer's.

``drop_unused_norm_stats`` (:mod:`lbcc.passes.cleanup`): the fused RMS norms no longer compute
the mean / inverse standard deviation outputs nobody reads.

``last_logits``: an optional ``logits_to_keep`` input (default 0: all positions) slices the
lm_head's input to the last positions, so a generator's prefill computes one row of logits.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _fusion_utils, _ir_utils, pattern

from lbcc.passes.causal_attention import (FUSION_DOMAIN, band_window, bypass_identity_reshapes,
                                           expand_sdpa, run_subgraph)
from lbcc.passes.softcap_attention import fuse_softcapped_sdpa, softcap_of


class RotaryFromPositionIds(pattern.RewriteRuleClassBase):
    """Mul(Cast(Unsqueeze(position_ids)), inv_freq) -> cos/sin -> RotaryEmbedding, with caches."""

    def __init__(self, max_positions: int | None = None) -> None:
        # the cos/sin values are shared by every layer's rotary: keep them, clean up afterwards
        super().__init__("RotaryFromPositionIds", remove_nodes=False)
        self.max_positions = max_positions
        self._caches: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}

    def cleanup(self) -> None:
        self._caches.clear()

    def pattern(self, op, x, inv_freq, position_ids, axes, interleaved, num_heads):
        pos = op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT)  # [B, S, 1]
        freqs = op.Mul(pos, inv_freq)  # [B, S, E]
        emb = op.Concat(freqs, freqs, axis=-1)
        cos = op.Unsqueeze(op.Cos(emb), [1])
        sin = op.Unsqueeze(op.Sin(emb), [1])
        return op.RotaryEmbedding(x, cos, sin, interleaved=interleaved, num_heads=num_heads,
                                  _domain="ai.onnxruntime._fusion")

    def check(self, context, x, inv_freq, position_ids, axes, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not _ir_utils.has_rank(position_ids, 2):
            return result.fail("position_ids is not [batch, seq].", position_ids)
        if not _ir_utils.is_singleton_value(axes, 2) and not _ir_utils.is_singleton_value(axes,
                                                                                          -1):
            return result.fail("position_ids is not unsqueezed on the last axis.", axes)
        if inv_freq.const_value is None or inv_freq.const_value.numpy().size < 1:
            return result.fail("inv_freq is not a constant.", inv_freq)
        if not _ir_utils.has_rank(x, 4):
            return result.fail("the rotated tensor is not [batch, heads, seq, head_dim].", x)
        return result

    def rewrite(self, op, x, inv_freq, position_ids, interleaved, num_heads, **_):
        if inv_freq not in self._caches:
            freq_row = op.Constant(value=ir.tensor(
                inv_freq.const_value.numpy().reshape(1, -1).astype("float32")))
            if self.max_positions:  # constant: ONNX Runtime folds the caches at session load
                n_pos = op.Constant(value_int=self.max_positions)
            else:
                n_pos = op.Add(op.ReduceMax(position_ids, keepdims=0), op.Constant(value_int=1))
            pos = op.Range(op.Constant(value_int=0), n_pos, op.Constant(value_int=1))
            pos = op.Cast(op.Reshape(pos, op.Constant(value_ints=[-1, 1])),
                          to=ir.DataType.FLOAT)
            # [P, 1] * [1, E]: a Mul, as in the exported graph (bit-identical angles), and not a
            # MatMul with a constant operand, which the weight passes would quantize
            angles = op.Mul(pos, freq_row)
            self._caches[inv_freq] = (op.Cos(angles), op.Sin(angles))
        cos, sin = self._caches[inv_freq]
        return op.RotaryEmbedding(x, position_ids, cos, sin, interleaved=interleaved,
                                  _domain="com.microsoft")


def rotary_from_position_ids(model: ir.Model, debug: bool = False) -> int:
    """Apply :class:`RotaryFromPositionIds` (caches of the recorded context length, if any)."""
    from lbcc.kvcache import max_positions

    rule = RotaryFromPositionIds.rule(max_positions=max_positions(model.metadata_props))
    return _fusion_utils.apply_fusion_rules(pattern.RewriteRuleSet([rule]))(model, debug=debug)


def peel_bias(value: ir.Value) -> tuple[ir.Value, ir.Value | None]:
    """``(y, b)`` for ``value = Add(y, b)`` (either order) with ``b`` a constant float vector and
    ``y`` read by that Add only, as a projection with a bias (Qwen2's Q / K / V) is exported;
    ``(value, None)`` otherwise."""
    add = value.producer()
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return value, None
    for y, b in (add.inputs, add.inputs[::-1]):
        if b is not None and b.const_value is not None and len(b.const_value.shape) == 1 \
                and b.const_value.dtype.is_floating_point() and y is not None \
                and len(y.uses()) == 1 and not y.is_graph_output():
            return y, b
    return value, None


def add_packed_bias(graph: ir.Graph, node: ir.Node, biases: list[ir.Value | None],
                    widths: list[int]) -> ir.Node | None:
    """``Add(node's output, [b_q | b_k | b_v])`` inserted after ``node`` (a missing bias is zeros
    of its projection's width), or None when no projection has a bias. The caller routes the
    attention's input through the returned node."""
    from lbcc.irutils import add_initializer, copy_identity

    if all(b is None for b in biases):
        return None
    given = next(b for b in biases if b is not None).const_value
    parts = [b.const_value.numpy() if b is not None else np.zeros(w, given.numpy().dtype)
             for b, w in zip(biases, widths)]
    out = node.outputs[0]
    bias = add_initializer(graph, f"{node.name}.bias", np.concatenate(parts))
    add = ir.node("Add", [out, bias], name=f"{node.name}.bias_add")
    add.outputs[0].type, add.outputs[0].shape = out.type, out.shape
    copy_identity(node, add)
    graph.insert_after(node, add)
    return add


def _packable(gqa: ir.Node) -> str:
    """Why the Q/K/V inputs of ``gqa`` cannot be packed into one MatMul ("" when they can)."""
    if len(gqa.inputs) < 3 or any(v is None for v in gqa.inputs[:3]):
        return "query/key/value are already packed"
    if any(len(v.uses()) != 1 or v.is_graph_output() for v in gqa.inputs[:3]):
        return "a query/key/value projection has another consumer"
    mms = [peel_bias(v)[0].producer() for v in gqa.inputs[:3]]
    if any(m is None or m.op_type != "MatMul" or m.domain not in ("", "ai.onnx") for m in mms):
        return "query/key/value are not all MatMul outputs (with or without a bias)"
    if len({id(m.inputs[0]) for m in mms}) != 1:
        return "query/key/value MatMuls do not share their input"
    ws = [m.inputs[1].const_value if m.inputs[1] is not None else None for m in mms]
    if any(w is None or len(w.shape) != 2 or not w.dtype.is_floating_point() for w in ws):
        return "a query/key/value weight is not a constant 2-D float matrix"
    if len({(w.shape[0], w.dtype) for w in ws}) != 1:
        return "query/key/value weights differ in rows or dtype"
    biases = [peel_bias(v)[1] for v in gqa.inputs[:3]]
    if any(b is not None and (b.const_value.shape[0] != w.shape[1] or b.const_value.dtype
                              != w.dtype) for b, w in zip(biases, ws)):
        return "a query/key/value bias does not match its weight"
    return ""


#: constants up to this many elements are compared by value in :func:`_computation_key`
_SMALL_CONSTANT = 64
#: GroupQueryAttention's seqlens_k and total_sequence_length inputs
_GQA_LENGTH_INPUTS = (5, 6)


def _computation_key(value: ir.Value | None, memo: dict[int, Any]) -> Any:
    """A hashable description of how ``value`` is computed: two values with equal keys hold
    equal tensors. Graph inputs and large initializers are keyed by identity, small constants
    by their bytes, node outputs by the node's op, attributes and inputs' keys."""
    if value is None:
        return None
    if id(value) in memo:
        return memo[id(value)]
    const, node = value.const_value, value.producer()
    if const is not None and const.size <= _SMALL_CONSTANT:
        arr = const.numpy()
        key: Any = ("const", str(arr.dtype), arr.shape, arr.tobytes())
    elif node is None:
        key = ("value", id(value))
    else:
        attrs = []
        for name, attr in sorted(node.attributes.items()):
            val = attr.value
            if attr.type == ir.AttributeType.TENSOR:
                if val.size > _SMALL_CONSTANT:
                    val = ("tensor", id(val))
                else:
                    arr = val.numpy()
                    val = (str(arr.dtype), arr.shape, arr.tobytes())
            elif isinstance(val, (list, tuple)):
                val = tuple(val)
            elif not isinstance(val, (int, float, str, bytes)):
                val = ("attribute", id(val))  # graphs, type protos: never equal
            attrs.append((name, val))
        key = (node.op_identifier(), tuple(attrs), value.index(),
               tuple(_computation_key(v, memo) for v in node.inputs))
    memo[id(value)] = key
    return key


def share_attention_lengths(model: ir.Model, debug: bool = False) -> int:
    """Each GroupQueryAttention whose ``seqlens_k`` / ``total_sequence_length`` are computed as
    an earlier one's reads that one's values; the layers' own copies are left to dead-node
    removal. Returns how many attention nodes changed."""
    memo: dict[int, Any] = {}
    first: dict[Any, ir.Value] = {}
    count = 0
    for node in model.graph:  # graph order is topological: the first copy precedes the rest
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        changed = False
        for i in _GQA_LENGTH_INPUTS:
            value = node.inputs[i] if i < len(node.inputs) else None
            if value is None:
                continue
            shared = first.setdefault(_computation_key(value, memo), value)
            if shared is not value:
                node.replace_input_with(i, shared)
                changed = True
        count += changed
    if debug and not count:
        print("Rule: ShareAttentionLengths failed: no two GroupQueryAttention nodes compute "
              "their lengths alike")
    return count


def qkv_layer_name(q_proj: ir.Node) -> str:
    """``<attention>.qkv_proj`` for the Q projection ``<attention>.q_proj``."""
    from lbcc.irutils import layer_name

    q_layer = layer_name(q_proj)
    return (q_layer.rsplit(".", 1)[0] + "." if "." in q_layer else "") + "qkv_proj"


def name_qkv_projection(node: ir.Node, q_proj: ir.Node, n: int) -> None:
    """Make ``node`` (one output, ``n`` columns) the layer ``<attention>.qkv_proj`` of the Q
    projection ``q_proj``: its name, layer and exporter scopes, and an output typed like Q's."""
    from lbcc.irutils import LAYER_KEY, NAME_SCOPES_KEY

    layer = qkv_layer_name(q_proj)
    node.name = f"{layer}.{node.op_type}"
    node.metadata_props[LAYER_KEY] = layer
    if NAME_SCOPES_KEY in q_proj.metadata_props:
        node.metadata_props[NAME_SCOPES_KEY] = q_proj.metadata_props[NAME_SCOPES_KEY]
    q_out, out = q_proj.outputs[0], node.outputs[0]
    out.name, out.type = f"{layer}.output", q_out.type
    if q_out.shape is not None and len(q_out.shape) >= 1:
        out.shape = ir.Shape([*list(q_out.shape)[:-1], n])


def pack_qkv(model: ir.Model, debug: bool = False) -> int:
    """Q, K, V projections of each GroupQueryAttention -> one MatMul (packed QKV), and one Add of
    the concatenated biases where the projections have biases; the count."""
    from lbcc.irutils import add_initializer

    graph, count, why = model.graph, 0, []
    for gqa in list(graph):
        if gqa.op_type != "GroupQueryAttention" or gqa.domain != "com.microsoft":
            continue
        reason = _packable(gqa)
        if reason:
            why.append(f"{gqa.name}: {reason}")
            continue
        peeled = [peel_bias(v) for v in gqa.inputs[:3]]
        mms = [y.producer() for y, _ in peeled]
        ws = [m.inputs[1].const_value.numpy() for m in mms]
        weight = add_initializer(graph, f"{qkv_layer_name(mms[0])}.weight",
                                 np.concatenate(ws, axis=1))
        node = ir.node("MatMul", [mms[0].inputs[0], weight])
        name_qkv_projection(node, mms[0], int(weight.shape[1]))
        graph.insert_before(mms[0], node)
        add = add_packed_bias(graph, node, [b for _, b in peeled], [w.shape[1] for w in ws])
        gqa.replace_input_with(0, (add or node).outputs[0])
        gqa.replace_input_with(1, None)
        gqa.replace_input_with(2, None)
        graph.remove([y.uses()[0].node for y, b in peeled if b is not None] + mms, safe=True)
        count += 1
    if debug and not count:
        print("Rule: PackQKV failed: " + ("; ".join(why[:2]) if why
                                          else "not a GroupQueryAttention in the graph"))
    return count


#: the optional input (an overridable initializer, default 0 = every position) that keeps the
#: logits of the last ``logits_to_keep`` positions only, as transformers' ``logits_to_keep``
LOGITS_TO_KEEP = "logits_to_keep"
_INT64_MAX = np.iinfo(np.int64).max


def last_logits(model: ir.Model, debug: bool = False) -> int:
    """``logits = MatMul(h, W)`` -> ``MatMul(Slice(h, -logits_to_keep, end, axis=1), W)``.

    ``logits_to_keep`` is a graph input with an initializer of 0 (ONNX Runtime then makes it an
    optional, overridable input): not fed, ``-0 = 0`` keeps every position (perplexity, calibration
    and onnxruntime-genai, which does not know the input, see the graph as before); a generator
    feeds 1 at the prefill, so the lm_head (576 x 49152 on SmolLM2, a fifth of the weights) runs on
    the prompt's last position only. Position-wise ops between the product and the logits with
    scalar constants (Gemma 2's final cap, ``c · tanh(z / c)``) are walked through. Returns 1 when
    inserted."""
    graph = model.graph
    why = ""
    out = next((v for v in graph.outputs if v.name == "logits"), None)
    mm, between = _lm_head_product(out)
    if any(v.name == LOGITS_TO_KEEP for v in graph.inputs):
        why = f"the graph already has a {LOGITS_TO_KEEP} input"
    elif mm is None or mm.op_type != "MatMul" or mm.domain not in ("", "ai.onnx"):
        why = "logits is not the output of a MatMul"
    elif mm.inputs[0].shape is None or len(mm.inputs[0].shape) != 3:
        why = "the lm_head's input is not [batch, seq, hidden]"
    if why:
        if debug:
            print(f"Rule: LastLogits failed: {why}")
        return 0
    from lbcc.irutils import add_initializer, copy_identity

    keep = ir.Value(name=LOGITS_TO_KEEP, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64),
                    const_value=ir.tensor(np.array(0, np.int64), name=LOGITS_TO_KEEP))
    graph.inputs.append(keep)
    graph.register_initializer(keep)
    h = mm.inputs[0]
    neg = ir.node("Neg", [keep])
    start = ir.node("Reshape", [neg.outputs[0], add_initializer(
        graph, "logits_to_keep_shape", np.array([1], np.int64))])
    sl = ir.node("Slice", [h, start.outputs[0],
                           add_initializer(graph, "logits_to_keep_end", np.array([_INT64_MAX])),
                           add_initializer(graph, "logits_to_keep_axes", np.array([1]))],
                 name="logits_to_keep_slice")
    sl.outputs[0].type = h.type
    sl.outputs[0].shape = ir.Shape([h.shape[0], "logits_seq", h.shape[2]])
    for v in [mm.outputs[0], *between]:
        if v.shape is not None and len(v.shape) == 3:
            v.shape = ir.Shape([v.shape[0], "logits_seq", v.shape[2]])
    for n in (neg, start, sl):
        copy_identity(mm, n)
    graph.insert_before(mm, [neg, start, sl])
    mm.replace_input_with(0, sl.outputs[0])
    return 1


#: ops that act on each logit alone, given scalar constants for their other inputs
_POSITIONWISE = frozenset({"Div", "Mul", "Add", "Sub", "Tanh", "Cast", "Identity"})


def _lm_head_product(logits: ir.Value | None) -> tuple[ir.Node | None, list[ir.Value]]:
    """The node that computes the logits, seen through position-wise ops with scalar constants
    (their outputs are the second item, logits included), or (None, [])."""
    between: list[ir.Value] = []
    v = logits
    for _ in range(8):
        node = v.producer() if v is not None else None
        if node is None or node.op_type not in _POSITIONWISE or node.domain not in ("", "ai.onnx"):
            return node, between
        data = [i for i in node.inputs if i is not None and (
            i.const_value is None or i.const_value.size != 1)]
        if len(data) != 1:
            return node, between
        between.append(v)
        v = data[0]
    return None, []


# ----------------------------------------------------------------------------- masks

#: (past, new tokens) at which a KV-cache graph's attention masks are evaluated: a prompt longer
#: than the common sliding windows (4,096 tokens), a short step after a past, and (see
#: :func:`_mask_checks`) a step at the end of the model's context
MASK_CHECKS = ((0, 4099), (5, 3))
#: the domain an attention block GQA must not take waits in, until ``sdpa_via_mha``
HELD_DOMAIN = "lbcc.held_attention"
#: the most constant elements a mask's computation may read (more: it reads weights)
_MASK_MAX_CONSTANTS = 1 << 20


def _mask_checks(model: ir.Model) -> list[tuple[int, int]]:
    """:data:`MASK_CHECKS`, and 2 tokens ending at the recorded context length (a window longer
    than 4,096 tokens shows only there)."""
    from lbcc.kvcache import max_positions

    context = max_positions(model.metadata_props) or 0
    return list(MASK_CHECKS) + ([(context - 2, 2)] if context > MASK_CHECKS[0][1] else [])


def _ancestors(values: list[ir.Value]) -> tuple[list[ir.Node], list[ir.Value], int]:
    """Nodes computing ``values``, the graph inputs they read as data and their constants'
    size. A ``Shape`` of a graph input is a leaf (its value comes from the probe's dims)."""
    nodes: dict[int, ir.Node] = {}
    inputs: dict[str, ir.Value] = {}
    constants, seen, stack = 0, set(), list(values)
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        p = v.producer()
        if p is None:
            if v.const_value is None:
                inputs[v.name] = v
            else:
                constants += v.const_value.size
            continue
        nodes[id(p)] = p
        if p.op_type == "Shape" and p.inputs[0] is not None and p.inputs[0].producer() is None:
            continue
        stack.extend(i for i in p.inputs if i is not None)
    return list(nodes.values()), list(inputs.values()), constants


def _probe_dims(model: ir.Model, past: int, seq: int) -> dict:
    """Symbolic dim -> size, for one sequence of ``seq`` new tokens after ``past`` cached ones."""
    graph_inputs = {v.name: v for v in model.graph.inputs}
    ids, key = graph_inputs["input_ids"], graph_inputs["past_key_values.0.key"]
    dims = {ids.shape[0]: 1, ids.shape[1]: seq, key.shape[2]: past}
    if "attention_mask" in graph_inputs:
        dims[graph_inputs["attention_mask"].shape[1]] = past + seq
    return dims


def _concrete(v: ir.Value, dims: dict) -> list[int]:
    if v.shape is None or any(not isinstance(d, int) and d not in dims for d in v.shape):
        raise ValueError(f"the shape of input {v.name!r} ({v.shape}) is not known in terms of "
                         "the batch, new-token and past dims")
    return [d if isinstance(d, int) else dims[d] for d in v.shape]


def _probe_feeds(inputs: list[ir.Value], dims: dict, past: int, seq: int
                 ) -> dict[str, np.ndarray]:
    """One sequence without padding: a mask of ones, positions ``past .. past + seq - 1``."""
    feeds = {}
    for v in inputs:
        shape, dtype = _concrete(v, dims), v.dtype.numpy()
        if v.name == "attention_mask":
            feeds[v.name] = np.ones(shape, dtype)
        elif v.name == "position_ids":
            feeds[v.name] = np.broadcast_to(np.arange(past, past + seq, dtype=dtype), shape).copy()
        else:
            feeds[v.name] = np.zeros(shape, dtype)
    return feeds


def _evaluate(model: ir.Model, values: list[ir.Value], past: int, seq: int
              ) -> list[np.ndarray]:
    """``values`` computed by ONNX Runtime from the graph's inputs for ``seq`` new tokens after
    ``past`` cached ones (:func:`_probe_feeds`)."""
    nodes, inputs, constants = _ancestors(values)
    if constants > _MASK_MAX_CONSTANTS:
        raise ValueError(f"it reads {constants:,} constant elements (weights?)")
    dims = _probe_dims(model, past, seq)
    leaves = [n for n in nodes if n.op_type == "Shape" and n.inputs[0].producer() is None]
    shapes = {id(n): np.array(_concrete(n.inputs[0], dims), np.int64) for n in leaves}
    return run_subgraph(model, nodes, values, shapes, _probe_feeds(inputs, dims, past, seq))


def kv_mask_window(model: ir.Model, mask: ir.Value) -> tuple[int | None, str]:
    """What an attention ``mask`` of a KV-cache graph lets each new token see, evaluated at
    :func:`_mask_checks` (:func:`lbcc.passes.causal_attention.band_window`): ``(0, "")`` for the
    plain causal mask of a full cache, ``(W, "")`` for a sliding window of W tokens (Mistral,
    Gemma 2 / 3, some Qwen2 and Phi-3 configurations), ``(None, why)`` for anything else."""
    masks = []
    for past, seq in _mask_checks(model):
        try:
            (m,) = _evaluate(model, [mask], past, seq)
        except Exception as exc:  # noqa: BLE001 - cannot read it: keep the mask
            return None, f"the mask cannot be evaluated from the graph's inputs: {exc}"[:300]
        masks.append((past, seq, m))
    return band_window(masks)


class AttentionGuard:
    """What onnxscript's GQA fusion (0.7) gets wrong, kept right around it.

    Before it (:meth:`__call__`), on each fused ``SDPA``, by the layer's past-key input:

    * its mask (:func:`kv_mask_window`): ``GroupQueryAttention`` computes its own causal mask
      from the sequence lengths, and the rule takes a sliding-window mask for a causal one. A
      sliding window of W tokens is recorded (``windows``: layer -> W); any other non-causal
      mask sends the block to a private domain, out of the rule's reach (``reasons``: layer ->
      why);
    * its softmax scale: the rule drops it, and ``GroupQueryAttention`` then scales by
      ``1/sqrt(head_dim)``, not, e.g., Gemma's ``query_pre_attn_scalar ** -0.5``;
    * its score cap (``softcap``, Gemma 2: :mod:`lbcc.passes.softcap_attention`), which the rule
      drops too.

    After it (:meth:`release`): each ``GroupQueryAttention`` gets its block's window
    (``local_window_size`` = W: ORT's kernel then sees keys with ``i - j < W``, as transformers'
    sliding masks), scale where it is not the default and cap, and the held blocks go back for
    ``sdpa_via_mha``, whose ``MultiHeadAttention`` adds the graph's mask as it is. A capped block
    that is not ``GroupQueryAttention`` then goes back to exported ops instead
    (``MultiHeadAttention`` has no cap), and ``reasons`` says so."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}
        self.windows: dict[str, int] = {}
        self._by_past: dict[str, tuple[dict[str, float], int, str]] = {}

    def __call__(self, model: ir.Model, debug: bool = False) -> int:
        verdicts: dict[int, tuple[int | None, str]] = {}
        held = 0
        for node in model.graph:
            if node.op_type != "SDPA" or node.domain != FUSION_DOMAIN:
                continue
            mask = node.inputs[3] if len(node.inputs) > 3 else None
            window, why = 0, ""
            if mask is not None:
                if id(mask) not in verdicts:
                    verdicts[id(mask)] = kv_mask_window(model, mask)
                window, why = verdicts[id(mask)]
            past = _nearest_past_key(node.inputs[1])
            if window and past is None:
                window, why = None, "a sliding window, on a block whose cache input is not found"
            if window is None:
                node.domain = HELD_DOMAIN
                self.reasons[_attention_name(node)] = why
                held += 1
            elif past is not None:
                floats = {k: node.attributes.get_float(k, None) for k in ("scale", "softcap")}
                self._by_past[past.name] = ({k: v for k, v in floats.items() if v is not None},
                                            window, _attention_name(node))
        if debug and not held:
            print("Rule: AttentionGuard failed: every attention mask is causal or a window")
        return held

    def release(self, model: ir.Model, debug: bool = False) -> int:
        """Windows, scales and caps onto ``GroupQueryAttention``, held blocks back, capped blocks
        left over expanded; how many changed."""
        changed = 0
        for node in model.graph:
            if node.domain == HELD_DOMAIN:
                node.domain = FUSION_DOMAIN
                changed += 1
                continue
            past = node.inputs[3] if node.op_type == "GroupQueryAttention" \
                and len(node.inputs) > 3 else None
            if past is None or past.name not in self._by_past:
                continue
            floats, window, name = self._by_past[past.name]
            head_dim = past.shape[-1] if past.shape else None
            scale = floats.get("scale")
            if scale is not None and "scale" not in node.attributes and (
                    not isinstance(head_dim, int) or abs(scale * head_dim ** 0.5 - 1) > 1e-6):
                node.attributes["scale"] = ir.AttrFloat32("scale", scale)
                changed += 1
            if floats.get("softcap") and "softcap" not in node.attributes:
                node.attributes["softcap"] = ir.AttrFloat32("softcap", floats["softcap"])
                changed += 1
            if window:
                node.attributes["local_window_size"] = ir.AttrInt64("local_window_size", window)
                self.windows[name] = window
                changed += 1
        for node in model.graph:
            if node.op_type == "SDPA" and node.domain == FUSION_DOMAIN and softcap_of(node):
                name = _attention_name(node)
                self.reasons[name] = "; ".join(x for x in (self.reasons.get(name), (
                    "soft-capped scores (tanh): MultiHeadAttention has no cap, so the block "
                    "runs as exported ops")) if x)
        return changed + expand_sdpa(model, select=softcap_of)


def _nearest_past_key(value: ir.Value | None, max_depth: int = 12) -> ir.Value | None:
    """The ``past_key_values.N.key`` graph input closest above ``value`` (breadth first): the
    cache an attention block's keys extend."""
    from lbcc.kvcache import PAST_RE

    frontier, seen = [value], set()
    for _ in range(max_depth):
        nxt = []
        for v in frontier:
            if v is None or id(v) in seen:
                continue
            seen.add(id(v))
            p = v.producer()
            if p is None:
                m = PAST_RE.match(v.name or "")
                if m and m.group(2) == "key":
                    return v
                continue
            nxt.extend(p.inputs)
        frontier = nxt
    return None


def _attention_name(node: ir.Node) -> str:
    """The layer of a fused attention node: that of the first consumer that has one."""
    from lbcc.irutils import LAYER_KEY, layer_name

    for out in node.outputs:
        for use in out.uses():
            if LAYER_KEY in use.node.metadata_props:
                return layer_name(use.node)
    return layer_name(node)


def kv_cache_fusions() -> list[tuple[str, Callable[..., int], dict]]:
    """(name, fuse function, kwargs) of the fusions that need a KV-cache graph, in order."""
    from onnxscript.rewriter.ort_fusions import gqa, sdpa, sdpa_via_mha

    from lbcc.passes.cleanup import drop_unused_norm_stats

    guard = AttentionGuard()
    return [
        ("rotary_from_position_ids", rotary_from_position_ids, {}),
        ("softcap_sdpa", fuse_softcapped_sdpa, {}),
        ("sdpa", sdpa.fuse_sdpa, {"apply_shape_inference": True}),
        ("identity_reshapes", bypass_identity_reshapes, {}),
        ("guard_attention", guard, {}),
        ("gqa", gqa.fuse_gqa, {}),
        ("restore_attention", guard.release, {}),
        ("share_attention_lengths", share_attention_lengths, {}),
        ("pack_qkv", pack_qkv, {}),
        ("drop_unused_norm_stats", drop_unused_norm_stats, {}),
        ("sdpa_via_mha", sdpa_via_mha.replace_sdpa_by_mha, {}),
        ("last_logits", last_logits, {}),
    ]
