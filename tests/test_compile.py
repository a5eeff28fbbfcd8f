"""End to end through ``lbcc.compile`` on tiny ONNX graphs: accuracy, ops, report, determinism."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lbcc
import models as M
from lbcc.calibration import RandomFeed
from lbcc.errors import BadInputError
from lbcc.recipes import preset, recipe_from_dict

MS = "com.microsoft"
IDS = np.random.default_rng(5).integers(0, 256, (1, 16)).astype(np.int64)
X = M.mlp_inputs(samples=1, seed=99)
X40 = M.mlp_inputs(samples=1, seed=99, k=40)

#: the float models and inputs the tests compile, by name
SOURCES = {
    "mlp": (lambda: M.mlp_model(), {"x": X}),
    "mlp_k40": (lambda: M.mlp_model(k=40, hidden=72), {"x": X40}),
    "gemm": (lambda: M.gemm_model(), {"x": X[0]}),
    "tied": (lambda: M.tied_lm_model(dim=64), {"input_ids": IDS}),
}
#: relative output error allowed vs the float model (random weights, so these are loose)
TOL = {"w8a8": 0.05, "w8a8-dynamic": 0.05, "w8a8-dynamic-tensor": 0.05, "w4a16": 0.15,
       "w8a8-fp8": 0.08}
#: not a preset: int8 per-channel weights, uint8 activations per tensor at run time
DYN_TENSOR = "w8a8-dynamic-tensor"
#: ops that quantize activations to int8 at run time (w8a8-dynamic may pick either form)
RUNTIME_INT8 = {f"{MS}::DynamicQuantizeMatMul", f"{MS}::MatMulNBits"}


def recipe_for(name: str, group_size: int | None = None):
    if name == DYN_TENSOR:
        return recipe_from_dict({"name": DYN_TENSOR, "weights": {"group_size": "channel"},
                                 "activations": {"mode": "dynamic"}}, default_base="w8a8")
    if group_size is None and name == "w4a16":
        group_size = 16  # the tiny models' K is 40..96
    return preset(name, group_size=group_size)


def compile_case(source_model, name: str, calibration=None, group_size: int | None = None,
                 **kwargs):
    """``lbcc.compile`` with a preset name, or the DYN_TENSOR recipe."""
    return lbcc.compile(source_model, recipe=recipe_for(name, group_size),
                        calibration=calibration, progress=False, **kwargs)


def _calibration(source: str, preset_name: str, tmp: Path):
    """What a static-activation compile of ``source`` calibrates on (None for the others)."""
    if preset_name != "w8a8":
        return None
    if source == "tied":
        return RandomFeed(vocab_size=256, seq_len=16, n=4)
    if source == "gemm":
        raise ValueError("see test_gemm_static")
    path = tmp / f"{source}_calib.npz"
    np.savez(path, x=M.mlp_inputs(k=40 if source == "mlp_k40" else 64))
    return path


@functools.lru_cache(maxsize=None)
def compiled(source: str, preset_name: str, group_size: int | None = None,
             stop_after: str | None = None):
    """Compile once per (source, preset, options) for the whole module; tests only read it."""
    import tempfile

    make, _ = SOURCES[source]
    tmp = Path(tempfile.mkdtemp(prefix="lbcc-test-calib-"))
    calib = _calibration(source, preset_name, tmp)
    return compile_case(make(), preset_name, calib, group_size, stop_after=stop_after)


def reference(source: str) -> np.ndarray:
    make, feeds = SOURCES[source]
    return M.run_ort(make(), feeds)[0]


def weight_sites_in_float_graph(source: str) -> set[str]:
    """Names of the MatMul / Gather nodes of the normalized float graph."""
    r = compiled(source, "w4a16", stop_after="fuse-ort")
    return {n.name for n in r.model.graph
            if n.op_type in ("MatMul", "Gemm", "Gather") and n.domain in ("", "ai.onnx")}


PRESET_CASES = [(s, p) for s in ("mlp", "tied")
                for p in ("w8a8", "w8a8-dynamic", DYN_TENSOR, "w4a16", "w8a8-fp8")]


# ----------------------------------------------------------------------------- accuracy and ops

@pytest.mark.parametrize("source,preset_name", PRESET_CASES)
def test_compiled_model_runs_and_is_close_to_float(source, preset_name, tmp_path):
    result = compiled(source, preset_name)
    out = result.save(tmp_path / "q.onnx")
    assert out[0] == tmp_path / "q.onnx"
    onnx.checker.check_model(str(tmp_path / "q.onnx"))
    _, feeds = SOURCES[source]
    ref = reference(source)
    got = M.run_ort(tmp_path / "q.onnx", feeds)[0]
    assert got.shape == ref.shape and np.isfinite(got).all()
    err = M.rel_err(ref, got)
    assert err < TOL[preset_name], f"{source}/{preset_name}: relative error {err:.4f}"
    assert err > 0  # something was quantized


def test_fp8_weight_only_on_ort_int8(tmp_path):
    """e4m3 weights with float activations: DequantizeLinear of float8e4m3fn weights into float
    MatMuls, each layer's report naming it; closer to float than the per-token FP8 preset."""
    r = recipe_from_dict({"base": "w8a8-fp8", "activations": {"mode": "none"}})
    result = lbcc.compile(M.mlp_model(), recipe=r, progress=False)
    result.save(tmp_path / "q.onnx")
    got = M.run_ort(tmp_path / "q.onnx", {"x": X})[0]
    err = M.rel_err(reference("mlp"), got)
    assert 0 < err < TOL["w8a8-fp8"]
    assert err < M.rel_err(reference("mlp"), M.run_ort(
        compiled("mlp", "w8a8-fp8").save(tmp_path / "a.onnx")[0], {"x": X})[0])
    rows = result.report.layers
    assert rows and all(row["lowered_to"] == "E4M3 values in a float MatMul" for row in rows)
    assert {row["weight"]["dtype"] for row in rows} == {"FLOAT8E4M3FN"}


