"""KV-cache capture and generation: greedy decode identical to transformers, seeded top-p, the
quantized cache graph consistent with the quantized cache-free graph, and the error cases.

The exports (a few seconds to a minute each) are shared by a module fixture; the tests that need
them are ``slow``. The unit tests at the top need no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import models as M
from conftest import make_tokenizer
from lbcc.cli import app
from lbcc.errors import BadInputError
from lbcc.generate import Generator, sample_top_p
from lbcc.kvcache import kv_layout, past_name

VOCAB = 512
runner = CliRunner()


# ----------------------------------------------------------------------------- unit tests

def test_top_p_keeps_the_nucleus_only():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = [sample_top_p(logits, 0.75, 1.0, rng) for _ in range(2000)]
    # the nucleus of mass >= 0.75 is {0, 1}; renormalized 0.625 / 0.375
    assert set(draws) == {0, 1}
    assert abs(np.mean(np.array(draws) == 0) - 0.625) < 0.04
    # a tiny mass keeps only the argmax; the same seed gives the same draws
    assert {sample_top_p(logits, 1e-9, 1.0, rng) for _ in range(50)} == {0}
    a = [sample_top_p(logits, 0.9, 1.0, np.random.default_rng(3)) for _ in range(20)]
    b = [sample_top_p(logits, 0.9, 1.0, np.random.default_rng(3)) for _ in range(20)]
    assert a == b


def test_kv_layout_of_a_cache_free_model_is_none(mlp_path):
    from lbcc.capture import capture

    assert kv_layout(capture(mlp_path)) is None


def test_generator_rejects_a_model_without_kv_cache(mlp_path):
    with pytest.raises(BadInputError, match="no KV cache"):
        Generator(mlp_path)


def test_capture_kv_cache_of_a_cache_free_onnx_is_a_clear_error(mlp_path):
    from lbcc.capture import capture

    with pytest.raises(BadInputError, match="has no KV cache"):
        capture(mlp_path, kv_cache=True)


def test_cli_generate_errors(mlp_path, tmp_path):
    tok = make_tokenizer(tmp_path / "tok" / "tokenizer.json")
    r = runner.invoke(app, ["generate", str(mlp_path), "--tokenizer", str(tok), "-p", "w1 w2"])
    assert r.exit_code == 1 and "no KV cache" in r.stderr and "Traceback" not in r.stderr
    r = runner.invoke(app, ["generate", str(mlp_path), "-p", "w1"])
    assert r.exit_code == 1 and "--tokenizer" in r.stderr
    r = runner.invoke(app, ["generate", str(mlp_path), "--tokenizer", str(tok), "-p", "  "])
    assert r.exit_code == 1 and "empty" in r.stderr


def _lm_head_graph():
    """h[1, S, 8] -> logits = h @ W[8, 5], a graph output (the KV-cache graph's lm_head)."""
    import onnx_ir as ir

    from lbcc.irutils import add_initializer

    h = ir.Value(name="h", shape=ir.Shape([1, "s", 8]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([h], [], nodes=[], opset_imports={"": 21}, name="g")
    w = add_initializer(graph, "W", np.random.default_rng(0).standard_normal((8, 5))
                        .astype(np.float32))
    mm = ir.node("MatMul", [h, w], name="lm_head")
    graph.append(mm)
    mm.outputs[0].name, mm.outputs[0].type = "logits", ir.TensorType(ir.DataType.FLOAT)
    mm.outputs[0].shape = ir.Shape([1, "s", 5])
    graph.outputs.append(mm.outputs[0])
    return ir.Model(graph, ir_version=10)


def test_last_logits_keeps_all_positions_unless_asked():
    """``logits_to_keep``: an overridable initializer of 0 (all positions, the graph as before for
    anyone who does not feed it); fed k, the lm_head runs on the last k positions only."""
    import onnx_ir as ir
    import onnxruntime as ort

    from lbcc.kvcache import keeps_last_logits
    from lbcc.passes.kv_fusions import last_logits

    model = _lm_head_graph()
    assert last_logits(model) == 1 and last_logits(model) == 0  # once
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["h"] and keeps_last_logits(sess)
    h = np.random.default_rng(1).standard_normal((1, 6, 8)).astype(np.float32)
    full = sess.run(None, {"h": h})[0]
    np.testing.assert_allclose(full, h @ model.graph.initializers["W"].const_value.numpy(),
                               rtol=1e-5, atol=1e-5)
    for k in (1, 2, 6, 9):
        got = sess.run(None, {"h": h, "logits_to_keep": np.array(k, np.int64)})[0]
        np.testing.assert_array_equal(got, full[:, -min(k, 6):])


# ----------------------------------------------------------------------------- tiny Llama

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama-GQA (weights scaled up so greedy tokens vary) and its KV-cache export."""
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lbcc.capture import capture
    from lbcc.modelio import save_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=160,
                      num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True,
                      initializer_range=0.2, eos_token_id=None, bos_token_id=None)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    d = tmp_path_factory.mktemp("gen")
    kv = capture(hf, kv_cache=True)
    save_model(kv, d / "kv.onnx")
    make_tokenizer(d / "tokenizer.json")
    return hf, kv, d


@pytest.fixture(scope="module")
def tiny_nocache(tiny):
    """The same model's cache-free export (``input_ids -> logits``), serialized: each compile
    gets its own parsed copy (compiling two ``ir.from_proto`` views of one ModelProto in turn
    breaks the second, a problem outside the KV-cache code)."""
    import onnx_ir as ir

    from lbcc.capture import capture

    return ir.to_proto(capture(tiny[0])).SerializeToString()


def _hf_greedy(hf, prompt: np.ndarray, n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor(prompt)[None], max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.slow
def test_kv_graph_interface(tiny):
    _, kv, _ = tiny
    names = [v.name for v in kv.graph.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert past_name(1, "value") in names
    assert [v.name for v in kv.graph.outputs][:3] == ["logits", "present.0.key", "present.0.value"]
    layout = kv_layout(kv)
    assert (layout.num_layers, layout.kv_heads, layout.head_dim) == (2, 2, 16)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_fp32_greedy_matches_transformers(tiny, seed):
    hf, _, d = tiny
    prompt = np.random.default_rng(seed).integers(0, VOCAB, 9 + seed)
    ref = _hf_greedy(hf, prompt, 40)
    assert len(set(ref)) > 10, "degenerate reference: the test would prove little"
    gen = Generator(d / "kv.onnx", max_context=128)
    assert not gen.share_buffer  # unfused: present = concat(past, new)
    got = list(gen.generate_ids(prompt, 40, stop_at_eos=False))
    assert got == ref
    assert gen.stats.new_tokens == 40 and gen.stats.decode_tokens_per_s > 0
    with pytest.raises(BadInputError, match="share past and present"):
        Generator(d / "kv.onnx", max_context=128, share_buffer=True)


def _rotary_cache_length(model) -> int | None:
    """The rotary caches' row count where it is a constant (the fused graph's one Range)."""
    import onnx_ir as ir

    (rng,) = [n for n in model.graph if n.op_type == "Range"]
    limit = ir.convenience.get_const_tensor(rng.inputs[1])
    return None if limit is None else int(limit.numpy())


def _ort_optimized_ops(path, tmp_path) -> set[str]:
    """Op types of the graph ONNX Runtime runs after its load-time optimizations."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / f"{path.stem}.ort-optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}


@pytest.mark.slow
def test_fused_fp32_graph_has_gqa_and_matches_transformers(tiny, tmp_path):
    """capture-normalize + fuse-ort on the cache graph: GroupQueryAttention (rotary inside, Q/K/V
    packed into one MatMul), SkipSimplifiedLayerNormalization; greedy tokens unchanged."""
    import onnx_ir as ir

    from lbcc.modelio import save_model
    from lbcc.passes import CaptureNormalize, FuseORT
    from lbcc.pipeline import Pipeline, PipelineContext

    hf, kv, _ = tiny
    run = Pipeline([CaptureNormalize(), FuseORT()], PipelineContext()).run(
        ir.from_proto(ir.to_proto(kv)))
    notes = run.records[-1].notes
    assert notes["matched"]["gqa"] == 2 and notes["matched"]["rotary_from_position_ids"] == 4
    assert notes["matched"]["pack_qkv"] == 2
    # the second layer reads the first layer's seqlens_k / total_sequence_length
    assert notes["matched"]["share_attention_lengths"] == 1
    assert notes["matched"]["last_logits"] == 1  # the prefill of a generator: last row only
    # the norms' unused mean / inv_std_var outputs are omitted (empty names), as genai's are
    assert notes["matched"]["drop_unused_norm_stats"] == 4  # the skip norms
    skip = next(n for n in run.model.graph if n.op_type == "SkipSimplifiedLayerNormalization")
    assert [o.name for o in skip.outputs][1:3] == ["", ""]
    gqas = [n for n in run.model.graph if n.op_type == "GroupQueryAttention"]
    assert all(n.inputs[1] is None and n.inputs[0].producer().op_type == "MatMul" for n in gqas)
    assert gqas[1].inputs[5] is gqas[0].inputs[5] and gqas[1].inputs[6] is gqas[0].inputs[6]
    assert sum(n.op_type == "ReduceMax" for n in run.model.graph) == 2  # once, not per layer
    assert gqas[0].inputs[0].producer().metadata_props["lbcc.layer"] == \
        "model.layers.0.self_attn.qkv_proj"
    assert notes["fused_ops_in_graph"]["com.microsoft::GroupQueryAttention"] == 2
    assert notes["fused_ops_in_graph"]["com.microsoft::SkipSimplifiedLayerNormalization"] == 4
    assert "cos_sin_cache" in notes["why_not"]  # the older rotary form: the tracer says why
    # the capture recorded the context length (128): the rotary caches span it, from constants
    assert _rotary_cache_length(run.model) == 128
    save_model(run.model, tmp_path / "fused.onnx")
    # ... so ONNX Runtime folds them when it loads the model: no rotary arithmetic in a step
    assert not {"Cos", "Sin", "Range"} & _ort_optimized_ops(tmp_path / "fused.onnx", tmp_path)
    prompt = np.random.default_rng(5).integers(0, VOCAB, 11)
    ref = _hf_greedy(hf, prompt, 40)
    gen = Generator(tmp_path / "fused.onnx", max_context=128)
    assert gen.share_buffer  # GroupQueryAttention writes into one past/present buffer in place
    assert gen._keep_last is not None  # and the prefill feeds logits_to_keep = 1
    assert list(gen.generate_ids(prompt, 40, stop_at_eos=False)) == ref
    assert list(gen.generate_ids(prompt[:7], 40, stop_at_eos=False)) == _hf_greedy(hf, prompt[:7],
                                                                                    40)
    concat = Generator(tmp_path / "fused.onnx", max_context=128, share_buffer=False)
    assert list(concat.generate_ids(prompt, 40, stop_at_eos=False)) == ref
    gen.initial_room = 3  # the shared cache fills up and is reallocated (doubled) while decoding
    assert list(gen.generate_ids(prompt, 40, stop_at_eos=False)) == ref
    # the recorded context (128) bounds the generator: the rotary caches hold no more
    assert Generator(tmp_path / "fused.onnx").max_context == 128
    with pytest.raises(BadInputError, match="beyond the 128 positions"):
        Generator(tmp_path / "fused.onnx", max_context=129)


@pytest.mark.slow
def test_rotary_caches_are_computed_when_the_context_is_unknown(tiny, tmp_path):
    """A KV-cache graph without a recorded context length (an ONNX file from elsewhere): the
    fused rotary computes its cos/sin rows from the positions each step; same greedy tokens."""
    import onnx_ir as ir

    from lbcc.kvcache import MAX_POSITIONS_KEY
    from lbcc.modelio import save_model
    from lbcc.passes import CaptureNormalize, FuseORT
    from lbcc.pipeline import Pipeline, PipelineContext

    hf, kv, _ = tiny
    model = ir.from_proto(ir.to_proto(kv))
    del model.metadata_props[MAX_POSITIONS_KEY]
    run = Pipeline([CaptureNormalize(), FuseORT()], PipelineContext()).run(model)
    assert run.records[-1].notes["matched"]["gqa"] == 2
    assert _rotary_cache_length(run.model) is None  # max(position_ids) + 1, each step
    save_model(run.model, tmp_path / "computed.onnx")
    assert {"Cos", "Sin", "Range"} <= _ort_optimized_ops(tmp_path / "computed.onnx", tmp_path)
    prompt = np.random.default_rng(6).integers(0, VOCAB, 9)
    gen = Generator(tmp_path / "computed.onnx", max_context=128)
    assert list(gen.generate_ids(prompt, 30, stop_at_eos=False)) == _hf_greedy(hf, prompt, 30)


@pytest.mark.slow
def test_top_p_is_seeded_and_tiny_p_is_greedy(tiny):
    _, _, d = tiny
    gen = Generator(d / "kv.onnx", max_context=128)
    prompt = [5, 6, 7, 8]
    greedy = list(gen.generate_ids(prompt, 12, stop_at_eos=False))
    a = list(gen.generate_ids(prompt, 12, greedy=False, top_p=0.95, seed=4, stop_at_eos=False))
    b = list(gen.generate_ids(prompt, 12, greedy=False, top_p=0.95, seed=4, stop_at_eos=False))
    c = list(gen.generate_ids(prompt, 12, greedy=False, top_p=0.95, seed=5, stop_at_eos=False))
    nucleus = list(gen.generate_ids(prompt, 12, greedy=False, top_p=1e-9, seed=4,
                                    stop_at_eos=False))
    assert a == b and a != c and nucleus == greedy


@pytest.mark.slow
def test_prompt_errors_and_context_limit(tiny):
    _, _, d = tiny
    gen = Generator(d / "kv.onnx", max_context=16)
    with pytest.raises(BadInputError, match="context"):
        list(gen.generate_ids(np.arange(16), 4))
    # the context bounds prompt + new tokens
    assert len(list(gen.generate_ids(np.arange(12), 10, stop_at_eos=False))) == 4
    with pytest.raises(BadInputError, match="tokenizer"):
        list(gen.generate("w1 w2", 4))
    gen = Generator(d / "kv.onnx", d / "tokenizer.json", max_context=128)
    with pytest.raises(BadInputError, match="empty"):
        list(gen.generate("", 4))


@pytest.mark.slow
def test_cli_generate_streams_and_reports_speed(tiny):
    _, _, d = tiny
    r = runner.invoke(app, ["generate", str(d / "kv.onnx"), "--tokenizer",
                            str(d / "tokenizer.json"), "-p", "w1 w2 w3", "-n", "8",
                            "--max-context", "128"])
    assert r.exit_code == 0, r.stderr
    assert "tokens/s" in r.stderr and "8 new tokens" in r.stderr
    assert r.stdout.strip()  # decoded text (the WordLevel tokenizer maps ids > 190 to nothing)
    r = runner.invoke(app, ["generate", str(d / "kv.onnx"), "--tokenizer",
                            str(d / "tokenizer.json"), "-p", " ".join(["w1"] * 20),
                            "--max-context", "16"])
    assert r.exit_code == 1 and "context" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["w8a8", "w4a16", "w8a8-v-per-block"])
