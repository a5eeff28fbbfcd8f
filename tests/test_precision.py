"""select-precision: outlier-dominated inputs leave static int8, with the measured reason."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

import lbcc
import models as M
from lbcc.calibration import NpzFeed
from lbcc.recipes import preset


OUTLIER, GAIN = 7, 400.0


def _outlier_inputs(samples: int = 8, seq: int = 8, k: int = 64) -> np.ndarray:
    x = M.mlp_inputs(k=k, seq=seq, samples=samples)
    x[..., OUTLIER] *= GAIN  # one massive channel, as LLM down_proj inputs have
    return x


def _outlier_model():
    """The MLP whose weights damp the outlier channel as much as it is amplified, so that its
    contribution to the output is ordinary (as in LLMs, where the massive channel's weights are
    small): quantizing the input per tensor then crushes every other channel."""
    model = M.mlp_model(k=64)
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    arr = numpy_helper.to_array(w1).copy()
    arr[OUTLIER] /= GAIN
    w1.CopyFrom(numpy_helper.from_array(arr, "w1"))
    return model


def _compile(tmp_path, x, min_sqnr_db: float, model=None):
    np.savez(tmp_path / "calib.npz", x=x)
    recipe = preset("w8a8")
    recipe.activations.min_sqnr_db = min_sqnr_db
    return lbcc.compile(model or M.mlp_model(k=64), recipe=recipe,
                        calibration=NpzFeed(tmp_path / "calib.npz"), progress=False)


def test_outlier_input_falls_back_with_reason_and_is_more_accurate(tmp_path):
    x = _outlier_inputs()
    auto = _compile(tmp_path, x, 22.0, _outlier_model())
    forced = _compile(tmp_path, x, -1e9, _outlier_model())  # all static, whatever the SQNR
    rows = {r["layer"]: r for r in auto.report.layers if r["op"] == "MatMul"}
    first = rows["fc1"]
    # the input's own SQNR looks fine (its power is the outlier's); the output estimate does not
    assert first["plan"]["input_sqnr_db"] > 22.0 > first["plan"]["sqnr_db"]
    assert first["plan"]["activation"] == "dynamic-block"
    assert "outlier-dominated" in first["plan"]["reason"]
    assert first["plan"]["outliers"]["max_over_median"] > 50
    assert first["lowered_to"].endswith("MatMulNBits")
    forced_modes = {r["plan"]["activation"] for r in forced.report.layers if r["op"] == "MatMul"}
    assert forced_modes == {"static"}
    ref = np.concatenate([M.run_ort(_outlier_model(), {"x": s[None]})[0] for s in x])
    out_auto = np.concatenate([M.run_ort(auto.model, {"x": s[None]})[0] for s in x])
    out_forced = np.concatenate([M.run_ort(forced.model, {"x": s[None]})[0] for s in x])
    assert M.rel_err(ref, out_auto) < 0.5 * M.rel_err(ref, out_forced)


def test_well_behaved_inputs_stay_static(tmp_path):
    x = M.mlp_inputs(k=64, seq=8, samples=8)
    result = _compile(tmp_path, x, 22.0)
    modes = {r["plan"]["activation"] for r in result.report.layers if r["op"] == "MatMul"}
    assert modes == {"static"}


def _saturating_matmul(tmp_path):
    """x @ W where uint8 inputs sit near 255 and each column's weights are all +max: with int8
    weights of the full range every pair of products is 255 * 127 * 2 > 2^15, which x86 u8 x s8
    kernels without VNNI (vpmaddubsw) saturate."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = np.abs(rng.standard_normal((64, 16))).astype(np.float32) + 1.0
    w[:, ::2] = w[:, ::2].max(axis=0)  # even columns: every weight at the per-channel max
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "sat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16])],
        [numpy_helper.from_array(w, "w")])
    path = tmp_path / "sat.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    x = (rng.uniform(0.9, 1.0, (4, 8, 64))).astype(np.float32)  # samples x [1, 8, 64]
    np.savez(tmp_path / "sat_calib.npz", x=x)
    return path, tmp_path / "sat_calib.npz", x, w


