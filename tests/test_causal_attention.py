"""``fuse-attention``: cache-free causal attention -> GroupQueryAttention, exact or left alone."""

from __future__ import annotations

import numpy as np
import pytest

VOCAB = 128


def _hf_capture(family: str, hidden: int = 96, **extra):
    pytest.importorskip("transformers")
    import torch
    import transformers

    from lbcc.capture import capture

    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "mistral": transformers.MistralConfig, "gemma2": transformers.Gemma2Config,
                  "phi3": transformers.Phi3Config, "qwen3": transformers.Qwen3Config,
                  "gemma3": transformers.Gemma3TextConfig}[family]
    if family == "phi3":
        extra.setdefault("pad_token_id", 0)
    config = config_cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=80,
                        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                        max_position_embeddings=128, **extra)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    return capture(hf)


def _logits(model, ids: np.ndarray) -> np.ndarray:
    import onnx_ir as ir
    import onnxruntime as ort

    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids})[0]


def _copy(model):
    import onnx_ir as ir

    return ir.from_proto(ir.to_proto(model))


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_causal_gqa_fusion_is_exact_at_any_batch_and_length(family):
    """Phi-3 also reshapes the attention to its own shape before the transpose back
    (:func:`bypass_identity_reshapes`)."""
    from lbcc.irutils import layer_name, op_histogram
    from lbcc.passes.causal_attention import fuse_causal_attention

    model = _hf_capture(family)
    fused_model = _copy(model)
    fused, left, why = fuse_causal_attention(fused_model)
    assert (fused, left, why) == (2, 0, [])
    ops = op_histogram(fused_model)
    assert ops["com.microsoft::GroupQueryAttention"] == 2
    assert "Softmax" not in ops and "IsNaN" not in ops  # the whole block went into the kernel
    gqa = [n for n in fused_model.graph if n.op_type == "GroupQueryAttention"]
    assert [layer_name(n) for n in gqa] == ["model.layers.0.self_attn",
                                           "model.layers.1.self_attn"]
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (2, 9), (3, 40)]:
        ids = rng.integers(0, VOCAB, shape).astype(np.int64)
        ref, got = _logits(model, ids), _logits(fused_model, ids)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), shape


def test_sliding_window_mask_fuses_with_the_kernels_window():
    """Mistral's sliding window (4 here): the evaluated mask is a band of 4 keys, so the block
    becomes GroupQueryAttention with ``local_window_size`` 4, and the logits stay those of the
    exported graph at lengths inside and beyond the window."""
    from lbcc.passes.causal_attention import fuse_causal_attention

    model = _hf_capture("mistral", sliding_window=4)
    fused_model = _copy(model)
    fused, left, why = fuse_causal_attention(fused_model)
    assert (fused, left, why) == (2, 0, [])
    gqa = [n for n in fused_model.graph if n.op_type == "GroupQueryAttention"]
    assert [n.attributes.get_int("local_window_size", -1) for n in gqa] == [4, 4]
    rng = np.random.default_rng(1)
    for shape in [(1, 3), (2, 12)]:
        ids = rng.integers(0, VOCAB, shape).astype(np.int64)
        ref, got = _logits(model, ids), _logits(fused_model, ids)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), shape


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_query_and_key_norms_fuse_exactly(family):
    """Per-head RMS norms on q and k, before the transpose (Qwen3) or after it (Gemma 3, here
    with a sliding layer of 4 and a full one): GroupQueryAttention reads the normed q and k
    (the norm applied on ``[batch, seq, heads, head_dim]``, reshaped to ``[batch, seq, hidden]``)
    and the logits stay those of the exported graph."""
    from onnxscript.rewriter.ort_fusions import rms_normalization

    from lbcc.passes.causal_attention import fuse_causal_attention

    extra = {"head_dim": 16} | ({"sliding_window": 4, "layer_types": [
        "sliding_attention", "full_attention"]} if family == "gemma3" else {})
    model = _hf_capture(family, **extra)
    rms_normalization.fuse_rms_normalization(model)  # what fuse-ort does before this pass
    fused_model = _copy(model)
    assert fuse_causal_attention(fused_model) == (2, 0, [])
    gqa = [n for n in fused_model.graph if n.op_type == "GroupQueryAttention"]
    assert all(n.inputs[0].producer().op_type == "Reshape" for n in gqa)
    if family == "gemma3":
        assert [n.attributes.get_int("local_window_size", -1) for n in gqa] == [4, -1]
    rng = np.random.default_rng(3)
    for shape in [(1, 1), (2, 9), (3, 40)]:
        ids = rng.integers(0, VOCAB, shape).astype(np.int64)
        ref, got = _logits(model, ids), _logits(fused_model, ids)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), shape


