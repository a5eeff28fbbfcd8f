"""``smooth-quant``: SmoothQuant (Xiao et al., 2023) migration of activation outliers into weights.

For a group of MatMuls ``MatMul(x, W_i[K, N_i])`` sharing one input whose producer can absorb a
per-channel factor, with per-input-channel factors s:

    x' = x · diag(s)^-1  (folded into the producer: a norm's gamma' = gamma / s, or the columns of
                          the linear feeding an elementwise product, W_up' = W_up · diag(s)^-1),
    W_i' = diag(s) · W_i (every consumer's weight rows scaled),
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),

so x' W' = x W exactly in float. Groups come from the graph, not from layer names: a norm before
q/k/v or gate/up, as in the paper; attention's value -> output projection (v -> o: ``1/s`` in the
value projection's weight columns, ``s`` in the output projection's rows through a channel map,
since with grouped-query attention each kv channel is read by every query head of its group and
so carries one factor for all of them; exact because attention only mixes tokens); and
(``linear_groups``, off by default) SwiGLU's
``down(silu(gate) * up)``, a linear -> linear fold. Measured on SmolLM2 (first 8,192 test
tokens): with the down-projections smoothed too, every layer passes the static-int8 SQNR check on
the calibration rows, yet perplexity is 1.16x float against 1.05x for plain W8A8; the massive
activations of the down-projection inputs do not smooth in a way that generalizes. AWQ
(weight-only) uses those groups. alpha is searched per
group on [0, 1] (step 0.05) by the measured error of the quantized group on calibration rows
that the maxima in ``s`` were not taken from (:func:`search_alpha`: when the calibration kept
most of its tokens as rows, ``s`` and the activation range are fitted on half of them and the
error measured on the other half, so that a channel maximum the calibration underestimated
costs what it will cost on new text): per-tensor uint8 activations (min/max of the smoothed
rows) and per-channel symmetric int8 weights, the mean over consumers i and tokens t of
``||(X W_i - Q(X / s) Q(s W_i))_t||^2 / ||(X W_i)_t||^2``; a group is left alone
when no alpha beats not smoothing, and when even smoothed every consumer stays below the
recipe's ``min_sqnr_db`` (``-10 log10`` of its relative error): those layers fall back to int8 per
block of input channels at run time, where the rows scaled by a large ``s_j`` would only widen
their weight blocks. A tied lm_head (``MatMul(x, Transpose(E))`` with ``E`` also the embedding
table) is smoothed on a copy, ``W = diag(s) E^T``, when ``untie`` is set and smoothing it helps:
the embedding keeps ``E``, and the model stores one more K x N matrix (the report says how many
bytes). Measured on SmolLM2 (first 8,192 test tokens), the final norm -> lm_head input was the
largest single static-int8 error: float activations there alone took ``auto`` from 1.032x to
1.016x float perplexity. Groups whose weights or norm scale are otherwise shared are skipped
with that reason. The model changes, so the activation statistics are recomputed for the passes
after it. Run before weight rounding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from lbcc.irutils import add_initializer, layer_name
from lbcc.numerics import token_sqnr_db
from lbcc.pipeline import Pass
from lbcc.passes.calibrate import ACTIVATION_STATS

NORM_SCALE_INPUT = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2,
                    "LayerNormalization": 1, "SkipLayerNormalization": 2,
                    "RMSNormalization": 1}


@dataclasses.dataclass
class SmoothGroup:
    """Consumers ``MatMul(output, W_i[K, N_i])`` whose shared input can absorb ``diag(s)^-1``.

    ``fold`` is where ``1/s`` goes: a norm's gamma (``fold_axis=0``: gamma' = gamma / s) or the
    weight ``W_p[K_p, K]`` of a linear whose output reaches ``output`` only through an
    elementwise product (``fold_axis=1``: columns, ``W_p' = W_p · diag(s)^-1``), as in the
    up-projection feeding ``down(silu(gate(x)) * up(x))``.
    """

    prev: ir.Node  # the norm, or the linear whose weight columns absorb 1/s
    fold: ir.Value  # the initializer 1/s is folded into
    fold_axis: int
    output: ir.Value  # the tensor all consumers read (its calibration rows drive the search)
    consumers: list[ir.Node]
    #: consumer input channel j reads fold channel ``channel_map[j]`` (None: the identity), as
    #: attention's output channel (head h, dim d) reads v channel (kv head of h, d)
    channel_map: np.ndarray | None = None

    @property
    def kind(self) -> str:
        if self.fold_axis == 0:
            return "norm"
        return "linear" if self.channel_map is None else "attention"

    def to_fold(self, per_channel: np.ndarray) -> np.ndarray:
        """A per-consumer-channel statistic reduced (max) onto the fold channels."""
        if self.channel_map is None:
            return per_channel
        out = np.full(int(self.channel_map.max()) + 1, -np.inf, np.float64)
        np.maximum.at(out, self.channel_map, per_channel.astype(np.float64))
        return out

    def expand(self, s: np.ndarray) -> np.ndarray:
        """Factors on the fold channels as factors on the consumers' input channels."""
        return s if self.channel_map is None else s[self.channel_map]


def _tied_table(u: ir.Node) -> ir.Value | None:
    """``E`` when ``u`` is ``MatMul(x, Transpose(E))`` with ``E`` a constant 2-D table that
    something else (the embedding Gather) also reads: a tied lm_head."""
    t = u.inputs[1].producer() if u.inputs[1] is not None else None
    if (t is None or t.op_type != "Transpose" or len(u.inputs[1].uses()) != 1
            or list(t.attributes.get_ints("perm", [1, 0])) != [1, 0]):
        return None
    e = t.inputs[0]
    if e is None or e.const_value is None or len(e.const_value.shape) != 2 or len(e.uses()) < 2:
        return None
    return e


def consumer_weight(u: ir.Node) -> np.ndarray:
    """The ``[K, N]`` float weight of a group consumer (``E^T`` for a tied lm_head)."""
    e = _tied_table(u)
    if e is not None:
        return np.ascontiguousarray(e.const_value.numpy().T)
    return u.inputs[1].const_value.numpy()


def _token_slice(node: ir.Node) -> bool:
    """``node`` is a Slice of tokens only (its constant axes leave the last, channel axis whole),
    as ``logits_to_keep`` cuts the final norm's output before the lm_head: a per-channel factor
    passes through it unchanged."""
    if node.op_type != "Slice" or len(node.inputs) < 4 or node.inputs[3] is None \
            or node.inputs[0] is None or node.inputs[0].shape is None \
            or node.outputs[0].is_graph_output():
        return False
    axes, rank = node.inputs[3].const_value, len(node.inputs[0].shape)
    return axes is not None and rank > 0 and \
        all(int(a) % rank != rank - 1 for a in axes.numpy().reshape(-1))


def _const_matmul_consumers(out: ir.Value, untie: bool = False) -> list[ir.Node] | None:
    """The users of ``out`` if every one is ``MatMul(out, W[K, N])`` with a constant, unshared W
    (or, ``untie``, a tied lm_head, which smoothing gives its own copy), also when read through a
    Slice of tokens (:func:`_token_slice`)."""
    reads: list[tuple[ir.Node, ir.Value]] = []
    for use in out.uses():
        if _token_slice(use.node):
            reads += [(u.node, use.node.outputs[0]) for u in use.node.outputs[0].uses()]
        else:
            reads.append((use.node, out))

    def ok(u: ir.Node, x: ir.Value) -> bool:
        if u.op_type != "MatMul" or u.inputs[0] is not x or u.inputs[1] is None:
            return False
        if untie and _tied_table(u) is not None:
            return True
        w = u.inputs[1].const_value
        return w is not None and len(w.shape) == 2 and len(u.inputs[1].uses()) == 1

    if not reads or not all(ok(u, x) for u, x in reads):
        return None
    return [u for u, _ in reads]


def _linear_before_product(mul: ir.Node, channels: int) -> ir.Node | None:
    """For ``Mul(a, b)``, a MatMul with a constant unshared weight ``[K_p, channels]`` producing
    ``a`` or ``b`` and used only there, so scaling its output columns scales the product's
    channels (the other factor broadcasts onto them, never the reverse)."""
    for operand in mul.inputs:
        p = operand.producer() if operand is not None else None
        if (p is not None and p.op_type == "MatMul" and len(operand.uses()) == 1
                and p.inputs[1] is not None and p.inputs[1].const_value is not None
                and len(p.inputs[1].const_value.shape) == 2
                and p.inputs[1].const_value.shape[1] == channels
                and len(p.inputs[1].uses()) == 1):
            return p
    return None


def _static_shape(value: ir.Value) -> list[int] | None:
    """``value``'s shape with every symbolic dimension (batch, sequence) taken as 1."""
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else 1 for d in value.shape]