def _int8_weight_ranges(model):
    out = []
    for node in model.graph:
        if node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None:
            q = node.inputs[0].const_value.numpy()
            if q.ndim == 2:
                zp = node.inputs[2].const_value.numpy().astype(np.int32) \
                    if len(node.inputs) > 2 and node.inputs[2] is not None else 0
                v = q.astype(np.int32) - zp
                out.append((str(q.dtype), int(v.min()), int(v.max())))
    return out


def test_full_range_int8_weights_run_exactly_on_every_cpu(tmp_path):
    """ort-int8 stores the int8 weights of uint8-activation layers as uint8 + 128 (ORT's u8 x u8
    kernels widen to 16 bits): the full [-127, 127] grid, and ORT's result equals the exact
    integer product on any CPU (on AVX2 without VNNI, int8 storage saturates here)."""
    import lbcc
    from lbcc.calibration import NpzFeed

    path, calib, x, w = _saturating_matmul(tmp_path)
    result = lbcc.compile(str(path), preset="w8a8", calibration=NpzFeed(calib), progress=False)
    ranges = _int8_weight_ranges(result.model)
    assert len(ranges) == 1 and ranges[0][0] == "uint8" and ranges[0][2] == 127
    plan = next(r["plan"] for r in result.report.layers if r["node"] == "proj")
    assert plan["activation"] == "static" and "value_bits" not in plan["weight"]
    lo, hi = plan["range"]
    step = (max(hi, 0) - min(lo, 0)) / 255
    zp = np.clip(np.rint(-min(lo, 0) / step), 0, 255)
    xq = np.clip(np.rint(x[0] / np.float32(step)) + zp, 0, 255) - zp
    s_w = np.abs(w).max(axis=0) / 127
    wq = np.clip(np.rint(w / s_w), -127, 127)
    exact = (xq.astype(np.float64) @ wq) * step * s_w
    got = M.run_ort(result.model, {"x": x[:1]})[0][0]
    assert M.rel_err(exact, got) < 1e-5


def test_saturation_safe_grid_on_targets_without_uint8_storage(mlp_path, mlp_calib):
    """A target exact only on [-64, 63] (``int8_weight_max_exact``, the C target) gets 7-bit
    values; opting out of saturation safety gives the full int8 range stored as int8."""
    import lbcc
    from lbcc.api import build_pipeline
    from lbcc.calibration import NpzFeed
    from lbcc.passes.precision import SelectPrecision
    from lbcc.recipes import preset
    from lbcc.target import get_target

    pipe = build_pipeline(preset("w8a8"), get_target("c"))
    assert next(p for p in pipe.passes if isinstance(p, SelectPrecision)).int8_weight_max_exact \
        == 63
    safe = lbcc.compile(str(mlp_path), target="c", preset="w8a8", calibration=NpzFeed(mlp_calib),
                        progress=False, stop_after="round-weights-rtn")
    ranges = _int8_weight_ranges(safe.model)
    assert ranges and all(lo >= -64 and hi <= 63 for _, lo, hi in ranges)
    assert any(lo == -64 or hi == 63 for _, lo, hi in ranges)
    recipe = preset("w8a8")
    recipe.weights.saturation_safe = False
    full = lbcc.compile(str(mlp_path), recipe=recipe, calibration=NpzFeed(mlp_calib),
                        progress=False)
    ranges = _int8_weight_ranges(full.model)
    assert all(dt == "int8" for dt, _, _ in ranges)
    assert any(lo < -64 or hi > 63 for _, lo, hi in ranges)


