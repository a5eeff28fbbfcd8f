"""Soft-capped attention (Gemma 2) -> the fusion ``SDPA`` op, with its cap as ``softcap``.

Gemma 2 bounds every attention score before the softmax:

    scores = c · tanh((q kᵀ · scale) / c),   p = softmax(scores + mask),   out = p v

(``attn_logit_softcapping`` = c, 50 in the released models). The exported graph computes it as
``Mul(Tanh(Div(MatMul(q, kᵀ) · scale, c)), c)`` between the product and the mask, which
onnxscript's SDPA rule does not match (its softmax input must be the scaled product, plus a
mask), so the attention stayed some 15 exported ops a layer. ONNX Runtime's
``GroupQueryAttention`` has the same cap (attribute ``softcap``, applied after ``scale`` and
before the mask: checked against this formula with a window and a non-default scale), so the
rule here rewrites the block into onnxscript's fusion ``SDPA`` with one more attribute,
``softcap`` = c. The later fusions carry it onto ``GroupQueryAttention``
(:mod:`lbcc.passes.causal_attention` for cache-free graphs, the attention guard of
:mod:`lbcc.passes.kv_fusions` for KV-cache graphs); a capped block that does not become
``GroupQueryAttention`` (``MultiHeadAttention`` has no cap) is expanded back to exported ops
(:func:`lbcc.passes.causal_attention.expand_sdpa`).
"""

from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript.rewriter import _fusion_utils, _ir_utils, pattern

from lbcc.passes.causal_attention import FUSION_DOMAIN


class SoftcappedSDPA(pattern.RewriteRuleClassBase):
    """``softmax(c·tanh(q kᵀ·s / c) + mask) v`` -> ``SDPA(q, k, v, mask, scale=s, softcap=c)``."""

    def pattern(self, op, query, key, value, mask, qk_scale, cap_in, cap_out):
        key_t = pattern.OrValue([op.Transpose(key, perm=[0, 1, 3, 2]),
                                 op.Transpose(key, perm=[0, 2, 3, 1])],
                                tag_var="key_format", tag_values=["BHSd", "BSHd"])
        scores = op.MatMul(query, key_t)
        scores = pattern.OrValue([op.Mul(scores, qk_scale), op.Div(scores, qk_scale), scores],
                                 tag_var="qk_scaling", tag_values=["Mul", "Div", "None"])
        inside = pattern.OrValue([op.Div(scores, cap_in), op.Mul(scores, cap_in)],
                                 tag_var="cap_in_op", tag_values=["Div", "Mul"])
        capped = op.Mul(op.Tanh(inside), cap_out)
        capped = pattern.OrValue([op.Add(capped, mask), capped], tag_var="has_mask",
                                 tag_values=[True, False])
        weights = op.Softmax(capped, axis=-1)
        weights = pattern.OrValue([op.Where(op.IsNaN(weights), 0.0, weights), weights])
        return op.MatMul(weights, value)

    def check(self, context, query, key, value, key_format, qk_scaling, qk_scale, cap_in_op,
              cap_in, cap_out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        dims: dict = {}
        _fusion_utils.check_shape(dims, query, ["B", "H", "S", "Dh"])
        _fusion_utils.check_shape(dims, key, ["B", "H", "Skv", "Dh"] if key_format == "BHSd"
                                  else ["B", "Skv", "H", "Dh"])
        # the exporter may name the value's length "seq + past_seq" and the key's "past_seq +
        # seq": not compared (p @ v multiplies them in the graph as it is)
        _fusion_utils.check_shape(dims, value, ["B", "H", "Sv", "Dv"])
        outer = _ir_utils.get_singleton_value(cap_out)
        inner = _ir_utils.get_singleton_value(cap_in)
        if outer is None or inner is None or outer <= 0:
            return result.fail("the cap is not a positive scalar constant", [cap_in, cap_out])
        inner = 1.0 / inner if cap_in_op == "Mul" else inner
        if not math.isclose(inner, outer, rel_tol=1e-6):
            return result.fail(f"tanh(x / {inner}) is scaled by {outer}, not by the same cap",
                               [cap_in, cap_out])
        self._softcap = float(outer)
        self._scale = None
        if qk_scaling != "None":
            s = _ir_utils.get_singleton_value(qk_scale)
            if s is None:
                return result.fail("the score scale is not a scalar constant", qk_scale)
            s = float(s) if qk_scaling == "Mul" else 1.0 / float(s)
            head = dims.get("Dh")
            if not (isinstance(head, int) and math.isclose(s, head ** -0.5, rel_tol=1e-5)):
                self._scale = s
        elif dims.get("Dh") != 1:  # unscaled scores: not the default 1/sqrt(head_dim)
            self._scale = 1.0
        return result

    def rewrite(self, op, query, key, value, mask, key_format, **_):
        attrs = {"key_format": key_format, "softcap": self._softcap}
        if self._scale is not None:
            attrs["scale"] = self._scale
        inputs = [query, key, value] + ([mask] if mask is not None else [])
        return op.SDPA(*inputs, _domain=FUSION_DOMAIN, **attrs)


def fuse_softcapped_sdpa(model: ir.Model, debug: bool = False) -> int:
    """Rewrite every soft-capped attention block of ``model`` (:class:`SoftcappedSDPA`); how many.
    ``debug`` prints onnxscript's matching tracer report."""
    rules = pattern.RewriteRuleSet([SoftcappedSDPA.rule()])
    tracer = pattern.MatchingTracer() if debug else None
    count = rules.apply_to_model(model, tracer=tracer, verbose=0)
    if tracer is not None:
        tracer.report()
    return count


def softcap_of(node: ir.Node) -> float | None:
    """The cap of a fusion ``SDPA`` node made by :class:`SoftcappedSDPA`; None for plain ones."""
    return node.attributes.get_float("softcap", None)