def test_quantized_cache_graph_matches_cache_free_graph(tiny, tiny_nocache, tmp_path, preset):
    """Step-by-step decode logits of the compiled cache graph equal, position by position, the
    compiled cache-free graph's logits on the whole sequence (same weights, same ranges).

    Both compiles calibrate the attention as exported (the cache graph's is fused after the
    weights are rounded), so their ranges and integer weights are identical. Q, K and V are
    planned as separate layers in both graphs and packed into GQA's QKV input afterwards where
    they were lowered alike (static int8, MatMulNBits); with V at int8 per
    block at run time and Q, K static (the third case, as the sample's w8a8 plans 6 of its
    v_proj layers) they stay three inputs, and the graphs still agree."""
    import onnx
    import onnx_ir as ir

    import lbcc
    from lbcc.calibration import RandomFeed
    from lbcc.irutils import layer_name
    from lbcc.recipes import LayerOverride, preset as get_preset

    _, kv, _ = tiny
    group = 32 if preset == "w4a16" else None
    recipe = get_preset(preset.split("-v-")[0], group)
    if preset.endswith("v-per-block"):
        recipe.layers.append(LayerOverride(match="*.v_proj", group_size=32,
                                           activations="dynamic-block"))
    feed = RandomFeed(vocab_size=VOCAB, seq_len=32, n=4)
    nocache = lbcc.compile(ir.from_proto(onnx.load_from_string(tiny_nocache)), recipe=recipe,
                           calibration=feed, progress=False)
    cached = lbcc.compile(ir.from_proto(ir.to_proto(kv)), recipe=recipe, calibration=feed,
                          progress=False)
    gqas = [n for n in cached.model.graph if n.op_type == "GroupQueryAttention"]
    notes = cached.run.context.notes["pack-qkv"]
    if preset.endswith("v-per-block"):
        assert all(n.inputs[1] is not None and n.inputs[2] is not None for n in gqas)
        assert notes["kept_separate"] == 2 and "lowered differently" in str(notes["why_separate"])
    else:
        assert all(n.inputs[1] is None and n.inputs[2] is None for n in gqas)
        assert notes["packed"]["qdq" if preset == "w8a8" else "nbits"] == 2
        assert layer_name(gqas[0].inputs[0].producer()) == "model.layers.0.self_attn.qkv_proj"
    # attention is fused after rounding, so both compiles calibrated the same operations: the
    # same static ranges and the same integer weights, bit for bit, layer by layer
    assert cached.run.context.notes["fuse-kv-attention"]["matched"]["gqa"] == 2
    assert cached.run.context.notes["fuse-kv-attention"]["matched"]["share_attention_lengths"] == 1
    # the skip norms' statistics, named again by the attention fusions, are omitted at the end
    assert cached.run.context.notes["cleanup"]["norm_stats_omitted"] == 4
    skip = next(n for n in cached.model.graph if n.op_type == "SkipSimplifiedLayerNormalization")
    assert [o.name for o in skip.outputs][1:3] == ["", ""]
    plans = {r["layer"]: (r["plan"].get("range"), r.get("weight", {}).get("rel_error"))
             for r in nocache.report.layers if "plan" in r}
    for r in cached.report.layers:
        if "plan" in r and r["layer"] in plans:
            assert (r["plan"].get("range"), r.get("weight", {}).get("rel_error")) == \
                plans[r["layer"]], r["layer"]
    cached.save(tmp_path / "kv.onnx")
    # the capture's record of the context length survives compiling and saving
    assert _rotary_cache_length(cached.model) == 128
    assert Generator(tmp_path / "kv.onnx").max_context == 128
    _assert_decode_matches_cache_free(tmp_path / "kv.onnx", nocache.model, VOCAB)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["w8a8-sq", "auto", "auto-avx2", "w4a16-awq", "w4a16-gptq",
                                    "w4a16-e4-gptq", "w4a16-mixed"])
