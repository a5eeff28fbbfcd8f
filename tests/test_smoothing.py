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


def _smooth(model, tmp_path, alpha=None, min_sqnr_db=None):
    np.savez(tmp_path / "c.npz", x=_inputs())
    ctx = PipelineContext(calibration=NpzFeed(tmp_path / "c.npz"), progress=False, keep_rows=256)
    ctx.analyses.providers[ACTIVATION_STATS] = compute_activation_stats
    sq = SmoothQuant(alpha=alpha, min_sqnr_db=min_sqnr_db)
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