@pytest.mark.parametrize("source", ["mlp", "tied"])
def test_w4a16_lowers_to_matmulnbits(source):
    result = compiled(source, "w4a16")
    ops = M.op_counts(result.model)
    assert ops.get(f"{MS}::MatMulNBits", 0) >= 2
    assert "MatMul" not in ops or source == "tied"  # tied lm_head may use another 8-bit form
    nbits = [n for n in result.model.graph if n.op_type == "MatMulNBits"]
    four_bit = [n for n in nbits if n.attributes.get_int("bits") == 4]
    assert len(four_bit) >= 2
    for n in four_bit:
        assert n.domain == MS
        assert n.attributes.get_int("block_size") == 16
        assert n.attributes.get_int("accuracy_level") == 4
        assert n.inputs[1].const_value is not None
        assert n.inputs[1].const_value.dtype == ir.DataType.UINT8
    assert "com.microsoft" in result.model.opset_imports


@pytest.mark.parametrize("source", ["mlp", "tied"])
def test_w8a8_dynamic_preset_quantizes_activations_at_run_time(source):
    result = compiled(source, "w8a8-dynamic")
    ops = M.op_counts(result.model)
    kernels = [n for n in result.model.graph if f"{n.domain}::{n.op_type}" in RUNTIME_INT8]
    assert len(kernels) == 2 + (source == "tied")
    assert "MatMul" not in ops and "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    for n in kernels:  # 8-bit weights, int8 activations computed inside the kernel
        if n.op_type == "MatMulNBits":
            assert n.attributes.get_int("bits") == 8
            assert n.attributes.get_int("accuracy_level") == 4
        else:  # int8 values stored as uint8 + 128 (saturation-safe u8 x u8 kernels)
            assert n.inputs[1].const_value.dtype == ir.DataType.UINT8
            assert (n.inputs[3].const_value.numpy() == 128).all()
    assert not preset("w8a8-dynamic").needs_calibration
    assert result.report.data["calibration"] is None


def test_dynamic_per_tensor_lowers_to_dynamic_quantize_matmul():
    result = compiled("mlp", DYN_TENSOR)
    ops = M.op_counts(result.model)
    assert ops.get(f"{MS}::DynamicQuantizeMatMul") == 2
    assert "MatMul" not in ops and "QuantizeLinear" not in ops
    assert "DynamicQuantizeLinear" not in ops  # folded into the kernel
    for n in result.model.graph:
        if n.op_type == "DynamicQuantizeMatMul":  # int8 values as uint8 + 128
            assert n.inputs[1].const_value.dtype == ir.DataType.UINT8
            assert n.inputs[0].producer() is None or n.inputs[0].producer().op_type != (
                "DequantizeLinear")