def _gemma2(head_dim: int = 16, cap: float = 2.0):
    """A random Gemma 2 whose attention scores are capped at ``cap`` (``c · tanh(z / c)``;
    2 here, so that the cap changes the logits), a sliding layer (window 4) and a full one."""
    return _hf_capture("gemma2", head_dim=head_dim, sliding_window=4, initializer_range=0.2,
                       attn_logit_softcapping=cap, final_logit_softcapping=30.0)


def test_soft_capped_attention_fuses_with_the_kernels_cap():
    """Gemma 2's capped scores (``Mul(Tanh(Div(z, c)), c)`` before the mask): both blocks become
    GroupQueryAttention with ``softcap`` = c, the model's scale (``query_pre_attn_scalar ** -0.5``)
    and the sliding layer's window, and the logits stay those of the exported graph; without the
    cap they would not (checked, so the comparison can fail)."""
    from lbcc.passes.causal_attention import fuse_causal_attention

    model = _gemma2()
    fused_model = _copy(model)
    assert fuse_causal_attention(fused_model) == (2, 0, [])
    gqa = [n for n in fused_model.graph if n.op_type == "GroupQueryAttention"]
    assert [n.attributes["softcap"].value for n in gqa] == [2.0, 2.0]
    assert [n.attributes.get_int("local_window_size", -1) for n in gqa] == [4, -1]
    assert all(n.attributes["scale"].value == pytest.approx(1 / 16) for n in gqa)
    rng = np.random.default_rng(2)
    for shape in [(1, 3), (2, 12)]:
        ids = rng.integers(0, VOCAB, shape).astype(np.int64)
        ref, got = _logits(model, ids), _logits(fused_model, ids)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), shape
    for n in gqa:
        del n.attributes["softcap"]
    assert np.abs(_logits(fused_model, ids) - ref).max() > 1e-2 * np.abs(ref).max()


def test_soft_capped_attention_left_unfused_keeps_its_cap():
    """A capped block the kernel cannot take (head size 8) goes back to exported ops with its
    cap: same logits as the exported graph."""
    from lbcc.passes.causal_attention import fuse_causal_attention

    model = _gemma2(head_dim=8)
    left_model = _copy(model)
    fused, left, why = fuse_causal_attention(left_model)
    assert (fused, left) == (0, 2) and any("multiple of 16" in w for w in why), why
    assert sum(n.op_type == "Tanh" for n in left_model.graph) == 3  # two blocks, the final cap
    ids = np.random.default_rng(3).integers(0, VOCAB, (2, 7)).astype(np.int64)
    ref, got = _logits(model, ids), _logits(left_model, ids)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_band_window_reads_causal_windowed_and_other_masks():
    """``band_window`` on masks built here: causal (0), a window of 3 keys (3, also after a
    past), future keys shown or a hole in the band (None, with the reason)."""
    from lbcc.passes.causal_attention import band_window

    def mask(past, seq, ok):
        back = past + np.arange(seq)[:, None] - np.arange(past + seq)[None, :]
        return np.where(ok(back), 0.0, -3.4e38).astype(np.float32)[None, None]

    causal = lambda b: b >= 0  # noqa: E731
    window3 = lambda b: (b >= 0) & (b < 3)  # noqa: E731
    checks = [(0, 9), (5, 2)]
    assert band_window([(p, s, mask(p, s, causal)) for p, s in checks]) == (0, "")
    assert band_window([(p, s, mask(p, s, window3)) for p, s in checks]) == (3, "")
    w, why = band_window([(p, s, mask(p, s, lambda b: b >= -1)) for p, s in checks])
    assert w is None and "future" in why
    w, why = band_window([(p, s, mask(p, s, lambda b: (b >= 0) & (b != 2))) for p, s in checks])
    assert w is None and "neither causal nor a sliding window" in why