def test_measured_sqnr_is_the_fake_quantized_layer_error():
    from lbcc.numerics import quantize_weight
    from lbcc.passes.precision import measured_output_sqnr_db

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 32)).astype(np.float32)
    x[:, 3] *= 40.0  # one outlier channel: per-tensor uint8 loses the others
    w = rng.standard_normal((32, 16)).astype(np.float32)
    site = _const_site(w)
    lo, hi = float(x.min()), float(x.max())
    got = measured_output_sqnr_db(x, lo, hi, site, {"bits": 8, "symmetric": True})
    step = (hi - lo) / 255
    zp = np.rint(-lo / step)
    xq = (np.clip(np.rint(x / step) + zp, 0, 255) - zp) * step
    wq = quantize_weight(w.T, bits=8).dequantize().T
    ref = x @ w
    rel = (((ref - xq @ wq) ** 2).sum(1) / (ref**2).sum(1)).mean()
    assert got == pytest.approx(-10 * np.log10(rel))
    clean = x.copy()
    clean[:, 3] /= 40.0
    assert measured_output_sqnr_db(clean, float(clean.min()), float(clean.max()), site,
                                   {"bits": 8, "symmetric": True}) > got + 10


def _const_site(w: np.ndarray):
    from lbcc.passes.sites import Site

    class _W:  # the bits of ir.Value a Site needs here
        const_value = type("T", (), {"numpy": staticmethod(lambda: w)})()

    return Site(node=None, kind="matmul", weight=_W(), layer="l")  # type: ignore[arg-type]


def test_output_range_clips_what_the_weights_ignore():
    """activations.method = "output": an outlier channel that the weights barely read is
    clipped (the MSE range of the input keeps room for it), and the measured output SQNR of the
    chosen range is the best of the ranges searched, at least the MSE range's."""
    from lbcc.calibration import ActivationObserver
    from lbcc.passes.precision import measured_output_sqnr_db, output_error_range

    rng = np.random.default_rng(1)
    x = rng.standard_normal((512, 32)).astype(np.float32)
    x[:, 5] = np.abs(x[:, 5]) * 30.0  # large, positive, and almost unused below
    w = rng.standard_normal((32, 16)).astype(np.float32)
    w[5] *= 1e-3
    site, spec = _const_site(w), {"bits": 8, "symmetric": True}
    obs = ActivationObserver(keep_rows=512)
    obs.update(x[None])
    mse = obs.choose_range("mse")
    lo, hi, got = output_error_range(x, *obs.choose_range("minmax"), site, spec)
    assert hi < 0.5 * mse[1]
    assert got == pytest.approx(measured_output_sqnr_db(x, lo, hi, site, spec))
    assert got > measured_output_sqnr_db(x, *mse, site, spec) + 6


def test_auto_preset_measures_and_follows_the_outlier_report(tmp_path):
    """auto: smoothing first, then the per-layer choice from the measured SQNR; layers the
    outlier report calls 'keep higher' are the ones that leave static int8."""
    from test_smoothing import _inputs, norm_model

    np.savez(tmp_path / "c.npz", x=_inputs())
    r = lbcc.compile(norm_model(), preset="auto", calibration=NpzFeed(tmp_path / "c.npz"),
                     progress=False)
    names = [p["name"] for p in r.report.data["passes"]]
    assert names.index("smooth-quant") < names.index("select-precision")
    plans = [layer["plan"] for layer in r.report.layers if layer.get("status") == "quantized"]
    assert plans and all(p.get("sqnr_criterion") == "measured" for p in plans
                         if "range" in p)
    threshold = preset("auto").activations.min_sqnr_db
    for p in plans:
        if "range" in p:
            assert (p["activation"] == "static") == (p["sqnr_db"] >= threshold)
            if p["activation"] != "static":  # the per-token fallback, checked the same way
                assert (p["activation"] == "dynamic-token") == (p["token_sqnr_db"] >= threshold)


