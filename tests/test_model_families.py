"""Every preset, unchanged, on tiny random Llama (GQA) / Qwen2 / Gemma models built from their
transformers configs: nothing in lbcc is tuned to the sample's layer names or shapes.

Hidden sizes are deliberately not multiples of 128 (GPTQ / AWQ must handle any K), the models
have grouped-query attention, Qwen2 has q/k/v biases, Gemma scales embeddings, uses (1 + w)
RMSNorm and a GELU-gated MLP.
"""

from __future__ import annotations

import numpy as np
import pytest

import lbcc
from lbcc.calibration import RandomFeed

pytestmark = pytest.mark.slow

VOCAB = 512
# (auto-vnni is auto with int8 weight storage, tested against it in test_precision.py: ONNX
# Runtime runs it exactly only on CPUs with VNNI, and CI's may have none)
PRESETS = ["w8a8", "w8a8-dynamic", "w8a8-sq", "auto", "auto-avx2", "w4a16", "w4a16-gptq",
           "w4a16-awq", "w4a16-mixed"]


def _config(family: str):
    from transformers import GemmaConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    return GemmaConfig(**common, head_dim=16)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma"])
def family_model(request):
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM

    from lbcc.capture import capture

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_config(request.param)).eval()
    with torch.no_grad():  # trained models have outlier channels; random init has none
        for layer in hf.model.layers:
            layer.post_attention_layernorm.weight[3] += 4.0
            layer.input_layernorm.weight[7] += 4.0
    return request.param, capture(hf)


def _logits(model, ids):
    import onnxruntime as ort
    import onnx_ir as ir

    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids})[0]


@pytest.mark.parametrize("preset_name", PRESETS)
def test_preset_runs_and_stays_close(family_model, preset_name):
    import onnx_ir as ir

    family, model = family_model
    feed = RandomFeed(vocab_size=VOCAB, seq_len=32, n=4)
    group = 32 if preset_name.startswith("w4a16") else None
    r = lbcc.compile(ir.from_proto(ir.to_proto(model)), preset=preset_name, calibration=feed,
                     group_size=group, progress=False)
    summary = r.report.data["summary"]
    assert summary["quantized"] >= 2 * 7  # q k v o gate up down in both layers
    ids = np.random.default_rng(7).integers(0, VOCAB, (1, 24)).astype(np.int64)
    ref, got = _logits(model, ids), _logits(r.model, ids)
    assert got.shape == ref.shape and np.isfinite(got).all()
    # the top-1 token agrees for most positions (random weights give flat, fragile logits)
    agree = float((ref.argmax(-1) == got.argmax(-1)).mean())
    assert agree >= 0.7, f"{family}/{preset_name}: top-1 agreement {agree:.2f}"