def test_w8a8_static_is_qdq():
    result = compiled("mlp", "w8a8")
    ops = M.op_counts(result.model)
    assert ops.get("QuantizeLinear", 0) >= 2 and ops.get("DequantizeLinear", 0) >= 4
    matmuls = [n for n in result.model.graph if n.op_type == "MatMul"]
    assert len(matmuls) == 2
    for mm in matmuls:
        x_dq, w_dq = (v.producer() for v in mm.inputs)
        assert x_dq.op_type == "DequantizeLinear" and w_dq.op_type == "DequantizeLinear"
        # int8 weight values, stored as uint8 with zero point 128 (saturation-safe)
        assert w_dq.inputs[0].const_value.dtype == ir.DataType.UINT8
        assert (w_dq.inputs[2].const_value.numpy() == 128).all()
        assert x_dq.inputs[0].producer().op_type == "QuantizeLinear"
        assert x_dq.inputs[0].dtype == ir.DataType.UINT8  # uint8 activations
        assert w_dq.inputs[1].const_value.numpy().shape == (mm.outputs[0].shape[-1],)  # per ch.


def test_w8a8_static_ranges_come_from_calibration():
    result = compiled("mlp", "w8a8")
    fc1 = next(row for row in result.report.layers if row["node"] == "fc1")
    lo, hi = fc1["plan"]["range"]
    assert lo < 0 < hi and hi - lo < 20  # N(0, 1) inputs plus a small bias
    assert fc1["plan"]["sqnr_db"] > 30
    assert result.report.data["calibration"]["kind"] == "npz"


def test_tied_embedding_is_quantized_once_and_float_table_is_gone():
    for preset_name in ("w8a8", "w8a8-dynamic", DYN_TENSOR, "w4a16"):
        result = compiled("tied", preset_name)
        rows = {r["node"]: r for r in result.report.layers}
        assert rows["embed"]["status"] == "quantized", preset_name
        assert rows["lm_head"]["status"] == "quantized", preset_name
        assert rows["embed"]["kind"] == "gather" and rows["lm_head"]["kind"] == "matmul-transposed"
        assert rows["embed"].get("shared_with_matmul") is True
        floats = [v for v in result.model.graph.initializers.values()
                  if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT
                  and v.const_value.size >= 256 * 64]
        assert floats == [], f"{preset_name}: float embedding table left: {floats}"