def _unsqueeze_axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = node.inputs[1].const_value
        return None if axes is None else [int(a) for a in axes.numpy().reshape(-1)]
    return list(node.attributes.get_ints("axes", [])) or None


def _cache_append_input(concat: ir.Node, out: ir.Value) -> ir.Value | None:
    """The new values of ``present.N.value = Concat(past_key_values.N.value, new)``, a value
    cache's append in a KV-cache graph (the cache is this graph's own earlier output, so its
    entries carry whatever scale the value projection has); None for any other Concat."""
    from lbcc.kvcache import PAST_RE, PRESENT_RE

    present = PRESENT_RE.match(out.name or "")
    if concat.op_type != "Concat" or present is None or present.group(2) != "value" \
            or len(concat.inputs) != 2 or any(v is None for v in concat.inputs):
        return None
    past, new = concat.inputs
    match = PAST_RE.match(past.name or "")
    if past.producer() is not None or match is None or match.groups() != present.groups():
        return None
    return new


def attention_value_map(x: ir.Value) -> tuple[ir.Node, np.ndarray, str] | None:
    """For the input ``x`` of an attention output projection, the value projection and, per
    channel of ``x``, the value channel it carries (or None, with the reason as the third item
    when a path was found but cannot be used).

    Walks back from ``x`` through Reshape / Transpose / Unsqueeze / Expand (grouped-query
    attention repeats each kv head), the probabilities-times-values MatMul (a mix over the
    sequence axis only) and, in a KV-cache graph, the value cache's append (``present =
    Concat(past, new)`` along the sequence: past entries came from the same, already scaled,
    projection in earlier steps) to a MatMul with a constant 2-D weight. The channel map comes
    from running that path on an index tensor (symbolic dimensions taken as 1): attention never
    mixes channels, so ``x[..., j] = sum_t P[t] v[t, map[j]]`` (every token must read the same
    map), and scaling v's channel c by ``1/s_c`` (the value projection's weight columns) scales
    every ``x`` channel that reads it by the same factor, exactly, whatever the probabilities.
    """
    path: list[ir.Node] = []
    v = x
    while True:
        p = v.producer()
        appended = _cache_append_input(p, v) if p is not None else None
        if p is None or (v.is_graph_output() and appended is None) or \
                (v is not x and len(v.uses()) != 1):
            return None
        if appended is not None:
            path.append(p)  # same channels as the new values, broadcast to the output's shape
            v = appended
        elif p.op_type == "MatMul" and len(p.inputs) == 2 and p.inputs[1] is not None:
            w = p.inputs[1].const_value
            if w is not None:
                if len(w.shape) != 2:
                    return None
                vproj = p
                break
            if p.inputs[0] is None or p.inputs[0].const_value is not None:
                return None
            path.append(p)  # attention probabilities @ values
            v = p.inputs[1]
        elif p.op_type in ("Reshape", "Transpose", "Unsqueeze", "Expand"):
            path.append(p)
            v = p.inputs[0]
        else:
            return None
    if not any(n.op_type == "MatMul" for n in path):
        return None
    n_v = int(vproj.inputs[1].const_value.shape[1])
    start = _static_shape(vproj.outputs[0]) or [1, 1, n_v]
    if start[-1] != n_v:
        return None
    idx = np.broadcast_to(np.arange(n_v), start)
    try:
        for node in reversed(path):
            shape = _static_shape(node.outputs[0])
            if node.op_type == "Transpose":
                perm = node.attributes.get_ints("perm", None)
                idx = np.transpose(idx, perm) if perm is not None else idx.T
            elif node.op_type == "Unsqueeze":
                axes = _unsqueeze_axes(node)
                if axes is None:
                    return None
                idx = np.expand_dims(idx, tuple(axes))
            elif shape is None:
                return None
            elif node.op_type == "Reshape":
                idx = idx.reshape(shape)
            else:  # Expand, MatMul(P, v) or the cache append: same channels, output's shape
                idx = np.broadcast_to(idx, shape)
            if shape is not None and list(idx.shape) != shape:
                return None
    except ValueError:
        return None
    k = x.shape[-1] if x.shape is not None else None
    if not isinstance(k, int) or idx.size % k:
        return None
    rows = idx.reshape(-1, k)  # one row per (batch, token): each must read the same channels
    channel_map = np.ascontiguousarray(rows[0])
    if (rows != channel_map).any():
        return None
    if np.unique(channel_map).size != n_v:
        return vproj, channel_map, "some value channels never reach the output projection"
    return vproj, channel_map, ""