def test_auto_vnni_is_auto_with_int8_weight_storage(tmp_path):
    """auto-vnni compiles the same function as auto: every int8 weight that auto stores as
    uint8 + 128 (u8 x u8 kernels) is stored as int8 with the same values (u8 x s8 kernels, fast
    and exact with VNNI); everything else is identical."""
    from test_smoothing import _inputs, norm_model

    np.savez(tmp_path / "c.npz", x=_inputs())
    out = {}
    for name in ("auto", "auto-vnni"):
        r = lbcc.compile(norm_model(), preset=name, calibration=NpzFeed(tmp_path / "c.npz"),
                         progress=False)
        values = [node.inputs[0].const_value.numpy().astype(np.int32)
                  - (node.inputs[2].const_value.numpy().astype(np.int32)
                     if len(node.inputs) > 2 and node.inputs[2] is not None else 0)
                  for node in r.model.graph if node.op_type == "DequantizeLinear"
                  and node.inputs[0].const_value is not None
                  and node.inputs[0].const_value.numpy().ndim == 2]
        out[name] = (r, _int8_weight_ranges(r.model), sorted(n.op_type for n in r.model.graph),
                     values)
    (auto, auto_ranges, auto_ops, auto_q) = out["auto"]
    (vnni, vnni_ranges, vnni_ops, vnni_q) = out["auto-vnni"]
    assert auto_ops == vnni_ops
    assert auto_ranges and [dt for dt, _, _ in auto_ranges] == ["uint8"] * len(auto_ranges)
    assert [dt for dt, _, _ in vnni_ranges] == ["int8"] * len(vnni_ranges)
    assert len(auto_q) == len(vnni_q) and all(np.array_equal(a, b) for a, b in zip(auto_q, vnni_q))
    assert [layer["plan"] for layer in auto.report.layers] == \
        [layer["plan"] for layer in vnni.report.layers]


def _single_matmul(tmp_path, x, w):
    """One MatMul ``y = x @ w`` (x [1, S, K]) saved to disk, with ``x`` as its calibration."""
    import onnx
    from onnx import TensorProto, helper

    s, k = x.shape[1:]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, s, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, s, w.shape[1]])],
        [numpy_helper.from_array(w, "w")])
    path = tmp_path / "one.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    np.savez(tmp_path / "one_calib.npz", x=x)
    return path, NpzFeed(tmp_path / "one_calib.npz")


def _token_fallback_recipe():
    recipe = preset("w8a8")
    recipe.activations.fallback = "dynamic-token"
    recipe.activations.criterion = "measured"
    return recipe