def test_accuracy_presets_compile_the_cache_graph_as_the_cache_free_one(tiny, tiny_nocache,
                                                                      tmp_path, preset):
    """SmoothQuant / AWQ find the same groups in the KV-cache graph as in the cache-free one: the
    value -> output projection through the value cache's append (present = Concat(past, v)),
    the final norm -> tied lm_head through logits_to_keep's token Slice, and the norms whose
    equal scales (all 1.0 in this random model) the exporter stored once; so decoding gives the
    cache-free compile's logits."""
    import onnx
    import onnx_ir as ir

    import lbcc
    from lbcc.calibration import RandomFeed

    group = 32 if preset in ("w4a16-awq", "w4a16-gptq", "w4a16-mixed") else None
    feed = RandomFeed(vocab_size=VOCAB, seq_len=32, n=4)
    nocache = lbcc.compile(ir.from_proto(onnx.load_from_string(tiny_nocache)), preset=preset,
                           calibration=feed, group_size=group, progress=False)
    cached = lbcc.compile(ir.from_proto(ir.to_proto(tiny[1])), preset=preset, calibration=feed,
                          group_size=group, progress=False)

    def groups(result):
        notes = {p["name"]: p["notes"] for p in result.report.data["passes"]}
        smoothing = notes.get("smooth-quant") or notes.get("awq") or {}
        return sorted((g["from"], g.get("kind")) for g in smoothing.get("groups", []))

    assert groups(cached) == groups(nocache)
    if preset in ("w8a8-sq", "auto", "auto-avx2", "w4a16-awq"):
        found = dict(groups(cached))
        assert found.get("model.layers.1.self_attn.v_proj") == "attention"
        assert "model.layers.0.input_layernorm" in found
        if preset != "w4a16-awq":  # AWQ leaves the 8-bit lm_head alone
            assert "model.norm" in found
    # the same compile: every layer's plan (static range, bits) and weight error, bit for bit
    plans = {r["layer"]: (r.get("plan"), r.get("weight", {}).get("rel_error"))
             for r in nocache.report.layers if "plan" in r}
    cached_plans = {r["layer"]: (r.get("plan"), r.get("weight", {}).get("rel_error"))
                    for r in cached.report.layers if r["layer"] in plans}
    assert cached_plans == plans
    cached.save(tmp_path / "kv.onnx")
    # every preset here quantizes activations (static / per-token int8, or MatMulNBits' int8
    # blocks): decoding may flip an int8 rounding (see the helper); the prefill stays exact
    _assert_decode_matches_cache_free(tmp_path / "kv.onnx", nocache.model, VOCAB,
                                      rare_flips=True)