def find_smooth_groups(model: ir.Model, untie: bool = False
                       ) -> tuple[list[SmoothGroup], list[tuple[str, str]]]:
    """Norm -> {MatMul} and linear -> product -> {MatMul} groups, and (layer, reason) skipped.

    Found from the graph alone: a normalization whose output feeds only MatMuls with constant
    weights (q/k/v, gate/up; a norm whose scale tensor other nodes read too, as an exporter's
    deduplication of equal scales leaves it, gets its own copy in the graph), and an elementwise
    product with one factor straight from a constant-weight MatMul (SwiGLU's up-projection)
    feeding only such MatMuls (down).
    """
    groups, skipped = [], []
    for node in model.graph:
        idx = NORM_SCALE_INPUT.get(node.op_type)
        if idx is not None and len(node.inputs) > idx and node.inputs[idx] is not None:
            scale, out = node.inputs[idx], node.outputs[0]
            name = layer_name(node)
            users = _const_matmul_consumers(out, untie)
            if scale.const_value is None or len(scale.const_value.shape) != 1:
                skipped.append((name, "the norm's scale is not a constant vector"))
            elif users is None:
                skipped.append((name, "the norm output feeds something other than MatMuls with "
                                      "constant, unshared 2-D weights (e.g. a tied lm_head)"))
            else:
                if len(scale.uses()) != 1:  # equal scales deduplicated (e.g. norms left at 1.0)
                    scale = add_initializer(model.graph, f"{name}.scale",
                                            scale.const_value.numpy().copy())
                    node.replace_input_with(idx, scale)
                read = {id(u.inputs[0]): u.inputs[0] for u in users}
                # the tensor the consumers read (a token Slice of ``out``): its calibration rows
                groups.append(SmoothGroup(node, scale, 0,
                                          next(iter(read.values())) if len(read) == 1 else out,
                                          users))
        elif node.op_type == "Mul":
            users = _const_matmul_consumers(node.outputs[0])
            prev = (_linear_before_product(node, users[0].inputs[1].const_value.shape[0])
                    if users else None)
            if users and prev is not None:
                groups.append(SmoothGroup(prev, prev.inputs[1], 1, node.outputs[0], users))
        elif node.op_type in ("Reshape", "Transpose"):
            users = _const_matmul_consumers(node.outputs[0])
            found = attention_value_map(node.outputs[0]) if users else None
            if found is None:
                continue
            vproj, channel_map, reason = found
            if users[0].inputs[1].const_value is None or \
                    consumer_weight(users[0]).shape[0] != channel_map.size:
                continue
            if reason:
                skipped.append((layer_name(vproj), reason))
            elif len(vproj.inputs[1].uses()) != 1:
                skipped.append((layer_name(vproj), "the value projection's weight is shared"))
            else:
                groups.append(SmoothGroup(vproj, vproj.inputs[1], 1, node.outputs[0], users,
                                          channel_map))
    return groups, skipped