def test_tied_lm_head_left_float_by_the_fallback_releases_the_embedding():
    """fallback = float with a threshold nothing meets: every MatMul stays float (each with its
    measured reason) and the tied embedding, no longer sharing the lm_head's table, is quantized
    on its own spec; the model runs and stays close to the float one."""
    recipe = preset("w8a8")
    recipe.activations.fallback, recipe.activations.criterion = "float", "measured"
    recipe.activations.min_sqnr_db = 200.0
    source, feeds = SOURCES["tied"]
    result = lbcc.compile(source(), recipe=recipe, calibration=RandomFeed(256, 16, 4),
                          progress=False)
    rows = {r["node"]: r for r in result.report.layers}
    assert rows["lm_head"]["status"] == "float" and "kept at float" in rows["lm_head"]["reason"]
    assert rows["embed"]["status"] == "quantized" and not rows["embed"].get("shared_with_matmul")
    ref = M.run_ort(source(), feeds)[0]
    got = M.run_ort(result.model, feeds)[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05


def test_tied_4bit_embedding_becomes_gather_block_quantized():
    recipe = preset("w4a16", group_size=16)
    recipe.layers.clear()  # no per-layer exceptions: lm_head and embedding in 4 bits too
    result = lbcc.compile(M.tied_lm_model(dim=64), recipe=recipe, progress=False)
    ops = M.op_counts(result.model)
    assert ops.get(f"{MS}::GatherBlockQuantized") == 1
    assert ops.get(f"{MS}::MatMulNBits") == 3
    assert "Gather" not in ops
    gbq = next(n for n in result.model.graph if n.op_type == "GatherBlockQuantized")
    assert gbq.attributes.get_int("bits") == 4 and gbq.attributes.get_int("block_size") == 16
    got = M.run_ort(result.model, {"input_ids": IDS})[0]
    assert M.rel_err(reference("tied"), got) < TOL["w4a16"]


def test_w4a16_e4_preset_has_a_4bit_tied_table_and_no_zero_points():
    """The decode preset: embedding + lm_head one 4-bit table, every MatMulNBits symmetric (no
    zero-point input), groups of 32 everywhere."""
    result = lbcc.compile(M.tied_lm_model(dim=64), preset="w4a16-e4", progress=False)
    ops = M.op_counts(result.model)
    assert ops.get(f"{MS}::GatherBlockQuantized") == 1 and "Gather" not in ops
    gbq = next(n for n in result.model.graph if n.op_type == "GatherBlockQuantized")
    assert gbq.attributes.get_int("bits") == 4 and gbq.attributes.get_int("block_size") == 32
    nbits = [n for n in result.model.graph if n.op_type == "MatMulNBits"]
    assert len(nbits) == 3 and all(len(n.inputs) == 3 for n in nbits)
    assert {n.attributes.get_int("block_size") for n in nbits} == {32}
    assert result.report.data["recipe"]["name"] == "w4a16-e4"
    got = M.run_ort(result.model, {"input_ids": IDS})[0]
    assert M.rel_err(reference("tied"), got) < TOL["w4a16"]


@pytest.mark.parametrize("preset_name,dim", [
    ("w8a8", 64),
    ("w8a8-dynamic", 64),
    (DYN_TENSOR, 64),
    ("w4a16", 64),
    ("w4a16", 128),
])
def test_tied_table_is_stored_once(preset_name, dim):
    calib = RandomFeed(256, seq_len=16, n=2) if preset_name == "w8a8" else None
    result = compile_case(M.tied_lm_model(dim=dim), preset_name, calib)
    table_bytes = 256 * dim  # one byte per element at 8 bits, half that at 4 bits
    big = [(v.name, v.const_value.nbytes) for v in result.model.graph.initializers.values()
           if v.const_value is not None and v.const_value.nbytes >= table_bytes // 2]
    assert len(big) == 1, big
    assert M.rel_err(M.run_ort(M.tied_lm_model(dim=dim), {"input_ids": IDS})[0],
                     M.run_ort(result.model, {"input_ids": IDS})[0]) < TOL[preset_name]
    # an 8-bit table stored [D, V] for the lm_head is gathered as rows of its transpose, which
    # ONNX Runtime folds at load: contiguous rows a token, not D bytes strided by V
    gathers = [n for n in result.model.graph if n.op_type == "Gather"]
    assert all(n.attributes.get_int("axis", 0) == 0 for n in gathers)
    assert "Transpose" not in M.op_counts(ort_optimized(result.model))


def ort_optimized(model) -> onnx.ModelProto:
    """``model`` after ONNX Runtime's basic graph optimizations (constant folding included)."""
    import tempfile

    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = f"{d}/opt.onnx"
        ort.InferenceSession(ir.to_proto(model).SerializeToString(), so,
                             providers=["CPUExecutionProvider"])
        return onnx.load(f"{d}/opt.onnx")


def test_contrib_ops_come_with_their_opset_import():
    """MatMulNBits & co. live in com.microsoft: the model must import that domain even when the
    source model had no contrib op (no fusion matched) before lowering."""
    r = lbcc.compile(M.mlp_model(), preset="w4a16", group_size=16, stop_after="lower-ort",
                     progress=False)
    assert any(n.domain == MS for n in r.model.graph)
    assert MS in r.model.opset_imports


@pytest.mark.parametrize("group_size", [16, 32])
def test_w4a16_k_not_divisible_by_group(group_size):
    result = compiled("mlp_k40", "w4a16", group_size=group_size)
    got = M.run_ort(result.model, {"x": X40})[0]
    assert M.rel_err(reference("mlp_k40"), got) < TOL["w4a16"]
    fc1 = next(n for n in result.model.graph if n.op_type == "MatMulNBits"
               and n.attributes.get_int("K") == 40)
    assert fc1.attributes.get_int("block_size") == group_size


# ----------------------------------------------------------------------------- Gemm

def test_gemm_lowered_to_matmul_by_capture_normalize():
    r = compiled("gemm", "w4a16", stop_after="capture-normalize")
    ops = M.op_counts(r.model)
    assert "Gemm" not in ops and ops["MatMul"] == 2
    assert r.report.data["passes"][0]["notes"]["gemm_to_matmul"] == 2
    got = M.run_ort(r.model, {"x": X[0]})[0]
    np.testing.assert_allclose(got, reference("gemm"), rtol=1e-5, atol=1e-5)
    # alpha and transB are folded into the weight: one 2-D initializer per MatMul, [K, N]
    w = [n.inputs[1].const_value.numpy() for n in r.model.graph if n.op_type == "MatMul"]
    assert [a.shape for a in w] == [(64, 48), (48, 32)]


@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_trans_a_and_bias_are_exact_after_normalize(trans_a):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 24)).astype(np.float32)  # [K, N], stored as [N, K] (transB)
    c = rng.standard_normal(24).astype(np.float32)
    a_shape = [16, 5] if trans_a else [5, 16]
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["a", "w", "c"], ["y"], name="g", transA=trans_a,
                               alpha=1.5, beta=0.25)],
        "g", [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, a_shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [5, 24])],
        initializer=[onnx.numpy_helper.from_array(w.T.copy(), "w"),
                     onnx.numpy_helper.from_array(c, "c")])
    g.node[0].attribute.append(onnx.helper.make_attribute("transB", 1))
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 8
    a = rng.standard_normal(a_shape).astype(np.float32)
    expected = 1.5 * ((a.T if trans_a else a) @ w) + 0.25 * c
    r = lbcc.compile(model, preset="w8a8-dynamic", stop_after="capture-normalize",
                     progress=False)
    assert "Gemm" not in M.op_counts(r.model)
    np.testing.assert_allclose(M.run_ort(r.model, {"a": a})[0], expected, rtol=1e-5, atol=1e-5)