def _assert_decode_matches_cache_free(kv_path, nocache_model, vocab: int,
                                      rare_flips: bool = False) -> None:
    """The cache graph at ``kv_path`` is the cache-free graph's compile: its prefill of the whole
    sequence gives the cache-free graph's logits (to 1e-4 of the largest), and a prefill of 8
    tokens then one token a step gives them too, position by position.

    ``rare_flips`` (quantized activations): decoding runs other kernels than a prefill (one
    row; attention over the cache), whose float results differ in the last bits, and an int8
    rounding of the activations can then flip: measured once in 24 positions for
    w4a16-e4-gptq (0.7 % of the largest logit), and for w8a8-sq a flip in a value the cache
    keeps, which stays in every later position (at most 2.5 %). Then the decoded logits must be
    within 5 % of the largest and pick the same token at every position but one."""
    import onnx_ir as ir
    import onnxruntime as ort

    ids = np.random.default_rng(3).integers(0, vocab, 24)
    ref = ort.InferenceSession(ir.to_proto(nocache_model).SerializeToString()).run(
        None, {"input_ids": ids[None]})[0][0]
    gen = Generator(kv_path, max_context=128)
    layout, sess = gen.layout, gen.session
    scale = float(np.abs(ref).max())
    whole = sess.run(None, layout.feed(ids[None], layout.empty_past(), 0))[0][0]
    assert np.abs(whole - ref).max() <= 1e-4 * scale
    got = []
    prefill = 8
    outs = sess.run(None, layout.feed(ids[None, :prefill], layout.empty_past(), 0))
    got.extend(outs[0][0])
    for t in range(prefill, len(ids)):
        outs = sess.run(None, layout.feed(ids[None, t:t + 1], outs[1:], t))
        got.append(outs[0][0, 0])
    got = np.array(got)
    print(f"max |cache - cache-free| / max |logit| = {np.abs(got - ref).max() / scale}")
    per_position = np.abs(got - ref).max(axis=-1) / scale
    if rare_flips:
        assert per_position.max() <= 5e-2, per_position
        assert (got.argmax(-1) != ref.argmax(-1)).sum() <= 1
    else:
        assert per_position.max() <= 1e-4, per_position.max()
        assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