def test_a_head_size_the_kernel_cannot_take_is_left_alone():
    from lbcc.passes.causal_attention import fuse_causal_attention

    model = _hf_capture("llama", hidden=48)  # 6 heads of 8
    fused, left, why = fuse_causal_attention(model)
    assert (fused, left) == (0, 2) and any("multiple of 16" in w for w in why), why


def test_mask_and_angles_must_come_from_shapes_only():
    """A tensor computed from the input ids' values (not only their shape) is never evaluated
    on dummy inputs: the check says so instead of trusting it."""
    import onnx_ir as ir

    from lbcc.passes.causal_attention import causal_rotary_reason

    ids = ir.Value(name="input_ids", shape=ir.Shape(["batch", "seq"]),
                   type=ir.TensorType(ir.DataType.INT64))
    cast = ir.node("Cast", [ids], attributes={"to": ir.DataType.FLOAT})
    graph = ir.Graph([ids], cast.outputs, nodes=[cast], opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    reason, _ = causal_rotary_reason(model, cast.outputs[0], cast.outputs[0], cast.outputs[0],
                                     8, ("batch", "seq"))
    assert "read as data" in reason


def test_ort_int8_compile_fuses_attention_and_reports_it():
    import lbcc
    from lbcc.calibration import RandomFeed

    model = _hf_capture("llama")
    r = lbcc.compile(_copy(model), preset="w8a8", progress=False,
                     calibration=RandomFeed(vocab_size=VOCAB, seq_len=16, n=2))
    notes = next(p["notes"] for p in r.report.data["passes"] if p["name"] == "fuse-attention")
    assert notes["fused"] == 2 and notes["left_unfused"] == 0
    ids = np.random.default_rng(2).integers(0, VOCAB, (1, 20)).astype(np.int64)
    ref, got = _logits(model, ids), _logits(r.model, ids)
    assert float((ref.argmax(-1) == got.argmax(-1)).mean()) >= 0.8


def test_a_capped_block_left_as_sdpa_is_expanded_with_its_cap():
    """The KV-cache attention guard: a capped fusion ``SDPA`` that did not become
    GroupQueryAttention (``MultiHeadAttention`` would drop the cap) is expanded back to standard
    ops, ``softmax(c · tanh(q kᵀ s / c) + mask) v``, and the guard says why."""
    import onnx_ir as ir
    import onnxruntime as ort

    from lbcc.passes.kv_fusions import AttentionGuard

    def value(name, shape):
        return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))

    q, k, v, mask = (value(n, s) for n, s in (("q", [1, 2, 5, 8]), ("k", [1, 2, 5, 8]),
                                             ("v", [1, 2, 5, 8]), ("mask", [1, 1, 5, 5])))
    sdpa = ir.node("SDPA", [q, k, v, mask], domain="ai.onnxruntime._fusion",
                   attributes={"scale": 0.5, "softcap": 3.0, "key_format": "BHSd"})
    sdpa.outputs[0].name = "out"
    graph = ir.Graph([q, k, v, mask], sdpa.outputs, nodes=[sdpa], opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    guard = AttentionGuard()
    assert guard.release(model) == 1
    assert [n.op_type for n in model.graph].count("Tanh") == 1
    assert any("soft-capped" in why for why in guard.reasons.values())
    rng = np.random.default_rng(4)
    feeds = {n: rng.standard_normal(s).astype(np.float32) * 3
             for n, s in (("q", (1, 2, 5, 8)), ("k", (1, 2, 5, 8)), ("v", (1, 2, 5, 8)))}
    feeds["mask"] = np.triu(np.full((5, 5), -1e9, np.float32), 1)[None, None]
    got = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    z = feeds["q"] @ feeds["k"].transpose(0, 1, 3, 2) * 0.5
    z = 3.0 * np.tanh(z / 3.0) + feeds["mask"]
    p = np.exp(z - z.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ feeds["v"]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