def apply_scales(g: SmoothGroup, s: np.ndarray, graph: ir.Graph | None = None) -> int:
    """Fold ``diag(s)^-1`` into ``g.fold`` and ``diag(s)`` (``s`` on the fold channels, expanded
    through the group's channel map) into every consumer's weight rows;
    a tied consumer gets its own scaled copy of the table (``graph`` needed). Returns the bytes
    of the copies made."""
    s = s.astype(np.float64)
    f = g.fold.const_value.numpy().astype(np.float64)
    f = f / s if g.fold_axis == 0 else f / s[None, :]
    g.fold.const_value = ir.tensor(f.astype(np.float32), name=g.fold.name)
    s = g.expand(s)
    added = 0
    for u in g.consumers:
        wv = u.inputs[1]
        w = consumer_weight(u).astype(np.float64)
        scaled = (w * s[:, None]).astype(np.float32)
        e = _tied_table(u)
        if e is not None:
            if graph is None:
                raise ValueError("untying a tied consumer needs the graph")
            transpose = wv.producer()
            u.replace_input_with(1, add_initializer(graph, f"{e.name}.untied", scaled))
            graph.remove(transpose, safe=True)
            added += scaled.size
        else:
            wv.const_value = ir.tensor(scaled, name=wv.name)
    return added