def test_qwen2_kv_graph_packs_biased_qkv(tmp_path):
    """Qwen2's Q / K / V projections have biases: the float graph packs them into one MatMul and
    one Add of the three biases (greedy tokens still those of transformers), and a w4a16 compile
    packs its MatMulNBits the same way after lowering (the bias then inside the kernel), its
    decode logits equal to its cache-free graph's."""
    pytest.importorskip("transformers")
    import onnx
    import onnx_ir as ir
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    import lbcc
    from lbcc.calibration import RandomFeed
    from lbcc.capture import capture
    from lbcc.modelio import save_model
    from lbcc.passes import CaptureNormalize, FuseORT
    from lbcc.pipeline import Pipeline, PipelineContext
    from lbcc.recipes import preset

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, initializer_range=0.2)).eval()
    with torch.no_grad():  # random init leaves the biases at zero
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    kv = ir.to_proto(capture(hf, kv_cache=True)).SerializeToString()
    make_tokenizer(tmp_path / "tokenizer.json")

    run = Pipeline([CaptureNormalize(), FuseORT()], PipelineContext()).run(
        ir.from_proto(onnx.load_from_string(kv)))
    assert run.records[-1].notes["matched"]["pack_qkv"] == 2
    gqas = [n for n in run.model.graph if n.op_type == "GroupQueryAttention"]
    assert all(n.inputs[0].producer().op_type == "Add" and n.inputs[1] is None for n in gqas)
    save_model(run.model, tmp_path / "fp32.onnx")
    prompt = np.array([5, 17, 33, 2, 9, 100, 41, 7])
    gen = Generator(tmp_path / "fp32.onnx", tmp_path)
    assert list(gen.generate_ids(prompt, 24, stop_at_eos=False)) == _hf_greedy(hf, prompt, 24)

    recipe, feed = preset("w4a16", 32), RandomFeed(vocab_size=VOCAB, seq_len=32, n=4)
    cached = lbcc.compile(ir.from_proto(onnx.load_from_string(kv)), recipe=recipe,
                          calibration=feed, progress=False)
    assert cached.run.context.notes["pack-qkv"]["packed"]["nbits"] == 2
    gqas = [n for n in cached.model.graph if n.op_type == "GroupQueryAttention"]
    # the packed bias goes into the packed MatMulNBits (fold-nbits-bias)
    assert all(n.inputs[0].producer().op_type == "MatMulNBits" and
               n.inputs[0].producer().inputs[5] is not None for n in gqas)
    assert cached.run.context.notes["fold-nbits-bias"]["folded"] == 2
    cached.save(tmp_path / "w4a16.onnx")
    nocache = lbcc.compile(capture(hf), recipe=recipe, calibration=feed, progress=False)
    _assert_decode_matches_cache_free(tmp_path / "w4a16.onnx", nocache.model, VOCAB)