def test_sums_in_symbolic_dims_get_one_spelling():
    """``seq + past_seq`` and ``past_seq + seq`` (one KV layer's values and keys, exported with
    eager attention) become one name; other dims and expressions are left alone."""
    import onnx_ir as ir

    from lbcc.passes.normalize import canonical_sum_dims

    def value(name, dims):
        return ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(ir.DataType.FLOAT))

    x = value("x", ["batch", "seq + past_seq", 16])
    relu = ir.node("Relu", [x])
    relu.outputs[0].shape = ir.Shape(["batch", "past_seq + seq", 16])
    neg = ir.node("Neg", [relu.outputs[0]])
    neg.outputs[0].shape = ir.Shape(["batch", "2*seq + 1", "seq"])
    graph = ir.Graph([x], [neg.outputs[0]], nodes=[relu, neg], opset_imports={"": 21})
    assert canonical_sum_dims(ir.Model(graph, ir_version=10)) == 1
    assert x.shape[1] == relu.outputs[0].shape[1] == ir.SymbolicDim("past_seq + seq")
    assert [str(d) for d in neg.outputs[0].shape] == ["batch", "2*seq + 1", "seq"]


@pytest.mark.parametrize("preset_name", ["w8a8-dynamic", DYN_TENSOR, "w4a16"])
def test_gemm_compiles(preset_name):
    result = compiled("gemm", preset_name)
    assert "Gemm" not in M.op_counts(result.model)
    assert M.rel_err(reference("gemm"), M.run_ort(result.model, {"x": X[0]})[0]) < TOL[
        preset_name]
    assert {r["status"] for r in result.report.layers} == {"quantized"}


def test_gemm_static(tmp_path):
    # x is 2-D [S, K]; an NpzFeed sample is x[i:i+1], so make S dynamic and feed one row each
    gemm = M.gemm_model()
    gemm.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "S"
    gemm.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "S"
    np.savez(tmp_path / "rows.npz", x=M.mlp_inputs(samples=4).reshape(4 * 8, 64))
    result = lbcc.compile(gemm, preset="w8a8", calibration=tmp_path / "rows.npz", progress=False)
    assert M.op_counts(result.model).get("QuantizeLinear", 0) >= 2
    got = M.run_ort(result.model, {"x": X[0]})[0]
    assert M.rel_err(reference("gemm"), got) < TOL["w8a8"]