def test_token_outliers_fall_back_to_exact_per_token_int8(tmp_path):
    """Massive activations in a few tokens (the attention-sink position) ruin one per-tensor
    scale; the per-token fallback quantizes each row on its own range, and ORT's integer kernel
    then computes exactly sum_k (u_tk - 128) (q_kn) * s_t * s_n."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 64, 64)).astype(np.float32)
    x[:, 0, 5] = 100.0  # the first token of every sample carries a massive activation
    w = (0.1 * rng.standard_normal((64, 24))).astype(np.float32)
    w[5] /= 100.0  # which the weights damp: that token's output is an ordinary one
    path, feed = _single_matmul(tmp_path, x, w)
    result = lbcc.compile(str(path), recipe=_token_fallback_recipe(), calibration=feed,
                          progress=False)
    plan = next(r for r in result.report.layers if r["node"] == "proj")
    assert plan["plan"]["activation"] == "dynamic-token"
    assert plan["plan"]["token_sqnr_db"] >= 22.0 > plan["plan"]["sqnr_db"]
    assert "MatMulIntegerToFloat" in plan["lowered_to"]
    mm = next(n for n in result.model.graph if n.op_type == "MatMulIntegerToFloat")
    q = mm.inputs[1].const_value.numpy().astype(np.int64) - 128  # uint8 storage of int8
    s_w = mm.inputs[3].const_value.numpy().astype(np.float64)
    assert mm.inputs[1].const_value.dtype == lbcc_uint8() and np.abs(q).max() == 127
    xs = x[0].astype(np.float32)
    s_t = np.maximum(np.abs(xs).max(axis=-1, keepdims=True) * np.float32(1 / 127),
                     np.float32(1e-30))
    u = np.rint(xs / s_t)
    exact = (u.astype(np.float64) @ q) * s_t * s_w
    got = M.run_ort(result.model, {"x": x[:1]})[0][0]
    assert M.rel_err(exact, got) < 1e-5
    static = preset("w8a8")
    static.activations.min_sqnr_db = -1e9  # all static, whatever the SQNR
    forced = lbcc.compile(str(path), recipe=static, calibration=feed, progress=False)
    ref = x[0] @ w
    assert M.rel_err(ref, got) < 0.3 * M.rel_err(ref, M.run_ort(forced.model,
                                                                 {"x": x[:1]})[0][0])


def lbcc_uint8():
    import onnx_ir as ir

    return ir.DataType.UINT8


def test_channel_outliers_skip_the_per_token_fallback(tmp_path):
    """A massive channel in every token defeats per-token scales as much as per-tensor ones:
    the measured per-token SQNR is below the threshold too, and the layer gets per-block int8."""
    x = _outlier_inputs()
    np.savez(tmp_path / "calib.npz", x=x)
    result = lbcc.compile(_outlier_model(), recipe=_token_fallback_recipe(),
                          calibration=NpzFeed(tmp_path / "calib.npz"), progress=False)
    first = next(r for r in result.report.layers if r["layer"] == "fc1")["plan"]
    assert first["activation"] == "dynamic-block"
    assert first["token_sqnr_db"] < 22.0 and "per-token" in first["reason"]
    # the per-token tier has its own threshold: below the measured SQNR, the layer runs per token
    recipe = _token_fallback_recipe()
    recipe.activations.min_token_sqnr_db = first["token_sqnr_db"] - 1.0
    lower = lbcc.compile(_outlier_model(), recipe=recipe,
                         calibration=NpzFeed(tmp_path / "calib.npz"), progress=False)
    plan = next(r for r in lower.report.layers if r["layer"] == "fc1")["plan"]
    assert plan["activation"] == "dynamic-token"


def test_float_last_tier_leaves_the_layer_unquantized_with_its_reason(tmp_path):
    """token_fallback = float: a layer that fails both static and per-token int8 stays float
    (exact), listed in the report with the measured SQNRs that sent it there."""
    x = _outlier_inputs()
    np.savez(tmp_path / "calib.npz", x=x)
    recipe = _token_fallback_recipe()
    recipe.activations.token_fallback = "float"
    result = lbcc.compile(_outlier_model(), recipe=recipe,
                          calibration=NpzFeed(tmp_path / "calib.npz"), progress=False)
    row = next(r for r in result.report.layers if r["layer"] == "fc1")
    assert row["status"] == "float" and "plan" not in row
    assert "kept at float" in row["reason"] and "per-token int8 measured" in row["reason"]
    assert row["measured"]["token_sqnr_db"] < 22.0
    graph = result.model.graph
    fc1 = next(n for n in graph if n.name == "fc1")
    assert fc1.op_type == "MatMul" and fc1.inputs[1].const_value is not None  # the float weight
    other = next(r for r in result.report.layers if r["layer"] == "fc2")
    assert other["status"] == "quantized"
    # against the float model, fc1 adds no error: the compiled model is at least as close as
    # the per-block one
    ref = M.run_ort(_outlier_model(), {"x": x[:1]})[0]
    block = lbcc.compile(_outlier_model(), recipe=_token_fallback_recipe(),
                         calibration=NpzFeed(tmp_path / "calib.npz"), progress=False)
    err = [float(np.abs(M.run_ort(r.model, {"x": x[:1]})[0] - ref).max()) for r in (result, block)]
    assert err[0] <= err[1]


def test_promotion_by_kl_follows_the_budget(tmp_path):
    """promote_max_ppl_increase: a float-fallback layer is measured at per-token int8 (its
    output's relative squared error here, the MLP has no logits) and promoted only when that
    fits the budget; the graph used for measuring leaves no trace."""
    x = _outlier_inputs()
    np.savez(tmp_path / "calib.npz", x=x)
    rows = {}
    for budget in (0.0, 0.5):
        recipe = _token_fallback_recipe()
        recipe.activations.token_fallback = "float"
        recipe.activations.promote_max_ppl_increase = budget
        result = lbcc.compile(_outlier_model(), recipe=recipe,
                              calibration=NpzFeed(tmp_path / "calib.npz"), progress=False)
        rows[budget] = next(r for r in result.report.layers if r["layer"] == "fc1")
        notes = next(p["notes"] for p in result.report.data["passes"]
                     if p["name"] == "select-precision")
        promo = notes["promotions"]["layers"]
        assert [r["layer"] for r in promo] == ["fc1"] and promo[0]["kl"] > 0
        assert [v.name for v in result.model.graph.inputs] == ["x"]
        graph = result.model.graph
        assert all(u.node.graph is graph for n in graph for o in n.outputs for u in o.uses())
    assert rows[0.0]["status"] == "float" and "did not fit the promotion budget" in \
        rows[0.0]["reason"]
    assert rows[0.5]["status"] == "quantized"
    plan = rows[0.5]["plan"]
    assert plan["activation"] == "dynamic-token" and "promoted to per-token int8" in plan["reason"]


def test_promotions_take_the_least_kl_per_weight_first():
    from lbcc.passes.token_promotion import choose_promotions

    kls = [4e-3, 1e-3, 2e-3, 1e-4]
    sizes = [100, 10, 1000, 1]
    # KL per weight: 4e-5, 1e-4, 2e-6, 1e-4 -> order 2, 0, then 1 / 3
    assert choose_promotions(kls, sizes, np.expm1(6.5e-3)) == [True, False, True, True]
    assert choose_promotions(kls, sizes, 0.0) == [False] * 4
    assert choose_promotions(kls, sizes, 1.0) == [True] * 4


def test_unknown_token_fallback_is_a_clear_error():
    from lbcc.errors import BadInputError
    from lbcc.recipes import recipe_from_dict

    with pytest.raises(BadInputError, match="token_fallback must be dynamic-block or float"):
        recipe_from_dict({"base": "auto", "activations": {"token_fallback": "fp16"}}, "bad")


def test_a_promotion_budget_outside_0_1_is_a_clear_error():
    from lbcc.errors import BadInputError
    from lbcc.recipes import recipe_from_dict

    with pytest.raises(BadInputError, match="promote_max_ppl_increase must be a fraction"):
        recipe_from_dict({"base": "auto-avx2", "activations": {"promote_max_ppl_increase": 5}},
                         "bad")


def test_targets_without_per_token_activations_refuse_that_fallback():
    from lbcc.errors import TargetError
    from lbcc.target import check_recipe, get_target

    check_recipe(_token_fallback_recipe(), get_target("ort-int8"))
    with pytest.raises(TargetError, match="per-token"):
        check_recipe(_token_fallback_recipe(), get_target("c"))


def test_token_sqnr_counts_every_token_once():
    """A range that fits one massive token and rounds the others to zero scores well by the
    global ratio (the massive token's energy dominates both sums) and badly per token."""
    from lbcc.numerics import sqnr_db, token_sqnr_db

    rng = np.random.default_rng(2)
    ref = rng.standard_normal((64, 16))
    ref[0] *= 1000.0
    got = np.zeros_like(ref)
    got[0] = ref[0]
    assert sqnr_db(float((ref**2).sum()), float(((ref - got) ** 2).sum())) > 40
    assert token_sqnr_db(ref, got) < 0.1
    assert token_sqnr_db(ref, ref) == float("inf")