def _sliding_window_lm(family: str):
    """A random Mistral (every layer attends to the last 8 positions), Gemma 2 (a sliding layer
    and a full one, scores capped at 2 by ``c · tanh(z / c)``, the logits at 30) or Gemma 3 (a
    sliding layer and a full one) with a window of 8 tokens."""
    import torch
    from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig,
                              MistralConfig)

    common = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=True, initializer_range=0.2, sliding_window=8)
    torch.manual_seed(0)
    layers = ["sliding_attention", "full_attention"]
    cfg = (MistralConfig(**common) if family == "mistral" else
           Gemma2Config(**common, head_dim=16, layer_types=layers, attn_logit_softcapping=2.0,
                        final_logit_softcapping=30.0) if family == "gemma2" else
           Gemma3TextConfig(**common, head_dim=16, layer_types=layers))
    return AutoModelForCausalLM.from_config(cfg).eval()


def _decode_logits(path, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits of a prefill of ``prefill`` tokens, then one token a step, through a KV graph."""
    gen = Generator(path, max_context=128)
    layout, sess = gen.layout, gen.session
    outs = sess.run(None, layout.feed(ids[None, :prefill], layout.empty_past(), 0))
    got = list(outs[0][0])
    for t in range(prefill, len(ids)):
        outs = sess.run(None, layout.feed(ids[None, t:t + 1], outs[1:], t))
        got.append(outs[0][0, 0])
    return np.array(got)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_sliding_window_attention_decodes_as_transformers(family, tmp_path):
    """Sliding-window layers (a window of 8, a prompt of 12, 12 more tokens one a step): every
    layer's cache keeps the whole past (the presents extend the pasts), the fused graph gives
    the windowed layers' ``GroupQueryAttention`` ``local_window_size`` 8 (without it the kernel
    attends to the whole past) and says so, the full layers none, every layer the model's
    softmax scale (Gemma's ``query_pre_attn_scalar ** -0.5`` = 1/16 here, not
    ``1/sqrt(head_dim)`` = 1/4) and Gemma 2's layers their score cap (``softcap``), and its
    logits equal transformers' forward pass at every position (Gemma 2's final logit cap
    included: ``logits_to_keep`` slices the lm_head's input through it)."""
    pytest.importorskip("transformers")
    import onnx
    import onnx_ir as ir
    import torch

    import lbcc
    from lbcc.calibration import RandomFeed
    from lbcc.capture import capture
    from lbcc.modelio import save_model
    from lbcc.passes import CaptureNormalize, FuseORT
    from lbcc.pipeline import Pipeline, PipelineContext

    hf = _sliding_window_lm(family)
    kv = ir.to_proto(capture(hf, kv_cache=True)).SerializeToString()
    run = Pipeline([CaptureNormalize(), FuseORT()], PipelineContext()).run(
        ir.from_proto(onnx.load_from_string(kv)))
    notes = run.records[-1].notes
    gqas = [n for n in run.model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqas) == 2 and "attention_kept_unfused" not in notes
    windows = [n.attributes.get_int("local_window_size", -1) for n in gqas]
    assert windows == ([8, 8] if family == "mistral" else [8, -1])
    assert notes["sliding_windows"] == ({"model.layers.0.self_attn": 8, "model.layers.1.self_attn": 8}
                                        if family == "mistral" else
                                        {"model.layers.0.self_attn": 8})
    if family != "mistral":
        assert all(n.attributes["scale"].value == pytest.approx(1 / 16) for n in gqas)
    assert [n.attributes.get_float("softcap", 0.0) for n in gqas] == (
        [2.0, 2.0] if family == "gemma2" else [0.0, 0.0])
    assert notes["matched"]["last_logits"] == 1
    save_model(run.model, tmp_path / "fp32.onnx")
    make_tokenizer(tmp_path / "tokenizer.json")
    ids = np.random.default_rng(5).integers(0, VOCAB, 24)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids[None])).logits[0].numpy()
    got = _decode_logits(tmp_path / "fp32.onnx", ids, prefill=12)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()

    # a quantizing compile of the cache graph keeps the same masks
    cached = lbcc.compile(ir.from_proto(onnx.load_from_string(kv)), preset="w8a8",
                          calibration=RandomFeed(vocab_size=VOCAB, seq_len=32, n=4),
                          progress=False)
    assert cached.run.context.notes["fuse-kv-attention"]["sliding_windows"] == \
        notes["sliding_windows"]
    cached.save(tmp_path / "w8a8.onnx")
    got = _decode_logits(tmp_path / "w8a8.onnx", ids, prefill=12)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama-eager", "phi3", "qwen3", "gemma"])