# ----------------------------------------------------------------------------- report

@pytest.mark.parametrize("source,preset_name", PRESET_CASES)
def test_report_accounts_for_every_weight_node(source, preset_name):
    result = compiled(source, preset_name)
    data = result.report.data
    assert data["schema_version"] >= 1
    assert data["target"] == "ort-int8" and data["recipe"]["name"] == preset_name
    assert data["stopped_after"] is None
    json.loads(result.report.to_json())  # serializable
    rows = {r["node"]: r for r in result.report.layers}
    assert set(rows) == weight_sites_in_float_graph(source)
    for node, row in rows.items():
        assert row["status"] in ("quantized", "float")
        assert row["op"] in ("MatMul", "Gather", "Gemm")
        if row["status"] == "float":
            assert row["reason"]
        else:
            assert row["plan"]["weight"]["bits"] in (4, 8)
            assert row["weight"]["rel_error"] < 0.2
            assert row["lowered_to"]
    # sizes shrink: weights are stored in 8 or 4 bits (w8a8-fp8 keeps the embedding table in
    # float: the tied model then stores it beside the lm_head's FP8 copy)
    sizes = data["sizes"]
    keep = 1.0 if (source, preset_name) == ("tied", "w8a8-fp8") else 0.5
    assert 0 < sizes["output_bytes"] < keep * sizes["input_bytes"]
    names = [p["name"] for p in data["passes"]]
    assert names[0] == "capture-normalize" and names[-1] == "verify"
    assert data["summary"]["quantized"] == sum(r["status"] == "quantized" for r in rows.values())
    assert data["versions"]["onnxruntime"] and data["versions"]["onnx"]


def test_report_layer_names_and_activation_modes():
    rows = {r["node"]: r for r in compiled("tied", DYN_TENSOR).report.layers}
    assert rows["up_proj"]["layer"] == "up_proj"
    assert rows["up_proj"]["plan"]["activation"] == "dynamic"
    assert rows["embed"]["plan"]["activation"] == "none"
    rows = {r["node"]: r for r in compiled("mlp", "w4a16").report.layers}
    assert rows["fc1"]["weight"]["block_size"] == 16 and rows["fc1"]["weight"]["bits"] == 4
    assert rows["fc1"]["plan"]["activation"] == "none"


def test_attention_like_matmul_is_reported_float_with_reason():
    """A MatMul of two activations has no weight: it stays float, and the report says why."""
    g = M.mlp_model()
    g.graph.node.append(onnx.helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1]))
    g.graph.node.append(onnx.helper.make_node("MatMul", ["y", "yt"], ["scores"], name="qk"))
    g.graph.output.append(onnx.helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT,
                                                             [1, 8, 8]))
    result = lbcc.compile(g, preset="w8a8-dynamic", progress=False)
    rows = {r["node"]: r for r in result.report.layers}
    assert rows["qk"]["status"] == "float" and "activations" in rows["qk"]["reason"]
    assert rows["fc1"]["status"] == "quantized"
    assert result.report.data["summary"]["float"] == 1


def test_recipe_skip_rule_keeps_layer_float():
    recipe = recipe_from_dict({"layers": [{"match": "fc2", "skip": True}]}, default_base="w4a16")
    recipe.weights.group_size = 16
    result = lbcc.compile(M.mlp_model(), recipe=recipe, progress=False)
    rows = {r["node"]: r for r in result.report.layers}
    assert rows["fc1"]["status"] == "quantized"
    assert rows["fc2"]["status"] == "float" and "fc2" in rows["fc2"]["reason"]
    ops = M.op_counts(result.model)
    assert ops[f"{MS}::MatMulNBits"] == 1 and ops["MatMul"] == 1
    assert result.model.graph.initializers["w2"].const_value.dtype == ir.DataType.FLOAT


def test_save_writes_report_json(tmp_path):
    result = compiled("mlp", "w4a16")
    result.save(tmp_path / "m.onnx", report_path=tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["schema_version"] == result.report.data["schema_version"]
    assert data["output"]["bytes"] == (tmp_path / "m.onnx").stat().st_size
    assert data["output"]["bytes"] < (M.mlp_model().ByteSize())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "report.json"]