def _fake_quant_rows(x: np.ndarray, fit: np.ndarray | None = None) -> np.ndarray:
    """Per-tensor uint8 of ``x`` on the min/max range of ``fit`` (default ``x`` itself): values
    beyond a range taken from other rows clip, as they do on text the calibration never saw."""
    fit = x if fit is None else fit
    lo, hi = min(float(fit.min()), 0.0), max(float(fit.max()), 0.0)
    step = (hi - lo) / 255.0 or 1.0
    zp = np.rint(-lo / step)
    return (np.clip(np.rint(x / step) + zp, 0, 255) - zp) * step


def _fake_quant_columns(w: np.ndarray) -> np.ndarray:
    """Per-output-channel symmetric int8 of ``w[K, N]`` (round to nearest), dequantized."""
    sc = np.abs(w).max(axis=0, keepdims=True) / 127.0
    sc[sc == 0] = 1.0
    return np.clip(np.rint(w / sc), -128, 127) * sc


def consumer_errors(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray,
                    refs: list[np.ndarray] | None = None,
                    fit: np.ndarray | None = None) -> list[float]:
    """Per consumer, the token-averaged relative error of the group quantized W8A8 after
    smoothing: ``mean_t ||(X W_i - Q(X / s) Q(s W_i))_t||^2 / ||(X W_i)_t||^2``, every token
    counted once (a few massive tokens would otherwise set the whole search). ``fit``: the rows
    whose smoothed range quantizes ``X`` (default ``X``'s own)."""
    xq = _fake_quant_rows(x / s, None if fit is None else fit / s)
    refs = refs if refs is not None else [x @ w for w in weights]
    return [10.0 ** (-token_sqnr_db(ref, xq @ _fake_quant_columns(w * s[:, None])) / 10.0)
            for w, ref in zip(weights, refs)]


def group_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray,
                refs: list[np.ndarray] | None = None, fit: np.ndarray | None = None) -> float:
    """Relative output error of the group quantized W8A8 after smoothing with ``s`` (the mean of
    its consumers'), the activation range from ``fit`` (default ``x``)."""
    parts = consumer_errors(x, weights, s, refs, fit)
    return float(np.mean(parts)) if parts else 0.0


#: fewest calibration rows a group needs for the held-out alpha search (fewer: in-sample)
MIN_HELD_OUT_ROWS = 32