def test_every_layer_fuses_and_decodes_as_transformers(family, tmp_path):
    """Two export forms that left a layer's attention unfused (slow, correct), and two families
    whose attention differs from Llama's (Qwen3: RMS norms on each head's queries and keys;
    Gemma: scaled embeddings, ``query_pre_attn_scalar ** -0.5`` as the softmax scale):

    * ``llama-eager``: a Llama exported with eager attention names its first layer's value
      length ``seq + past_seq`` and its key length ``past_seq + seq``; onnxscript's SDPA rule
      compares them by name and skipped that layer, until capture-normalize gave the sums one
      spelling;
    * ``phi3``: Phi-3 reshapes the attention to the shape it has before the transpose back, and
      the GQA rule expects the transpose right after it (it became ``MultiHeadAttention``,
      without the rotary inside), until the reshape is bypassed.

    Every layer becomes ``GroupQueryAttention``, and the decode logits equal transformers'."""
    pytest.importorskip("transformers")
    import torch
    from transformers import (AutoModelForCausalLM, GemmaConfig, LlamaConfig, Phi3Config,
                              Qwen3Config)

    from lbcc.capture import capture
    from lbcc.modelio import save_model
    from lbcc.passes import CaptureNormalize, FuseORT
    from lbcc.pipeline import Pipeline, PipelineContext

    common = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)
    cfg = {"llama-eager": lambda: LlamaConfig(**common, attn_implementation="eager"),
           "phi3": lambda: Phi3Config(**common, pad_token_id=0),
           "qwen3": lambda: Qwen3Config(**common, head_dim=16),
           "gemma": lambda: GemmaConfig(**common, head_dim=16)}[family]()
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    run = Pipeline([CaptureNormalize(), FuseORT()], PipelineContext()).run(
        capture(hf, kv_cache=True))
    if family == "llama-eager":
        assert run.records[0].notes["sum_dims_respelled"] > 0
    elif family == "phi3":
        assert run.records[-1].notes["matched"]["identity_reshapes"] == 2
    assert run.records[-1].notes["matched"]["gqa"] == 2
    assert sum(n.op_type == "GroupQueryAttention" for n in run.model.graph) == 2
    assert not any(n.op_type == "MultiHeadAttention" for n in run.model.graph)
    save_model(run.model, tmp_path / "kv.onnx")
    ids = np.random.default_rng(6).integers(0, VOCAB, 16)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids[None])).logits[0].numpy()
    got = _decode_logits(tmp_path / "kv.onnx", ids, prefill=8)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


# ----------------------------------------------------------------------------- the sample

@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("LBCC_GENERATE_SAMPLE"),
                    reason="exporting the sample with a KV cache takes minutes (19 min on a "
                           "loaded 2-core machine); set LBCC_GENERATE_SAMPLE=1 to run it")
