"""``fuse-attention``: a cache-free causal attention -> ``com.microsoft::GroupQueryAttention``.

The scoring graph of a causal LM (no KV cache: ``input_ids[batch, seq]`` only) computes, per
layer, ``q/k/v = Transpose(Reshape(x W_q/k/v))`` (q and k possibly RMS-normed per head, before
the transpose as in Qwen3 or after it as in Gemma 3: GroupQueryAttention then reads the normed
``[batch, seq, hidden]`` form), rotary on q and k (``x·cos + rotate_half(x)·sin``
with ``cos/sin[.., s, :]`` the angles of position ``s``), k and v repeated over each group of query
heads (grouped-query attention), then ``softmax(q kᵀ · scale + mask) v`` with a causal mask, as
some 40 elementwise and layout nodes. ONNX Runtime's ``GroupQueryAttention`` computes the same
thing in one kernel, with the rotary inside (``do_rotary``), without materializing the repeated
k/v or the mask, when fed

- ``seqlens_k[b] = seq - 1`` and ``total_sequence_length = seq`` (no past: a prompt of ``seq``
  tokens at positions ``0 .. seq - 1``),
- ``cos_cache[p, i] = cos[p, i]`` for ``i < head_dim / 2`` (and ``sin_cache`` alike): the graph's
  own angles, rows ``0 .. seq - 1``, since rotate-half rotary pairs channel ``i`` with
  ``i + head_dim / 2`` under one angle (``cos[.., :d/2] == cos[.., d/2:]``).

The match goes through onnxscript's rotary and SDPA fusions and lbcc's soft-capped SDPA (Gemma 2:
``c · tanh(z / c)`` on the scores, the kernel's ``softcap``), as functions, so a block this rule
does not take is inlined back unchanged. What cannot be read off the pattern is checked by
evaluating it: the mask and the cos/sin tensors must depend on shapes only (every path from a
graph input passes through a ``Shape`` of a tensor whose shape is known in terms of the batch and
sequence dims); evaluated on batch 2 x a few sequence lengths
(one beyond 4,096, where common sliding windows end), the mask must be exactly causal (0 on and
below the diagonal, <= -1e4 above) or a sliding window of W tokens (0 for the W keys up to the
diagonal: the kernel's ``local_window_size`` = W; :func:`band_window`), and cos / sin the same
for every batch row with equal halves. A block that fails a check stays as it was, and the pass
notes why.

The fusion runs in the ``ort-int8`` target, after quantization and before lowering: the passes
that measure and smooth layers (v -> o smoothing walks the attention graph) see the graph as
exported, and the fused kernel computes the same function (float rounding aside; the tests bound
the difference).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

from lbcc.irutils import LAYER_KEY, layer_name
from lbcc.pipeline import Pass

FUSION_DOMAIN = "ai.onnxruntime._fusion"
#: the sequence lengths the mask and rotary tensors are evaluated at (batch 2; the last, batch 1)
CHECK_SEQ_LENS = (1, 7, 4099)
#: a masked score must be at most this (exp(-1e4) is 0 in float32)
MASKED_MAX = -1e4


def _resolved_shape(value: ir.Value, dims: tuple[object, object], batch: int, seq: int
                    ) -> list[int] | None:
    """``value``'s shape with the symbolic (batch, sequence) dims ``dims`` set to ``batch`` and
    ``seq``; None when a dim is anything else."""
    if value.shape is None:
        return None
    out = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
        elif d == dims[0]:
            out.append(batch)
        elif d == dims[1]:
            out.append(seq)
        else:
            return None
    return out


def _ancestors(values: list[ir.Value], dims: tuple[object, object]
               ) -> tuple[list[ir.Node], list[ir.Node], str]:
    """Nodes computing ``values`` (any order), the ``Shape`` nodes among them whose input's shape
    is known in terms of the batch and sequence dims (leaves: nothing above them is needed),
    and why the values cannot be computed from shapes alone ("" when they can)."""
    nodes: dict[int, ir.Node] = {}
    leaves: list[ir.Node] = []
    stack = list(values)
    seen: set[int] = set()
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        p = v.producer()
        if p is None:
            if v.const_value is None:
                return [], [], f"{v.name!r} is read as data, not only through its shape"
            continue
        if p.domain not in ("", "ai.onnx"):
            return [], [], f"{p.op_type} ({p.domain}) is not a standard op"
        nodes[id(p)] = p
        if p.op_type == "Shape":
            if p.inputs[0] is None or _resolved_shape(p.inputs[0], dims, 1, 1) is None:
                return [], [], (f"the shape of {p.inputs[0].name!r} is not known in terms of "
                                "the batch and sequence dims")
            leaves.append(p)
            continue
        stack.extend(i for i in p.inputs if i is not None)
    return list(nodes.values()), leaves, ""


def run_subgraph(model: ir.Model, nodes: list[ir.Node], values: list[ir.Value],
                 shape_leaves: dict[int, np.ndarray],
                 feeds: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """``values`` computed by ONNX Runtime from ``nodes`` (their ancestors, any order) alone:
    a ``Shape`` node in ``shape_leaves`` (by id) becomes the constant given there, constants
    come along as initializers, graph inputs are read from ``feeds``."""
    import onnx
    import onnxruntime as ort

    feeds = feeds or {}
    order = {id(n): i for i, n in enumerate(model.graph)}
    protos, inits, seen = [], [], set()
    for n in sorted(nodes, key=lambda n: order.get(id(n), 0)):
        if id(n) in shape_leaves:
            sl = shape_leaves[id(n)][n.attributes.get_int("start", 0):
                                     n.attributes.get_int("end", None)]
            protos.append(onnx.helper.make_node("Constant", [], [n.outputs[0].name],
                                                value=onnx.numpy_helper.from_array(sl)))
            continue
        protos.append(ir.serde.serialize_node(n))
        for i in n.inputs:
            if i is not None and i.producer() is None and i.const_value is not None \
                    and i.name not in seen:
                seen.add(i.name)
                inits.append(ir.serde.serialize_tensor(i.const_value))
                inits[-1].name = i.name
    graph = onnx.helper.make_graph(
        protos, "probe",
        [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(a.dtype),
                                            a.shape) for name, a in feeds.items()],
        [onnx.helper.make_empty_tensor_value_info(v.name) for v in values], inits)
    proto = onnx.helper.make_model(graph, opset_imports=[
        onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    return sess.run([v.name for v in values], feeds)


def _evaluate(model: ir.Model, values: list[ir.Value], batch: int, seq: int,
              dims: tuple[object, object]) -> list[np.ndarray]:
    """Compute ``values`` in ONNX Runtime for an input of ``batch`` x ``seq`` tokens: their
    ancestor nodes, with each ``Shape`` leaf replaced by the constant it would produce."""
    nodes, leaves, why = _ancestors(values, dims)
    if why:
        raise ValueError(why)
    shapes = {id(n): np.array(_resolved_shape(n.inputs[0], dims, batch, seq), np.int64)
              for n in leaves}
    return run_subgraph(model, nodes, values, shapes)


def band_window(masks: list[tuple[int, int, np.ndarray]]) -> tuple[int | None, str]:
    """The keys attention masks let each query see, from ``(past, seq, mask)`` evaluations
    (mask ``[.., seq, past + seq]``: token ``i`` of ``seq`` new ones after ``past`` cached ones;
    a score bias of 0 where a key is seen, <= -1e4 elsewhere; every batch row alike):
    ``(0, "")`` for the plain causal mask (keys ``0 .. past + i``), ``(W, "")`` for a sliding
    window of W tokens (keys ``j`` with ``past + i - j < W``, as transformers' sliding masks and
    ``GroupQueryAttention``'s ``local_window_size`` = W), ``(None, why)`` for anything else."""
    window, seen_at = 0, []
    for past, seq, m in masks:
        total = past + seq
        if m.ndim < 2 or m.shape[-2:] != (seq, total):
            return None, f"the mask has shape {list(m.shape)}, not [.., {seq}, {total}]"
        rows = m.reshape(-1, seq, total)
        seen = rows[0] > MASKED_MAX
        back = past + np.arange(seq)[:, None] - np.arange(total)[None, :]  # i's distance to j
        if np.any(seen & (back < 0)):
            return None, f"the mask shows future keys ({seq} tokens after {past})"
        if np.any(rows != rows[:1]) or np.any(rows[0][seen] != 0):
            return None, f"the mask is not a 0 / -inf mask alike for every row ({seq} after {past})"
        narrow = seen.sum(axis=1) < past + np.arange(seq) + 1  # rows that see less than causal
        if narrow.any():
            w = int(seen.sum(axis=1)[narrow].max())
            window = w if not window else min(window, w)
        seen_at.append((past, seq, back, seen))
    for past, seq, back, seen in seen_at:  # every evaluation is that one band
        if np.any(seen != ((back >= 0) & ((back < window) if window else True))):
            return None, (f"the mask is neither causal nor a sliding window ({seq} tokens after "
                          f"{past})")
    return window, ""


def causal_rotary_reason(model: ir.Model, mask: ir.Value, cos: ir.Value, sin: ir.Value,
                         head_dim: int, dims: tuple[object, object]) -> tuple[str, int]:
    """Why ``mask`` / ``cos`` / ``sin`` are not a causal mask (or a sliding window of W tokens:
    :func:`band_window`) and rotate-half angles of positions ``0 .. seq - 1`` ("" when they
    are), and W (0: plain causal); see the module docstring."""
    masks = []
    for seq in CHECK_SEQ_LENS:
        batch = 1 if seq > 512 else 2
        try:
            m, c, s = _evaluate(model, [mask, cos, sin], batch, seq, dims)
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot prove it": no fusion
            return f"the mask / rotary angles cannot be evaluated from shapes: {exc}"[:300], 0
        if m.ndim != 4 or m.shape[-2:] != (seq, seq):
            return f"the mask has shape {m.shape}, not [batch, 1, {seq}, {seq}]", 0
        masks.append((0, seq, m))
        for name, t in (("cos", c), ("sin", s)):
            if t.shape[-2:] != (seq, head_dim):
                return f"{name} has shape {t.shape}, not [.., {seq}, {head_dim}]", 0
            rows = t.reshape(-1, seq, head_dim)
            if np.any(rows != rows[:1]):
                return f"{name} differs between batch rows", 0
            if np.any(rows[0, :, : head_dim // 2] != rows[0, :, head_dim // 2:]):
                return f"{name}'s two halves differ (not rotate-half rotary)", 0
    window, why = band_window(masks)
    return why, window or 0


class CausalGroupQueryAttention(pattern.RewriteRuleClassBase):
    """Rotary + repeat-kv + causal SDPA of a cache-free graph -> GroupQueryAttention."""

    def __init__(self) -> None:
        super().__init__("CausalGroupQueryAttention", remove_nodes=False)
        self._checked: dict[tuple[int, int, int], tuple[str, int]] = {}
        self._caches: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}
        #: (symbolic batch, seq) -> (seq as int64 [1], total_sequence_length, seqlens_k)
        self._lengths: dict[tuple[str, str], tuple[ir.Value, ir.Value, ir.Value]] = {}
        #: why each matched block was not fused (its check's failure), in graph order
        self.reasons: list[str] = []

    def cleanup(self) -> None:
        self._checked.clear()
        self._caches.clear()
        self._lengths.clear()

    def _fail(self, result: pattern.MatchResult, reason: str, where) -> pattern.MatchResult:
        self.reasons.append(reason)
        return result.fail(reason, where)

    @staticmethod
    def _heads(op, x_bsd, name: str):
        """``x`` split into heads and transposed, with the per-head RMS norm some families put
        before the transpose (Qwen3) or after it (Gemma 3) matched where present."""
        x_bshd = op.Reshape(x_bsd, pattern.ANY_VALUE, _outputs=[f"{name}_bshd"])
        x_pre = pattern.OrValue([op.SimplifiedLayerNormalization(
            x_bshd, pattern.ANY_VALUE, axis=-1, _outputs=[f"{name}_norm_pre"]), x_bshd])
        x = op.Transpose(x_pre, perm=[0, 2, 1, 3])
        return pattern.OrValue([op.SimplifiedLayerNormalization(
            x, pattern.ANY_VALUE, axis=-1, _outputs=[f"{name}_norm_post"]), x])

    def pattern(self, op, q_bsd, k_bsd, v_bsd, cos, sin, mask):
        q = self._heads(op, q_bsd, "q")
        k = self._heads(op, k_bsd, "k")
        v = op.Transpose(op.Reshape(v_bsd, pattern.ANY_VALUE), perm=[0, 2, 1, 3])
        q_rot = op.RotaryEmbedding(q, cos, sin, _domain=FUSION_DOMAIN, _outputs=["q_rot"])
        k_rot = op.RotaryEmbedding(k, cos, sin, _domain=FUSION_DOMAIN, _outputs=["k_rot"])
        # grouped-query attention repeats each kv head over its group of query heads
        k_rep = op.Reshape(op.Expand(op.Unsqueeze(k_rot, [2]), pattern.ANY_VALUE),
                           pattern.ANY_VALUE)
        v_rep = op.Reshape(op.Expand(op.Unsqueeze(v, [2]), pattern.ANY_VALUE),
                           pattern.ANY_VALUE)
        k_all = pattern.OrValue([k_rep, k_rot])
        v_all = pattern.OrValue([v_rep, v])
        att = op.SDPA(q_rot, k_all, v_all, mask, key_format="BHSd", _domain=FUSION_DOMAIN,
                      _outputs=["att"])
        return op.Reshape(op.Transpose(att, perm=[0, 2, 1, 3]), pattern.ANY_VALUE,
                          _outputs=["out"])

    def check(self, context, q_bsd, k_bsd, v_bsd, cos, sin, mask, q_bshd, k_bshd, q_rot,
              k_rot, out, q_norm_pre=None, q_norm_post=None, k_norm_pre=None,
              k_norm_post=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if (q_norm_pre is not None and q_norm_post is not None) or (
                k_norm_pre is not None and k_norm_post is not None):
            return self._fail(result, "query or key normalized twice", q_bshd)
        for name, val in (("query", q_bsd), ("key", k_bsd), ("value", v_bsd)):
            if not _ir_utils.has_rank(val, 3):
                return self._fail(result, f"the {name} projection is not [batch, seq, hidden]",
                                  val)
        heads = _ir_utils.get_dim(q_bshd, 2)
        kv_heads = _ir_utils.get_dim(k_bshd, 2)
        head_dim = _ir_utils.get_dim(q_bshd, 3)
        if not all(isinstance(d, int) for d in (heads, kv_heads, head_dim)) \
                or heads % kv_heads or head_dim % 2:
            return self._fail(result, "head counts / head size are not static (or do not "
                              "divide)", [q_bshd, k_bshd])
        if head_dim % 16:
            return self._fail(result, f"head size {head_dim} is not a multiple of 16 (ONNX "
                              "Runtime's GroupQueryAttention needs one)", q_bshd)
        if not _ir_utils.has_rank(out, 3):
            return self._fail(result, "the attention output is not reshaped to [batch, seq, "
                              "hidden]", out)
        for rot in (q_rot, k_rot):
            if rot.producer().attributes.get_int("interleaved", 0) != 0:
                return self._fail(result, "interleaved rotary", rot)
        dims = (q_bsd.shape[0], q_bsd.shape[1])
        key = (id(mask), id(cos), id(sin))
        if key not in self._checked:
            self._checked[key] = causal_rotary_reason(context.model, mask, cos, sin,
                                                      head_dim, dims)
        why, self._window = self._checked[key]
        if why:
            return self._fail(result, why, mask)
        self._heads, self._kv_heads, self._head_dim = heads, kv_heads, head_dim
        self._layer = layer_name(out.producer())
        return result

    @staticmethod
    def _input(op, x_bsd, x_bshd, norm_pre, norm_post):
        """What GroupQueryAttention reads for q or k: ``[batch, seq, heads * head_dim]``, the
        per-head norm applied (a norm after the transpose is the same norm over the last axis,
        so it is applied before it, on the ``[batch, seq, heads, head_dim]`` form)."""
        norm = norm_pre if norm_pre is not None else norm_post
        if norm is None:
            return x_bsd
        node = norm.producer()
        normed = op.SimplifiedLayerNormalization(
            x_bshd, node.inputs[1], axis=-1,
            epsilon=node.attributes.get_float("epsilon", 1e-5),
            stash_type=node.attributes.get_int("stash_type", 1))
        return op.Reshape(normed, op.Constant(value_ints=[0, 0, -1]))

    def rewrite(self, op, q_bsd, k_bsd, v_bsd, cos, sin, att, q_bshd, k_bshd, q_norm_pre=None,
                q_norm_post=None, k_norm_pre=None, k_norm_post=None, **_):
        # every block of one batch x seq input shares these: computed once, by the first block
        dims = (str(q_bsd.shape[0]), str(q_bsd.shape[1]))
        if dims not in self._lengths:
            batch = op.Shape(q_bsd, start=0, end=1)
            seq64 = op.Shape(q_bsd, start=1, end=2)
            seq = op.Cast(seq64, to=ir.DataType.INT32)
            one = op.Constant(value=ir.tensor(np.array([1], np.int32)))
            self._lengths[dims] = (seq64, op.Squeeze(seq), op.Expand(op.Sub(seq, one), batch))
        seq64, total, seqlens_k = self._lengths[dims]
        key = (id(cos), id(sin))
        if key not in self._caches:
            half = self._head_dim // 2
            zeros = op.Constant(value_ints=[0, 0])
            axes = op.Constant(value_ints=[0, 1])
            ends = op.Concat(seq64, op.Constant(value_ints=[half]), axis=0)
            flat = op.Constant(value_ints=[-1, self._head_dim])
            self._caches[key] = tuple(op.Slice(op.Reshape(t, flat), zeros, ends, axes)
                                      for t in (cos, sin))
        cos_cache, sin_cache = self._caches[key]
        attrs = {"num_heads": self._heads, "kv_num_heads": self._kv_heads, "do_rotary": 1,
                 "rotary_interleaved": 0}
        for name in ("scale", "softcap"):
            value = att.producer().attributes.get_float(name, None)
            if value is not None:
                attrs[name] = value
        if self._window:
            attrs["local_window_size"] = self._window
        q_in = self._input(op, q_bsd, q_bshd, q_norm_pre, q_norm_post)
        k_in = self._input(op, k_bsd, k_bshd, k_norm_pre, k_norm_post)
        out, _, _ = op.GroupQueryAttention(q_in, k_in, v_bsd, None, None, seqlens_k, total,
                                           cos_cache, sin_cache, _domain="com.microsoft",
                                           _outputs=3, **attrs)
        out.producer().metadata_props[LAYER_KEY] = self._layer
        return out


def _with_rotary_shapes(model: ir.Model) -> None:
    """The fused rotary calls keep their input's shape and type (SDPA's check reads shapes)."""
    for node in model.graph:
        if node.domain == FUSION_DOMAIN and node.op_type == "RotaryEmbedding":
            out, x = node.outputs[0], node.inputs[0]
            if out.shape is None:
                out.shape, out.type = x.shape, x.type


def bypass_identity_reshapes(model: ir.Model, debug: bool = False) -> int:
    """Skip a ``Reshape`` of a fusion ``SDPA``'s output whose output shape is its input's (Phi-3
    reshapes the attention to the shape it has, ``[batch, heads, seq, head_dim]``, before the
    transpose back; the GQA rules expect the transpose right after the attention). Both shapes
    must be fully known, dim for dim the same. Returns how many were skipped."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        x, y = node.inputs[0], node.outputs[0]
        src = x.producer() if x is not None else None
        if src is None or src.op_type != "SDPA" or src.domain != FUSION_DOMAIN or \
                x.shape is None or y.shape is None or list(x.shape) != list(y.shape) or \
                y.is_graph_output():
            continue
        y.replace_all_uses_with(x)
        model.graph.remove(node, safe=True)
        count += 1
    if debug and not count:
        print("Rule: BypassIdentityReshapes failed: no Reshape of an attention to its own shape")
    return count


def expand_sdpa(model: ir.Model, select=lambda node: True) -> int:
    """Each fusion ``SDPA`` left (a block no rule took) for which ``select(node)`` holds, back to
    standard ops: ``Where(IsNaN(p), 0, p) @ v`` with ``p = Softmax(z + mask)``, ``z = q @ kᵀ ·
    scale``, or ``z = c · tanh(q @ kᵀ · scale / c)`` with a ``softcap`` c: the exported form's
    arithmetic. Returns how many."""
    graph, count = model.graph, 0
    for node in list(graph):
        if node.domain != FUSION_DOMAIN or node.op_type != "SDPA" or not select(node):
            continue
        q, k, v = node.inputs[:3]
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        head_dim = _ir_utils.get_dim(q, 3)
        scale = node.attributes.get_float("scale", None)
        if scale is None:
            scale = 1.0 / float(np.sqrt(head_dim))
        perm = [0, 1, 3, 2] if node.attributes.get_string("key_format", "BHSd") == "BHSd" \
            else [0, 2, 3, 1]

        def const(x: float) -> ir.Node:
            return ir.node("Constant", [], attributes={"value": ir.tensor(np.array(
                x, np.float32))})

        scale_c, zero = const(scale), const(0.0)
        kt = ir.node("Transpose", [k], attributes={"perm": perm})
        scores = ir.node("MatMul", [q, kt.outputs[0]])
        scaled = ir.node("Mul", [scores.outputs[0], scale_c.outputs[0]])
        new = [scale_c, zero, kt, scores, scaled]
        cap = node.attributes.get_float("softcap", None)
        if cap:
            cap_c = const(cap)
            inside = ir.node("Div", [scaled.outputs[0], cap_c.outputs[0]])
            tanh = ir.node("Tanh", [inside.outputs[0]])
            new += [cap_c, inside, tanh, ir.node("Mul", [tanh.outputs[0], cap_c.outputs[0]])]
        if mask is not None:
            new.append(ir.node("Add", [new[-1].outputs[0], mask]))
        probs = ir.node("Softmax", [new[-1].outputs[0]], attributes={"axis": -1})
        nan = ir.node("IsNaN", [probs.outputs[0]])
        safe = ir.node("Where", [nan.outputs[0], zero.outputs[0], probs.outputs[0]])
        result = ir.node("MatMul", [safe.outputs[0], v])
        new += [probs, nan, safe, result]
        graph.insert_before(node, new)
        result.outputs[0].shape, result.outputs[0].type = node.outputs[0].shape, \
            node.outputs[0].type
        node.outputs[0].replace_all_uses_with(result.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        count += 1
    return count


def fuse_causal_attention(model: ir.Model, debug: bool = False) -> tuple[int, int, list[str]]:
    """Fuse every cache-free causal attention block of ``model``. Returns (blocks fused, blocks
    left as they were, why those were left: one reason each where the rule's check ran).
    ``debug`` prints onnxscript's matching tracer report (where a pattern stopped matching)."""
    from onnxscript.rewriter.ort_fusions import rotary_embedding, sdpa

    from lbcc.passes.softcap_attention import fuse_softcapped_sdpa

    rotary_embedding.rotary_embedding_rules.apply_to_model(model, verbose=0)
    _with_rotary_shapes(model)
    fuse_softcapped_sdpa(model)
    sdpa.sdpa_rules.apply_to_model(model, verbose=0)
    bypass_identity_reshapes(model)
    rule = CausalGroupQueryAttention()  # kept: its ``reasons`` are read below
    rules = pattern.RewriteRuleSet([pattern.RewriteRule(
        rule.pattern, rule.rewrite, rule.check, name=rule.name, remove_nodes=rule.remove_nodes,
        graph_pre_visitor=rule.setup, graph_post_visitor=rule.cleanup)])
    tracer = pattern.MatchingTracer() if debug else None
    count = rules.apply_to_model(model, tracer=tracer, verbose=0)
    if tracer is not None:
        tracer.report()
    left = expand_sdpa(model)
    if model.functions:
        ir.passes.common.InlinePass()(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.RemoveUnusedFunctionsPass()(model)
    reasons = list(dict.fromkeys(rule.reasons))
    if left and not reasons:
        reasons = ["no rotary -> repeat-kv -> causal attention pattern (run with debug=True "
                   "for where matching stopped)"]
    return count, left, reasons if left else []


class FuseAttention(Pass):
    """``fuse-attention``: :func:`fuse_causal_attention`, with counts and reasons in the report."""

    name = "fuse-attention"
    preserves = frozenset({"activation-stats"})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from lbcc.kvcache import kv_layout

        if kv_layout(model) is not None:
            self.note("skipped", "a KV-cache graph: fuse-ort already made its attention "
                                 "GroupQueryAttention")
            return ir.passes.PassResult(model, modified=False)
        fused, left, reasons = fuse_causal_attention(model)
        self.note("fused", fused)
        self.note("left_unfused", left)
        if reasons:
            self.note("why_not", reasons)
        return ir.passes.PassResult(model, modified=fused > 0)