def test_save_with_external_data(tmp_path):
    result = compiled("mlp", "w8a8")
    written = result.save(tmp_path / "m.onnx", external_data=True)
    assert written == [tmp_path / "m.onnx", tmp_path / "m.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert result.report.data["output"]["bytes"] == sum(p.stat().st_size for p in written)
    assert M.rel_err(reference("mlp"), M.run_ort(tmp_path / "m.onnx", {"x": X})[0]) < 0.05


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("source,preset_name", [("mlp", "w8a8"), ("tied", "w4a16"),
                                                ("tied", "w8a8-dynamic"), ("tied", DYN_TENSOR)])
def test_compile_is_deterministic(source, preset_name, tmp_path):
    make, _ = SOURCES[source]
    blobs = []
    for i in range(2):
        r = compile_case(make(), preset_name, _calibration(source, preset_name, tmp_path))
        r.save(tmp_path / f"{i}.onnx")
        blobs.append((tmp_path / f"{i}.onnx").read_bytes())
    assert blobs[0] == blobs[1]


# ----------------------------------------------------------------------------- stop_after / dump

@pytest.mark.parametrize("source", ["mlp", "tied"])
def test_stop_after_round_weights_gives_runnable_dq_model(source):
    r = compiled(source, "w4a16", stop_after="round-weights-rtn")
    assert r.report.data["stopped_after"] == "round-weights-rtn"
    assert [p["name"] for p in r.report.data["passes"]][-1] == "round-weights-rtn"
    ops = M.op_counts(r.model)
    assert ops.get("DequantizeLinear", 0) >= 2
    assert not any(k.startswith(MS) for k in ops if k.endswith("MatMulNBits"))
    dq = [n for n in r.model.graph if n.op_type == "DequantizeLinear"]
    assert any(n.inputs[0].const_value.dtype in (ir.DataType.UINT4, ir.DataType.INT4)
               for n in dq)
    _, feeds = SOURCES[source]
    got = M.run_ort(r.model, feeds)[0]
    assert M.rel_err(reference(source), got) < TOL["w4a16"]
    # the lowered model computes (nearly) the same function as its DQ form
    full = M.run_ort(compiled(source, "w4a16").model, feeds)[0]
    assert M.rel_err(got, full) < 0.02


def test_unknown_stop_after_is_bad_input():
    with pytest.raises(BadInputError) as exc:
        lbcc.compile(M.mlp_model(), preset="w4a16", group_size=16, stop_after="round-weights",
                     progress=False)
    assert "round-weights-rtn" in exc.value.hint


def test_dump_ir(tmp_path):
    r = lbcc.compile(M.mlp_model(), preset="w4a16", group_size=16, dump_ir=tmp_path / "ir",
                     progress=False)
    files = sorted(p.name for p in (tmp_path / "ir").glob("*.onnx"))
    expected = [f"{i:03d}_{rec.name}.onnx" for i, rec in enumerate(r.run.records, 1)]
    assert files == expected
    dumped = M.op_counts(tmp_path / "ir" / files[-1])
    assert dumped == M.op_counts(r.model)


# ----------------------------------------------------------------------------- sources and feeds

def test_sources_path_proto_and_ir_model_agree(tmp_path, mlp_path):
    a = lbcc.compile(mlp_path, preset="w4a16", group_size=16, progress=False)
    b = lbcc.compile(M.mlp_model(), preset="w4a16", group_size=16, progress=False)
    c = lbcc.compile(ir.from_proto(M.mlp_model()), preset="w4a16", group_size=16, progress=False)
    a.save(tmp_path / "a.onnx")
    b.save(tmp_path / "b.onnx")
    c.save(tmp_path / "c.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes() == (
        tmp_path / "c.onnx").read_bytes()
    assert a.report.data["source"] == str(mlp_path)


def test_random_calibration_spec_on_dynamic_seq_model():
    result = lbcc.compile(M.tied_lm_model(dim=64, dynamic_seq=True), preset="w8a8",
                          calibration="random:256", progress=False)
    assert result.report.data["calibration"]["kind"] == "random"
    assert M.rel_err(M.run_ort(M.tied_lm_model(dim=64, dynamic_seq=True), {"input_ids": IDS})[0],
                     M.run_ort(result.model, {"input_ids": IDS})[0]) < TOL["w8a8"]


def test_random_calibration_spec_follows_static_seq_len():
    result = lbcc.compile(M.tied_lm_model(dim=64), preset="w8a8", calibration="random:256",
                          progress=False)
    assert result.report.data["calibration"]["seq_len"] == 16


def test_text_calibration(tmp_path, tokenizer_json, calib_text):
    recipe = recipe_from_dict({"calibration": {"seq_len": 64, "samples": 4}}, default_base="w8a8")
    result = lbcc.compile(M.tied_lm_model(dim=64, dynamic_seq=True), recipe=recipe,
                          calibration=calib_text, tokenizer=tokenizer_json, progress=False)
    cal = result.report.data["calibration"]
    assert cal["kind"] == "text" and cal["samples"] == 4 and cal["seq_len"] == 64
    assert {r["status"] for r in result.report.layers} == {"quantized"}


def test_static_preset_without_calibration_is_bad_input():
    with pytest.raises(BadInputError, match="calibration"):
        lbcc.compile(M.mlp_model(), preset="w8a8", progress=False)


def test_text_calibration_without_tokenizer_is_bad_input(calib_text):
    with pytest.raises(BadInputError, match="tokenizer"):
        lbcc.compile(M.tied_lm_model(dynamic_seq=True), preset="w8a8", calibration=calib_text,
                     progress=False)


def test_bad_random_spec():
    with pytest.raises(BadInputError, match="random:VOCAB"):
        lbcc.compile(M.mlp_model(), preset="w8a8", calibration="random:lots", progress=False)


# ----------------------------------------------------------------------------- bad models

@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_are_bad_input(value):
    with pytest.raises(BadInputError) as exc:
        lbcc.compile(M.with_nonfinite(M.mlp_model(), "w1", value), preset="w8a8-dynamic",
                     progress=False)
    assert "'w1'" in exc.value.message and "fc1" in exc.value.message


def test_minus_inf_mask_constant_is_not_a_corrupt_weight():
    result = lbcc.compile(M.masked_model(), preset="w8a8-dynamic", progress=False)
    x = M.mlp_inputs(samples=1)
    ref = M.run_ort(M.masked_model(), {"x": x})[0]
    got = M.run_ort(result.model, {"x": x})[0]
    assert (got[..., 1::2] == 0).all()  # the masked columns stay masked
    assert M.rel_err(ref, got) < 0.05


def test_w8a8_matmul_fed_by_graph_input(tmp_path):
    np.savez(tmp_path / "c.npz", x=M.mlp_inputs())
    model = M.mlp_model(input_bias=False)
    result = lbcc.compile(model, preset="w8a8", calibration=tmp_path / "c.npz", progress=False)
    assert M.rel_err(M.run_ort(model, {"x": X})[0], M.run_ort(result.model, {"x": X})[0]) < 0.05


def test_nothing_to_quantize_is_bad_input():
    with pytest.raises(BadInputError, match="nothing to quantize"):
        lbcc.compile(M.relu_add_model(), preset="w8a8-dynamic", progress=False)


def test_weights_with_one_group_per_row_become_matmulnbits(tmp_path):
    """K <= group size: the rounding stores one scale per output channel; the lowering still
    emits MatMulNBits (the row zero-padded to one block), not a float DequantizeLinear + MatMul."""
    import lbcc
    import models as M

    model = M.mlp_model(k=64, hidden=96, n=48)  # fc1: K = 64 = one group; fc2: K = 96 < 128
    result = lbcc.compile(model, preset="w4a16", group_size=128, progress=False)
    ops = M.op_counts(result.model)
    assert ops.get("com.microsoft::MatMulNBits") == 2 and "DequantizeLinear" not in ops
    x = M.mlp_inputs(k=64, samples=1)
    names = [p["name"] for p in result.report.data["passes"]]
    before = lbcc.compile(model, preset="w4a16", group_size=128, progress=False,
                          stop_after=names[names.index("lower-ort") - 1])
    assert "com.microsoft::MatMulNBits" not in M.op_counts(before.model)
    # the same values; accuracy_level 4 quantizes the activations per block inside the kernel
    assert M.rel_err(M.run_ort(before.model, {"x": x})[0],
                     M.run_ort(result.model, {"x": x})[0]) < 0.02
