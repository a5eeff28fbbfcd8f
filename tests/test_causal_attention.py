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
                  "mistral": transformers.MistralConfig}[family]
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


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_causal_gqa_fusion_is_exact_at_any_batch_and_length(family):
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