def split_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Calibration rows as (fit, held out): the first and second halves, which come from
    different calibration samples (the observer keeps rows sample by sample). With fewer than
    :data:`MIN_HELD_OUT_ROWS` rows both are all of them."""
    if len(x) < MIN_HELD_OUT_ROWS:
        return x, x
    half = len(x) // 2
    return x[:half], x[half:]


@dataclasses.dataclass
class AlphaSearch:
    """The outcome of :func:`search_alpha`."""

    alpha: float | None  # None: no alpha beat leaving the group unsmoothed
    s: np.ndarray | None  # the factors on the fold channels (from every calibration token)
    error_before: float  # group error unsmoothed (held-out rows)
    error_after: float  # group error at ``alpha`` (held-out rows)
    consumer_errors: list[float]  # per consumer at ``alpha`` (held-out rows)
    held_out_rows: int  # 0: not split (every kept row scored; see search_alpha)


#: the maxima ``s`` is fitted on count as out of sample for the scored rows when the calibration
#: saw at least this many times as many tokens as it kept rows
OUT_OF_SAMPLE_TOKENS = 4


def search_alpha(x: np.ndarray, weights: list[np.ndarray], channel_absmax: np.ndarray,
                 alphas: list[float], to_fold=lambda v: v, expand=lambda v: v,
                 tokens: int | None = None, held_out: bool | None = None) -> AlphaSearch:
    """SmoothQuant's per-group alpha, chosen by the measured W8A8 error on rows that the
    maxima ``s`` divides by were not taken from.

    ``x``: calibration rows of the group input; ``weights``: its consumers' ``W_i[K, N_i]``;
    ``channel_absmax``: max |x_j| over the ``tokens`` calibration tokens. ``s`` divides each
    channel by its maximum as calibration saw it; scored on the rows those maxima came from,
    the search favours alphas near 1 that equalize exactly those rows, and a channel whose
    maximum the calibration underestimated then scales new text far beyond the range (measured
    on tiny Llama / Qwen2 / Qwen3 models calibrated on 128 tokens, all of them kept: the
    in-sample search tripled the logit error of plain W8A8 on other text). So:

    * when the calibration saw many more tokens than it kept (``tokens >=``
      :data:`OUT_OF_SAMPLE_TOKENS` x rows: on SmolLM2 8,192 tokens, 512 rows), ``s`` comes from
      every token's maxima and the error (:func:`group_error`) from every kept row, whose
      values set few of those maxima;
    * otherwise the kept rows are split (:func:`split_rows`): ``s`` and the activation range
      fitted on one half, the error measured on the other.

    ``held_out`` forces the split (True) or not (False). The returned ``s`` is computed at the
    chosen alpha from every token's maxima."""
    if held_out is None:
        held_out = tokens is None or tokens < OUT_OF_SAMPLE_TOKENS * len(x)
    fit, held = split_rows(x) if held_out else (None, x)
    refs = [held @ w for w in weights]
    wmax = np.maximum(to_fold(np.max([np.abs(w).max(axis=1) for w in weights], axis=0)), 1e-5)

    def factors(xmax: np.ndarray, a: float) -> np.ndarray:
        xmax = np.maximum(to_fold(xmax), 1e-5)
        return np.clip(xmax**a / wmax ** (1.0 - a), 1e-5, 1e5).astype(np.float32)

    fit_max = channel_absmax if fit is None else np.abs(fit).max(axis=0)
    base = group_error(held, weights, np.ones(x.shape[1], np.float32), refs, fit)
    best, best_a = base, None
    for a in alphas:
        err = group_error(held, weights, expand(factors(fit_max, a)), refs, fit)
        if err < best:
            best, best_a = err, a
    parts = ([] if best_a is None else
             consumer_errors(held, weights, expand(factors(fit_max, best_a)), refs, fit))
    return AlphaSearch(best_a, None if best_a is None else factors(channel_absmax, best_a),
                       base, best, parts, len(held) if fit is not None and held is not fit else 0)


#: the recipe's activations.fallback / token_fallback, as a skip reason says them
FALLBACK_WORDS = {"dynamic-block": "per-block dynamic int8", "float": "float (unquantized)",
                  "none": "float activations (weight-only)"}


