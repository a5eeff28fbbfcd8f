"""AWQ: scale search never worse than s = 1, exact folding, up -> down groups, output clip."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import lbcc
import models as M
from lbcc.calibration import NpzFeed
from lbcc.capture import capture
from lbcc.numerics import quantize_weight
from lbcc.passes import AWQ, CaptureNormalize
from lbcc.passes.awq import awq_scales, group_output_error
from lbcc.passes.calibrate import ACTIVATION_STATS, compute_activation_stats
from lbcc.passes.smoothing import SmoothQuant, find_smooth_groups
from lbcc.pipeline import Pipeline, PipelineContext
from lbcc.recipes import preset

K, H, SEQ = 64, 96, 16


def swiglu_model(seed: int = 0) -> onnx.ModelProto:
    """x -> RMSNorm -> down(silu(gate(h)) * up(h)) -> y (one Llama MLP block)."""
    rng = np.random.default_rng(seed)
    gamma = (1.0 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    wg = (rng.standard_normal((K, H)) / 8).astype(np.float32)
    wu = (rng.standard_normal((K, H)) / 8).astype(np.float32)
    wd = (rng.standard_normal((H, K)) / 10).astype(np.float32)
    wu[:, 5] *= 12.0  # an up-projection channel that makes the down input an outlier channel
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["h"], axis=-1,
                              epsilon=1e-5, name="post_attention_layernorm"),
             helper.make_node("MatMul", ["h", "wg"], ["g"], name="gate_proj"),
             helper.make_node("MatMul", ["h", "wu"], ["u"], name="up_proj"),
             helper.make_node("Sigmoid", ["g"], ["sg"], name="sig"),
             helper.make_node("Mul", ["g", "sg"], ["silu"], name="silu"),
             helper.make_node("Mul", ["silu", "u"], ["p"], name="prod"),
             helper.make_node("MatMul", ["p", "wd"], ["y"], name="down_proj")]
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((gamma, "gamma"), (wg, "wg"), (wu, "wu"), (wd, "wd"))]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, K])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _inputs(samples: int = 8, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((samples, SEQ, K)).astype(np.float32)
    x[..., 7] *= 20.0  # a salient input channel that survives the norm
    return x


def _run(passes, tmp_path, second_moments=False):
    np.savez(tmp_path / "c.npz", x=_inputs())
    ctx = PipelineContext(calibration=NpzFeed(tmp_path / "c.npz"), progress=False,
                          keep_rows=512, second_moments=second_moments)
    ctx.analyses.providers[ACTIVATION_STATS] = compute_activation_stats
    run = Pipeline([CaptureNormalize(), *passes], ctx).run(capture(swiglu_model()))
    return run.model, run.records[-1].notes


def test_groups_include_the_up_to_down_product():
    groups, _ = find_smooth_groups(capture(swiglu_model()))
    kinds = {g.kind: [c.name for c in g.consumers] for g in groups}
    assert kinds == {"norm": ["gate_proj", "up_proj"], "linear": ["down_proj"]}
    (linear,) = [g for g in groups if g.kind == "linear"]
    assert linear.prev.name == "up_proj"


def test_awq_is_exact_in_float_and_never_worse_than_unit_scales(tmp_path):
    model, notes = _run([AWQ(preset("w4a16", group_size=16))], tmp_path)
    assert len(notes["groups"]) == 2
    for g in notes["groups"]:
        assert g["error_after"] <= g["error_before"]
    # the salient channel of the norm group is protected: a real improvement there
    norm = next(g for g in notes["groups"] if g["kind"] == "norm")
    assert norm["alpha"] > 0 and norm["error_after"] < 0.9 * norm["error_before"]
    for x in _inputs(3, seed=5):
        ref = M.run_ort(swiglu_model(), {"x": x[None]})[0]
        got = M.run_ort(model, {"x": x[None]})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_awq_scales_are_normalized_and_alpha_zero_is_identity():
    m = np.array([0.1, 1.0, 10.0], np.float32)
    np.testing.assert_allclose(awq_scales(m, 0.0), 1.0)
    s = awq_scales(m, 0.5)
    assert abs(float(s.max() * s.min()) - 1.0) < 1e-5 and s[2] > s[1] > s[0]


def test_group_output_error_of_unit_scales_is_plain_rtn():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 32)).astype(np.float32)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    q = quantize_weight(w.T, bits=4, block_size=16, symmetric=False).dequantize().T
    expect = float(((x @ w - x @ q) ** 2).sum() / ((x @ w) ** 2).sum())
    got = group_output_error(x, [w], [(4, 16, False)], np.ones(32, np.float32), [x @ w])
    assert abs(got - expect) < 1e-6 * max(expect, 1.0)


def test_output_clip_beats_the_diagonal_clip_on_correlated_inputs():
    """Per channel there are no cross-group terms, so the output criterion is the true error."""
    rng = np.random.default_rng(2)
    base = rng.standard_normal((2048, 8)).astype(np.float32)
    x = (base @ rng.standard_normal((8, 48)) + 0.1 * rng.standard_normal((2048, 48))
         ).astype(np.float32)  # strongly correlated channels
    w = rng.standard_normal((32, 48)).astype(np.float32)  # out-major [N, K]
    h = (x.T @ x).astype(np.float64)

    def out_err(qw):
        return float(((x @ (w - qw.dequantize()).T) ** 2).sum())

    diag = quantize_weight(w, bits=4, block_size=None, symmetric=False, clip="mse",
                           importance=np.diag(h).astype(np.float32))
    out = quantize_weight(w, bits=4, block_size=None, symmetric=False, clip="output", hessian=h)
    plain = quantize_weight(w, bits=4, block_size=None, symmetric=False, clip="none")
    assert out_err(out) <= out_err(diag) and out_err(out) < out_err(plain)


def test_smoothquant_smooths_the_down_projection_only_when_asked(tmp_path):
    _, default = _run([SmoothQuant()], tmp_path)
    assert all(g["kind"] == "norm" for g in default["groups"])
    assert any("linear -> product -> linear" in s["reason"] for s in default["skipped"])
    model, notes = _run([SmoothQuant(linear_groups=True)], tmp_path)
    linear = [g for g in notes["groups"] if g["kind"] == "linear"]
    assert linear and linear[0]["consumers"] == ["down_proj"]
    assert linear[0]["error_after"] < linear[0]["error_before"]
    for x in _inputs(2, seed=6):
        ref = M.run_ort(swiglu_model(), {"x": x[None]})[0]
        np.testing.assert_allclose(M.run_ort(model, {"x": x[None]})[0], ref, rtol=1e-4,
                                   atol=1e-4)


def test_w4a16_awq_preset_beats_plain_rtn(tmp_path):
    np.savez(tmp_path / "c.npz", x=_inputs())
    feed = NpzFeed(tmp_path / "c.npz")
    awq = lbcc.compile(swiglu_model(), preset="w4a16-awq", calibration=feed, group_size=32,
                       progress=False)
    names = [p["name"] for p in awq.report.data["passes"]]
    assert names.index("awq") < names.index("round-weights-rtn")
    rtn = lbcc.compile(swiglu_model(), recipe=_plain_rtn(), progress=False)
    x = _inputs(4, seed=9)
    ref = np.concatenate([M.run_ort(swiglu_model(), {"x": s[None]})[0] for s in x])

    def err(m):
        return M.rel_err(ref, np.concatenate([M.run_ort(m, {"x": s[None]})[0] for s in x]))

    assert err(awq.model) < 0.8 * err(rtn.model)


def _plain_rtn():
    r = preset("w4a16", group_size=32)
    r.weights.clip = "none"
    return r
