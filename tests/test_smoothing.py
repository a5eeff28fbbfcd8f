"""SmoothQuant: exact in float, lower quantized error, groups found from the graph."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import lbcc
import models as M
from lbcc.calibration import NpzFeed
from lbcc.capture import capture
from lbcc.passes.smoothing import SmoothQuant, find_smooth_groups, group_error
from lbcc.pipeline import Pipeline, PipelineContext
from lbcc.passes.calibrate import ACTIVATION_STATS, compute_activation_stats
from lbcc.passes import CaptureNormalize

K, N = 64, 48


def norm_model(share_weight: bool = False) -> onnx.ModelProto:
    """x -> SimplifiedLayerNormalization(gamma) -> {MatMul(Wq), MatMul(Wk)} -> Add -> y."""
    rng = np.random.default_rng(0)
    gamma = (1.0 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    wq = (rng.standard_normal((K, N)) / 8).astype(np.float32)
    wk = wq if share_weight else (rng.standard_normal((K, N)) / 8).astype(np.float32)
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["h"], axis=-1,
                              epsilon=1e-5, name="norm"),
             helper.make_node("MatMul", ["h", "wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["h", "wk" if not share_weight else "wq"], ["k"],
                              name="k_proj"),
             helper.make_node("Add", ["q", "k"], ["y"], name="add")]
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(wq, "wq")]
    if not share_weight:
        inits.append(numpy_helper.from_array(wk, "wk"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [1, 16, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, N])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _inputs(samples: int = 8) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((samples, 16, K)).astype(np.float32)
    x[..., 3] *= 30.0  # an outlier channel that survives the norm
    return x


def _smooth(model, tmp_path, alpha=None, min_sqnr_db=None, fallback="dynamic-block"):
    np.savez(tmp_path / "c.npz", x=_inputs())
    ctx = PipelineContext(calibration=NpzFeed(tmp_path / "c.npz"), progress=False, keep_rows=256)
    ctx.analyses.providers[ACTIVATION_STATS] = compute_activation_stats
    sq = SmoothQuant(alpha=alpha, min_sqnr_db=min_sqnr_db, fallback=fallback)
    run = Pipeline([CaptureNormalize(), sq], ctx).run(capture(model))
    return run.model, run.records[-1].notes


def test_smoothing_is_exact_in_float(tmp_path):
    for alpha in (0.5, None):
        smoothed, notes = _smooth(norm_model(), tmp_path, alpha)
        assert notes["smoothed"] == 1
        for x in _inputs(3):
            ref = M.run_ort(norm_model(), {"x": x[None]})[0]
            got = M.run_ort(smoothed, {"x": x[None]})[0]
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_alpha_search_lowers_the_group_error(tmp_path):
    _, notes = _smooth(norm_model(), tmp_path)
    (group,) = notes["groups"]
    assert group["alpha"] is not None
    assert group["error_after"] < 0.5 * group["error_before"]
    assert group["consumers"] == ["q_proj", "k_proj"]


def test_groups_that_fall_back_even_smoothed_are_left_alone(tmp_path):
    """A group whose best smoothed SQNR is still under the fallback threshold is not smoothed:
    its layers run per-block dynamic int8, which scaled weight rows only hurt."""
    _, notes = _smooth(norm_model(), tmp_path)
    best_db = -10 * np.log10(notes["groups"][0]["error_after"])
    _, below = _smooth(norm_model(), tmp_path, min_sqnr_db=best_db + 3)
    assert below["smoothed"] == 0 and "fall back" in below["groups"][0]["reason"]
    assert "per-block dynamic int8" in below["groups"][0]["reason"]
    # the reason names the recipe's fallback
    _, token = _smooth(norm_model(), tmp_path, min_sqnr_db=best_db + 3, fallback="dynamic-token")
    assert "per-token dynamic int8" in token["groups"][0]["reason"]
    _, above = _smooth(norm_model(), tmp_path, min_sqnr_db=best_db - 3)
    assert above["smoothed"] == 1


def test_group_error_with_unit_scales_is_the_plain_w8a8_error():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    assert 0 < group_error(x, [w], np.ones(8, np.float32)) < 1e-3


def test_shared_weights_are_skipped_with_a_reason():
    model = capture(norm_model(share_weight=True))
    groups, skipped = find_smooth_groups(model)
    assert not groups and "shared" in skipped[0][1]


def test_w8a8_sq_preset_end_to_end(tmp_path):
    np.savez(tmp_path / "c.npz", x=_inputs())
    r = lbcc.compile(norm_model(), preset="w8a8-sq", calibration=NpzFeed(tmp_path / "c.npz"),
                     progress=False)
    names = [p["name"] for p in r.report.data["passes"]]
    assert names.index("smooth-quant") < names.index("select-precision")
    plain = lbcc.compile(norm_model(), preset="w8a8", calibration=NpzFeed(tmp_path / "c.npz"),
                         progress=False)
    x = _inputs(4)
    ref = np.concatenate([M.run_ort(norm_model(), {"x": s[None]})[0] for s in x])
    err_sq = M.rel_err(ref, np.concatenate([M.run_ort(r.model, {"x": s[None]})[0] for s in x]))
    err = M.rel_err(ref, np.concatenate([M.run_ort(plain.model, {"x": s[None]})[0] for s in x]))
    assert err_sq < err


V = 160  # V x K above the constant folder's input limit (8192): the Transpose stays


def tied_lm_model() -> onnx.ModelProto:
    """ids -> Gather(E) + x -> RMSNorm(gamma) -> MatMul(Transpose(E)) -> logits: a tied lm_head
    whose input has an outlier channel (gamma[3] large)."""
    rng = np.random.default_rng(5)
    table = (rng.standard_normal((V, K)) / 4).astype(np.float32)
    gamma = (1.0 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    gamma[3] = 25.0
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
             helper.make_node("Add", ["emb", "x"], ["h"], name="residual"),
             helper.make_node("SimplifiedLayerNormalization", ["h", "gamma"], ["n"], axis=-1,
                              epsilon=1e-5, name="final_norm"),
             helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0], name="tie"),
             helper.make_node("MatMul", ["n", "Et"], ["logits"], name="lm_head")]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 16]),
                        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, K])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 16, V])],
        [numpy_helper.from_array(table, "E"), numpy_helper.from_array(gamma, "gamma")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _tied_feed(tmp_path, samples: int = 8):
    rng = np.random.default_rng(6)
    np.savez(tmp_path / "tied.npz", ids=rng.integers(0, V, (samples, 16)),
             x=rng.standard_normal((samples, 16, K)).astype(np.float32))
    return NpzFeed(tmp_path / "tied.npz")


def test_tied_lm_head_is_smoothed_on_its_own_copy(tmp_path):
    """untie: the lm_head gets diag(s) E^T as its own weight, the embedding keeps E; the float
    model is unchanged and the W8A8 logits are more accurate than without smoothing it."""
    assert not find_smooth_groups(capture(tied_lm_model()))[0]
    groups, _ = find_smooth_groups(capture(tied_lm_model()), untie=True)
    assert [g.consumers[0].name for g in groups] == ["lm_head"]
    feed = _tied_feed(tmp_path)
    ctx = PipelineContext(calibration=feed, progress=False, keep_rows=256)
    ctx.analyses.providers[ACTIVATION_STATS] = compute_activation_stats
    run = Pipeline([CaptureNormalize(), SmoothQuant(untie=True)], ctx).run(
        capture(tied_lm_model()))
    notes = run.records[-1].notes
    assert notes["smoothed"] == 1 and notes["untied_weights"] == K * V
    graph = run.model.graph
    lm = next(n for n in graph if n.name == "lm_head")
    assert lm.inputs[1].const_value is not None and "Transpose" not in M.op_counts(run.model)
    embed = next(n for n in graph if n.op_type == "Gather")
    np.testing.assert_array_equal(embed.inputs[0].const_value.numpy(),
                                  numpy_helper.to_array(tied_lm_model().graph.initializer[0]))
    feeds = {"ids": np.arange(16, dtype=np.int64)[None] % V,
             "x": np.random.default_rng(7).standard_normal((1, 16, K)).astype(np.float32)}
    ref = M.run_ort(tied_lm_model(), feeds)[0]
    assert M.rel_err(ref, M.run_ort(run.model, feeds)[0]) < 1e-5

    def w8a8(untie: bool):
        from lbcc.recipes import preset

        recipe = preset("w8a8-sq")
        recipe.smoothing.untie_lm_head = untie
        recipe.quantize_embedding = False
        return lbcc.compile(tied_lm_model(), recipe=recipe, calibration=feed, progress=False)

    untied, tied = w8a8(True), w8a8(False)
    assert "untied" in json_dumps(untied.report.data)
    assert M.rel_err(ref, M.run_ort(untied.model, feeds)[0]) < \
        0.5 * M.rel_err(ref, M.run_ort(tied.model, feeds)[0])


def json_dumps(data) -> str:
    import json

    return json.dumps(data, default=str)


S, HD, NH, NKV = 16, 8, 4, 2  # grouped-query attention: two query heads per kv head


def gqa_attention_model() -> onnx.ModelProto:
    """x -> v_proj -> [1, S, NKV, HD] -> heads first -> repeat each kv head (Unsqueeze, Expand,
    Reshape, as Hugging Face's repeat_kv exports) -> Softmax(scores) @ v -> back to
    [1, S, NH * HD] -> o_proj -> y. Two value channels are large (the outliers the o_proj input
    inherits: channels 2, 10 and 19, 27 of the two query heads of each kv head) and their o_proj
    rows small, so that every channel carries a like share of y: the case where the per-tensor
    range the outliers set costs the other channels their resolution."""
    rng = np.random.default_rng(7)
    wv = (rng.standard_normal((K, NKV * HD)) / 8).astype(np.float32)
    wv[:, [2, 11]] *= 25.0
    wo = (rng.standard_normal((NH * HD, N)) / 8).astype(np.float32)
    wo[[2, 10, 19, 27]] /= 25.0
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
             helper.make_node("Reshape", ["v", "s1"], ["v4"], name="view"),
             helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3], name="heads"),
             helper.make_node("Unsqueeze", ["vt", "ax2"], ["vu"], name="unsq"),
             helper.make_node("Expand", ["vu", "s2"], ["ve"], name="repeat"),
             helper.make_node("Reshape", ["ve", "s3"], ["vr"], name="repeat_view"),
             helper.make_node("Softmax", ["scores"], ["p"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["p", "vr"], ["a"], name="pv"),
             helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1, 3], name="tokens"),
             helper.make_node("Reshape", ["at", "s4"], ["a2"], name="merge"),
             helper.make_node("MatMul", ["a2", "wo"], ["y"], name="o_proj")]
    inits = [numpy_helper.from_array(wv, "wv"), numpy_helper.from_array(wo, "wo"),
             numpy_helper.from_array(i64(1, S, NKV, HD), "s1"),
             numpy_helper.from_array(i64(2), "ax2"),
             numpy_helper.from_array(i64(1, NKV, NH // NKV, S, HD), "s2"),
             numpy_helper.from_array(i64(1, NH, S, HD), "s3"),
             numpy_helper.from_array(i64(1, S, NH * HD), "s4")]
    graph = helper.make_graph(
        nodes, "gqa", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, K]),
                       helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, NH, S, S])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, S, N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _gqa_feeds(samples: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(8)
    return {"x": rng.standard_normal((samples, S, K)).astype(np.float32),
            "scores": (2 * rng.standard_normal((samples, NH, S, S))).astype(np.float32)}


def _gqa_group():
    model = capture(gqa_attention_model())
    model = Pipeline([CaptureNormalize()], PipelineContext(progress=False)).run(model).model
    groups, _ = find_smooth_groups(model)
    (g,) = [g for g in groups if g.kind == "attention"]
    return model, g


def test_value_to_output_group_maps_query_heads_to_their_kv_head():
    """o_proj input channel (head h, dim d) reads v channel (kv head h // 2, d)."""
    _, g = _gqa_group()
    assert g.prev.name == "v_proj" and [u.name for u in g.consumers] == ["o_proj"]
    j = np.arange(NH * HD)
    np.testing.assert_array_equal(g.channel_map, (j // HD) // (NH // NKV) * HD + j % HD)


def test_value_to_output_scales_are_exact_in_float():
    from lbcc.passes.smoothing import apply_scales

    model, g = _gqa_group()
    s = np.exp(np.random.default_rng(9).standard_normal(NKV * HD)).astype(np.float32)
    apply_scales(g, s)
    feeds = {k: v[:1] for k, v in _gqa_feeds(1).items()}
    ref = M.run_ort(gqa_attention_model(), feeds)[0]
    np.testing.assert_allclose(M.run_ort(model, feeds)[0], ref, rtol=1e-4, atol=1e-4)


def test_value_to_output_smoothing_lowers_the_o_proj_error(tmp_path):
    np.savez(tmp_path / "a.npz", **_gqa_feeds())
    ctx = PipelineContext(calibration=NpzFeed(tmp_path / "a.npz"), progress=False, keep_rows=128)
    ctx.analyses.providers[ACTIVATION_STATS] = compute_activation_stats
    run = Pipeline([CaptureNormalize(), SmoothQuant()], ctx).run(capture(gqa_attention_model()))
    (row,) = [r for r in run.records[-1].notes["groups"] if r["kind"] == "attention"]
    assert row["consumers"] == ["o_proj"] and row["alpha"] is not None
    assert row["held_out_rows"] == 64  # scored on the 4 calibration samples it was not fitted on
    assert row["error_after"] < 0.1 * row["error_before"]


def test_alpha_search_scores_on_held_out_rows():
    """SmoothQuant's scales divide each channel by its maximum as calibration saw it; scored on
    the rows they were fitted on, the search rewards alphas near 1 that underestimated maxima
    make fail on new rows. Heavy-tailed channels (Student t, 2.5 degrees of freedom), 64
    calibration rows that are all the calibration saw, 20 draws: the held-out search's choice
    has the lower error on 4,000 fresh rows in most draws and on average, and on average beats
    leaving the group unsmoothed. When the maxima come from many more tokens than the kept
    rows, every row is scored (no split)."""
    from lbcc.passes.smoothing import search_alpha

    alphas = list(np.round(np.arange(0.0, 1.0001, 0.05), 4))
    errors, wins = [], 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        scale = np.exp(rng.normal(0.0, 1.0, K)).astype(np.float32)
        scale[3] = 30.0
        x = (rng.standard_t(2.5, (64, K)) * scale).astype(np.float32)
        fresh = (rng.standard_t(2.5, (4000, K)) * scale).astype(np.float32)
        w = (rng.standard_normal((K, N)) / 8).astype(np.float32)
        cmax = np.abs(x).max(axis=0)

        def fresh_error(found):
            s = np.ones(K, np.float32) if found.s is None else found.s
            return group_error(fresh, [w], s, fit=x)  # range: the calibration rows'

        held = search_alpha(x, [w], cmax, alphas, tokens=len(x))
        in_sample = search_alpha(x, [w], cmax, alphas, held_out=False)
        assert held.held_out_rows == 32 and in_sample.held_out_rows == 0
        assert search_alpha(x, [w], cmax, alphas, tokens=16 * len(x)).held_out_rows == 0
        row = (group_error(fresh, [w], np.ones(K, np.float32), fit=x), fresh_error(in_sample),
               fresh_error(held))
        errors.append(row)
        wins += row[2] < row[1]
    unsmoothed, in_sample_err, held_err = np.mean(errors, axis=0)
    assert wins >= 14
    assert held_err < 0.8 * in_sample_err and held_err < 0.8 * unsmoothed