def fallback_words(fallback: str, token_fallback: str = "dynamic-block") -> str:
    """What layers below the static threshold run as, in words."""
    if fallback == "dynamic-token":
        return (f"per-token dynamic int8, or {FALLBACK_WORDS[token_fallback]} where that "
                "measures too low")
    return FALLBACK_WORDS.get(fallback, fallback)


class SmoothQuant(Pass):
    """SmoothQuant with a per-group alpha search on measured quantized-group error."""

    name = "smooth-quant"

    def __init__(self, alpha: float | None = None, step: float = 0.05, rows: int = 512,
                 min_sqnr_db: float | None = None, linear_groups: bool = False,
                 untie: bool = False, fallback: str = "dynamic-block",
                 token_fallback: str = "dynamic-block"):
        super().__init__()
        self.linear_groups = linear_groups
        #: smooth a tied lm_head on its own copy of the table (see the module docstring)
        self.untie = untie
        self.alpha = alpha
        self.step = step
        self.rows = rows
        #: the recipe's fallback threshold (None: smooth whatever the smoothed error)
        self.min_sqnr_db = min_sqnr_db
        #: what a layer below the threshold runs as (the recipe's activations.fallback), named
        #: in the skip reason
        self.fallback = fallback
        self.token_fallback = token_fallback

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        stats = self.context.analyses.get(ACTIVATION_STATS, model, self.context)
        groups, skipped = find_smooth_groups(model, self.untie)
        if not self.linear_groups:
            skipped += [(layer_name(g.prev), "linear -> product -> linear groups are not smoothed "
                         "for W8A8 (measured to hurt, see the module docstring)")
                        for g in groups if g.kind == "linear"]
            groups = [g for g in groups if g.kind != "linear"]
        alphas = [self.alpha] if self.alpha is not None else \
            list(np.round(np.arange(0.0, 1.0 + 1e-9, self.step), 4))
        rows_out, smoothed, untied_params = [], 0, 0
        for g in groups:
            obs = stats.get(g.output.name)
            x = obs.rows if obs is not None else None
            if obs is None or x is None or obs.channel_absmax is None:
                skipped.append((layer_name(g.prev), "no calibration rows for the group input"))
                continue
            weights = [consumer_weight(u).astype(np.float32) for u in g.consumers]
            found = search_alpha(x[: self.rows].astype(np.float32), weights,
                                 obs.channel_absmax, alphas, g.to_fold, g.expand,
                                 tokens=obs.channel_count)
            a, s = found.alpha, found.s
            row = {"from": layer_name(g.prev), "kind": g.kind, "consumers": [layer_name(u) for u in g.consumers],
                   "error_before": round(found.error_before, 6),
                   "error_after": round(found.error_after, 6), "alpha": a,
                   "held_out_rows": found.held_out_rows}
            if s is not None and self.min_sqnr_db is not None:
                best_db = -10.0 * np.log10(max(min(found.consumer_errors), 1e-30))
                if best_db < self.min_sqnr_db:
                    s = None
                    row["reason"] = (f"every consumer stays below {self.min_sqnr_db} dB even "
                                     f"smoothed (best {best_db:.1f} dB): they fall back to "
                                     f"{fallback_words(self.fallback, self.token_fallback)}; "
                                     "the group is left unsmoothed (the scales were searched "
                                     "for per-tensor inputs)")
            if s is not None:
                copied = apply_scales(g, s, model.graph)
                if copied:
                    untied_params += copied
                    row["untied"] = f"tied lm_head smoothed on its own copy ({copied:,} weights)"
                smoothed += 1
                row["s_max"] = float(s.max())
                row["s_min"] = float(s.min())
            elif "reason" not in row:
                row["reason"] = "no alpha beats leaving the group unsmoothed"
            rows_out.append(row)
        self.note("groups", rows_out)
        self.note("smoothed", smoothed)
        if untied_params:
            self.note("untied_weights", untied_params)
        self.note("skipped", [{"from": n, "reason": r} for n, r in skipped])
        return ir.passes.PassResult(model, modified=smoothed > 0)