def test_sample_greedy_matches_transformers_for_64_tokens(smollm2, tmp_path):
    import torch

    from lbcc.capture import capture, load_hf_causal_lm
    from lbcc.modelio import save_model
    from lbcc.passes import CaptureNormalize, FuseORT
    from lbcc.pipeline import Pipeline, PipelineContext

    hf = load_hf_causal_lm(smollm2["hf_dir"])
    run = Pipeline([CaptureNormalize(), FuseORT()], PipelineContext()).run(
        capture(hf, kv_cache=True))
    assert run.records[-1].notes["matched"]["gqa"] == hf.config.num_hidden_layers
    save_model(run.model, tmp_path / "kv.onnx", external_data=True)
    gen = Generator(tmp_path / "kv.onnx", smollm2["hf_dir"])
    for prompt in ("The history of the Roman Empire", "def fibonacci(n):"):
        ids = np.array(gen.tokenizer.encode(prompt).ids)
        with torch.no_grad():
            ref = hf.generate(torch.tensor(ids)[None], max_new_tokens=64, min_new_tokens=64,
                              do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
        assert list(gen.generate_ids(ids, 64, stop_at_eos=False)) == ref, prompt


def test_kv_cache_dtype_errors_are_clear(mlp_path, tmp_path):
    """int4 (no target keeps it), int8 on a target without it, int8 without a KV cache."""
    out = tmp_path / "o.onnx"
    base = ["compile", str(mlp_path), "-o", str(out), "--preset", "w8a8-dynamic"]
    r = runner.invoke(app, base + ["--kv-cache-dtype", "int4"])
    assert r.exit_code == 2 and "KV cache in int4" in r.stderr and "int8" in r.stderr
    r = runner.invoke(app, base[:-1] + ["w8a8", "--kv-cache-dtype", "int8", "--target", "c"])
    assert r.exit_code == 2 and "KV cache in int8" in r.stderr
    r = runner.invoke(app, base + ["--kv-cache-dtype", "int8"])
    assert r.exit_code == 1 and "needs a graph with a KV cache" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


@pytest.mark.slow
def test_int8_kv_cache_decodes_close_to_the_float_cache(tiny, tmp_path):
    """--kv-cache-dtype int8: every GroupQueryAttention keeps its cache in int8 with per-channel
    scales calibrated on the compiled graph; decode logits stay close to the float-cache
    compile's (same weights), and the generator runs it with int8 buffers."""
    import onnx_ir as ir

    import lbcc
    from lbcc.calibration import RandomFeed
    from lbcc.recipes import preset

    _, kv, d = tiny
    # windows longer than the 128-position context: the cache calibration cuts them
    recipe, feed = preset("w4a16", 32), RandomFeed(vocab_size=VOCAB, seq_len=160, n=8)
    paths = {}
    for dtype in ("float", "int8"):
        r = lbcc.compile(ir.from_proto(ir.to_proto(kv)), recipe=recipe, calibration=feed,
                         progress=False, kv_cache_dtype=dtype)
        paths[dtype] = tmp_path / f"{dtype}.onnx"
        r.save(paths[dtype])
        if dtype == "int8":
            notes = r.run.context.notes["quantize-kv-cache"]
            assert notes["layers"] == 2
            gqas = [n for n in r.model.graph if n.op_type == "GroupQueryAttention"]
            assert all(n.attributes["kv_cache_bit_width"].value == 8 for n in gqas)
            assert list(gqas[0].inputs[12].const_value.shape) == [2, 16]  # kv heads x head dim
            assert r.model.graph.inputs[3].dtype == ir.DataType.INT8
    logits, prefill = {}, {}
    ids = np.random.default_rng(5).integers(0, VOCAB, 24)
    for dtype, path in paths.items():
        gen = Generator(path, max_context=128)
        assert gen.layout.dtype == (np.int8 if dtype == "int8" else np.float32)
        layout, sess = gen.layout, gen.session
        outs = sess.run(None, layout.feed(ids[None, :8], layout.empty_past(), 0))
        prefill[dtype] = outs[1:]
        got = [outs[0][0, -1]]
        for t in range(8, len(ids)):
            outs = sess.run(None, layout.feed(ids[None, t:t + 1], outs[1:], t))
            got.append(outs[0][0, 0])
        assert outs[1].dtype == gen.layout.dtype
        logits[dtype] = np.array(got)
    # layer 0's prefill stored its float keys / values rounded to the nearest step of their
    # channel (later layers read attention over the int8 cache, so their inputs differ)
    for i, slot in enumerate((12, 13)):
        step = gqas[0].inputs[slot].const_value.numpy()[None, :, None, :]
        q, x = prefill["int8"][i], prefill["float"][i]
        assert np.all(np.abs(q.astype(np.float32) * step - x) <= step / 2 + 1e-6)
    ref, got = logits["float"], logits["int8"]
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"int8 cache: max |logit difference| / max |logit| = {rel:.4f}")
    assert 0 < rel < 0.1  # this random model amplifies: weights drawn at 0.2
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    gen = Generator(paths["int8"], d)
    assert len(list(gen.generate_ids([3, 4, 5], 8, stop_at_eos=False))) == 8


@pytest.mark.slow
def test_genai_config_lets_onnxruntime_genai_load_the_model(tiny, tmp_path):
    """genai_config.json + the fused fp32 cache graph: onnxruntime-genai (if installed) produces
    the same greedy tokens as lbcc's generator."""
    import json

    import onnx_ir as ir

    from lbcc.genai_config import write_genai_config
    from lbcc.modelio import save_model
    from lbcc.passes import CaptureNormalize, FuseORT
    from lbcc.pipeline import Pipeline, PipelineContext

    hf, kv, _ = tiny
    hf.config.save_pretrained(tmp_path / "hf")
    model = Pipeline([CaptureNormalize(), FuseORT()], PipelineContext()).run(
        ir.from_proto(ir.to_proto(kv))).model
    (tmp_path / "out").mkdir()
    save_model(model, tmp_path / "out" / "model.onnx")
    cfg = json.loads(write_genai_config(tmp_path / "out" / "model.onnx", tmp_path / "hf")
                     .read_text())
    dec = cfg["model"]["decoder"]
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]) == (2, 2, 16)
    assert dec["inputs"]["position_ids"] == "position_ids"
    assert cfg["search"]["past_present_share_buffer"] is True  # presents are GQA outputs
    og = pytest.importorskip("onnxruntime_genai")
    prompt = [5, 77, 300, 12, 9]
    ref = list(Generator(tmp_path / "out" / "model.onnx", max_context=128).generate_ids(
        prompt, 20, stop_at_eos=False))
    m = og.Model(str(tmp_path / "out"))
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=25, min_length=25, do_sample=False)
    g = og.Generator(m, params)
    g.append_tokens(prompt)
    while not g.is_done():
        g.generate_next_token()
    assert [int(x) for x in g.get_sequence(0)[5:]] == ref
