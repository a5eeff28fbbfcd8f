"""Target ``c``: generated C99, built with gcc -fsanitize=address,undefined, bit-exact with ONNX
Runtime on the same QDQ graph (kernel property tests, whole models), and the memory planner."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import c_graphs as G
import lbcc
import models as M
from lbcc.errors import TargetError
from lbcc.targets.c import planner
from lbcc.targets.c.check import bit_exact, mismatches, run_c, run_ort
from lbcc.targets.c.lowering import lower

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
#: property tests: each example builds one C program (~1 s with the sanitizers)
PROP = settings(max_examples=5, deadline=None, derandomize=True, print_blob=True,
                phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no slow shrinking
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    counter = iter(range(10**6))
    return lambda: tmp_path_factory.mktemp(f"c{next(counter)}")


def assert_exact(model, samples, workdir):
    got, _ = run_c(model, samples, workdir)
    ref = run_ort(model, samples)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert bit_exact(g, r), f"{mismatches(g, r)} of {r.size} values differ from ORT"
    return got


def assert_close(model, samples, workdir, rtol=1e-5, atol=1e-6):
    got, _ = run_c(model, samples, workdir)
    for g, r in zip(got, run_ort(model, samples)):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- integer kernels

@PROP
@given(signed=st.booleans(), scale=st.floats(1e-3, 2.0), zp=st.integers(-128, 255),
       seed=st.integers(0, 2**16))
def test_quantize_linear_matches_ort(work, signed, scale, zp, seed):
    zp = int(np.clip(zp, -128, 127)) if signed else max(zp, 0)
    rng = np.random.default_rng(seed)
    inits = {"s": np.float32(scale), "z": np.array(zp, np.int8 if signed else np.uint8)}
    model = G.single("QuantizeLinear", [("x", np.float32, (4, 33))],
                     ("y", np.int8 if signed else np.uint8, (4, 33)), inits, ["s", "z"])
    x = (rng.standard_normal((3, 4, 33)) * 200 * scale).astype(np.float32)
    x[0, 0, :20] = (np.arange(-10, 10) + 0.5) * np.float32(scale)  # ties round half to even
    assert_exact(model, [x], work())


@PROP
@given(m=st.integers(1, 9), k=st.integers(1, 70), n=st.integers(1, 40),
       per_channel=st.booleans(), transposed=st.booleans(), signed=st.booleans(),
       seed=st.integers(0, 2**16))
def test_qmatmul_to_float_matches_ort(work, m, k, n, per_channel, transposed, signed, seed):
    """MatMul(DQ(x), DQ(w)) = MatMulIntegerToFloat: y = float(acc) * (s_x * s_w[n])."""
    rng = np.random.default_rng(seed)
    zp = int(rng.integers(-128, 128)) if signed else int(rng.integers(0, 256))
    model = G.qmatmul(rng, m, k, n, per_channel=per_channel, transposed=transposed,
                      signed=signed, x_zp=zp)
    x = (rng.standard_normal((2, m, k)) * 2).astype(np.float32)
    assert_exact(model, [x], work())


@PROP
@given(m=st.integers(1, 9), k=st.integers(1, 70), n=st.integers(1, 40),
       per_channel=st.booleans(), y_zp=st.integers(0, 255), seed=st.integers(0, 2**16))
def test_qmatmul_requantized_matches_ort(work, m, k, n, per_channel, y_zp, seed):
    """Q(MatMul(DQ(x), DQ(w))) = QLinearMatMul: y = sat(rne(acc * (s_x s_w[n] / s_y)) + z_y)."""
    rng = np.random.default_rng(seed)
    model = G.qmatmul(rng, m, k, n, per_channel=per_channel, requant=True, y_zp=y_zp,
                      x_zp=int(rng.integers(0, 256)))
    x = (rng.standard_normal((2, m, k)) * 2).astype(np.float32)
    assert_exact(model, [x], work())


@PROP
@given(c_in=st.integers(1, 6), c_mult=st.integers(1, 3), size=st.integers(3, 9),
       k=st.sampled_from([1, 2, 3]), stride=st.integers(1, 2), pad=st.integers(0, 1),
       depthwise=st.booleans(), bias=st.booleans(), relu=st.booleans(),
       seed=st.integers(0, 2**16))
def test_qconv_matches_ort(work, c_in, c_mult, size, k, stride, pad, depthwise, bias, relu,
                           seed):
    """Q(Conv(DQ(x), DQ(w), DQ(b))) = QLinearConv, incl. depthwise (group = C_in)."""
    k = min(k, size)
    rng = np.random.default_rng(seed)
    group = c_in if depthwise else 1
    c_out = c_in * c_mult if depthwise else c_mult + 1
    model = G.qconv(rng, 1, c_in, size, size, c_out, k, stride, pad, group, bias=bias,
                    relu=relu)
    x = rng.standard_normal((2, 1, c_in, size, size)).astype(np.float32)
    assert_exact(model, [x], work())


@PROP
@given(op=st.sampled_from(["Add", "Mul"]), rank=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_quantized_add_mul_match_ort(work, op, rank, seed):
    """Q(Add/Mul(DQ(a), DQ(b))), with broadcasting: ORT's QLinearAdd equals DQ, float add, Q;
    its x86 QLinearMul is rne(float((a-za)(b-zb)) * (sa*sb/sy) + zy) (lbcc_qmul_q8)."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in rng.integers(1, 6, rank))
    other = _broadcastable(rng, shape)
    inits: dict = {}
    nodes = G.act_qdq("a", rng.uniform(0.005, 0.05), int(rng.integers(0, 256)), False, inits)
    nodes += G.act_qdq("b", rng.uniform(0.005, 0.05), int(rng.integers(0, 256)), False, inits)
    nodes.append(helper.make_node(op, ["a_dq", "b_dq"], ["c"]))
    inits["y_s"] = np.float32(rng.uniform(0.01, 0.06) if op == "Add" else rng.uniform(5e-4, 5e-3))
    inits["y_z"] = np.array(rng.integers(0, 256), np.uint8)
    nodes.append(helper.make_node("QuantizeLinear", ["c", "y_s", "y_z"], ["y"]))
    model = G.finish(nodes, [("a", np.float32, shape), ("b", np.float32, other)],
                     [("y", np.uint8, shape)], inits)
    if op == "Mul":
        assert any(s.op.startswith("qmul") for s in lower(model).steps)
    a = (rng.standard_normal((3, *shape)) * 2).astype(np.float32)
    b = (rng.standard_normal((3, *other)) * 2).astype(np.float32)
    assert_exact(model, [a, b], work())


# ----------------------------------------------------------------------------- float kernels

def _broadcastable(rng, shape):
    rank = int(rng.integers(0, len(shape) + 1))
    sub = list(shape[len(shape) - rank:])
    return tuple(d if rng.random() < 0.5 else 1 for d in sub)


@PROP
@given(op=st.sampled_from(["Add", "Sub", "Mul", "Div"]), rank=st.integers(1, 4),
       swap=st.booleans(), seed=st.integers(0, 2**16))
def test_binary_broadcast_matches_ort(work, op, rank, swap, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in rng.integers(1, 5, rank))
    other = _broadcastable(rng, shape)
    a, b = (("b", np.float32, other), ("a", np.float32, shape)) if swap else \
        (("a", np.float32, shape), ("b", np.float32, other))
    model = G.single(op, [a, b], ("y", np.float32, shape))
    xa = rng.standard_normal((2, *a[2])).astype(np.float32)
    xb = (rng.standard_normal((2, *b[2])) + 3).astype(np.float32)
    assert_exact(model, [xa, xb], work())


def test_binary_with_constant_operand(work):
    rng = np.random.default_rng(0)
    model = G.single("Mul", [("a", np.float32, (2, 3, 5))], ("y", np.float32, (2, 3, 5)),
                     {"c": rng.standard_normal((3, 1)).astype(np.float32)}, ["c"])
    assert_exact(model, [rng.standard_normal((2, 2, 3, 5)).astype(np.float32)], work())


@pytest.mark.parametrize("op,attrs,extra", [("Relu", {}, {}), ("Neg", {}, {}), ("Abs", {}, {}),
                                            ("Clip", {}, {"lo": np.float32(-0.5),
                                                          "hi": np.float32(0.75)})])
def test_exact_unary_ops(work, op, attrs, extra):
    rng = np.random.default_rng(1)
    model = G.single(op, [("x", np.float32, (3, 17))], ("y", np.float32, (3, 17)), extra,
                     list(extra), **attrs)
    assert_exact(model, [rng.standard_normal((2, 3, 17)).astype(np.float32)], work())


@pytest.mark.parametrize("op", ["Sigmoid", "Tanh", "Exp"])
def test_libm_unary_ops_within_tolerance(work, op):
    rng = np.random.default_rng(2)
    model = G.single(op, [("x", np.float32, (4, 16))], ("y", np.float32, (4, 16)))
    assert_close(model, [rng.standard_normal((2, 4, 16)).astype(np.float32) * 3], work(),
                 rtol=2e-6, atol=1e-7)


def test_softmax_within_tolerance(work):
    rng = np.random.default_rng(3)
    model = G.single("Softmax", [("x", np.float32, (3, 5, 11))], ("y", np.float32, (3, 5, 11)),
                     axis=-1)
    assert_close(model, [rng.standard_normal((2, 3, 5, 11)).astype(np.float32) * 4], work(),
                 rtol=2e-6, atol=1e-7)


@PROP
@given(rank=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_transpose_matches_ort(work, rank, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in rng.integers(1, 5, rank))
    perm = [int(p) for p in rng.permutation(rank)]
    model = G.single("Transpose", [("x", np.float32, shape)],
                     ("y", np.float32, tuple(shape[p] for p in perm)), perm=perm)
    assert_exact(model, [rng.standard_normal((2, *shape)).astype(np.float32)], work())


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_concat_matches_ort(work, axis):
    rng = np.random.default_rng(4)
    shapes = [[2, 3, 4], [2, 3, 4], [2, 3, 4]]
    for i, s in enumerate(shapes):
        s[axis] = i + 1
    out = list(shapes[0])
    out[axis] = 6
    model = G.single("Concat", [(f"x{i}", np.float32, tuple(s)) for i, s in enumerate(shapes)],
                     ("y", np.float32, tuple(out)), axis=axis)
    assert_exact(model, [rng.standard_normal((2, *s)).astype(np.float32) for s in shapes], work())


def test_reshape_to_output_copies(work):
    rng = np.random.default_rng(5)
    model = G.single("Reshape", [("x", np.float32, (2, 3, 4))], ("y", np.float32, (6, 4)),
                     {"shape": np.array([6, 4], np.int64)}, ["shape"])
    assert_exact(model, [rng.standard_normal((2, 2, 3, 4)).astype(np.float32)], work())


@pytest.mark.parametrize("op,attrs,hw", [
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, 3),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}, 7),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, 3),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, 4),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                     "count_include_pad": 1}, 4),
    ("GlobalAveragePool", {}, 1)])
def test_pooling(work, op, attrs, hw):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 1, 3, 7, 7)).astype(np.float32)
    model = G.single(op, [("x", np.float32, (1, 3, 7, 7))], ("y", np.float32, (1, 3, hw, hw)),
                     **attrs)
    if op == "MaxPool":
        assert_exact(model, [x], work())
    else:
        assert_close(model, [x], work(), rtol=1e-6, atol=1e-7)


def test_gather_rows_matches_ort(work):
    rng = np.random.default_rng(7)
    table = rng.standard_normal((10, 6)).astype(np.float32)
    from onnx import helper

    model = G.finish([helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)],
                     [("ids", np.int64, (1, 5))], [("y", np.float32, (1, 5, 6))], {"table": table})
    ids = rng.integers(0, 10, (3, 1, 5)).astype(np.int64)
    assert_exact(model, [ids], work())


def test_unsupported_op_is_a_target_error():
    model = G.single("Erf", [("x", np.float32, (2, 3))], ("y", np.float32, (2, 3)))
    with pytest.raises(TargetError, match="Erf"):
        lower(model)


# ----------------------------------------------------------------------------- memory planner

def test_planner_reuses_memory_and_works_in_place():
    """x -> Add(c) -> Relu -> Add(c) -> Relu -> Mul(c) -> y: one live intermediate at a time, so
    in-place steps make the whole chain run in one buffer of the tensor's size."""
    from onnx import helper

    inits = {"c": np.ones((8, 32), np.float32)}
    nodes = [helper.make_node("Add", ["x", "c"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Add", ["b", "c"], ["d"]), helper.make_node("Relu", ["d"], ["e"]),
             helper.make_node("Mul", ["e", "c"], ["y"])]
    model = G.finish(nodes, [("x", np.float32, (8, 32))], [("y", np.float32, (8, 32))], inits)
    program = lower(model)
    summary = planner.plan(program)
    planner.check_plan(program)
    assert summary["in_place"] == 3
    assert program.arena_bytes == 8 * 32 * 4
    assert summary["no_reuse_bytes"] == program.arena_bytes  # one buffer, shared by all four


def test_planner_places_overlapping_lifetimes_apart():
    """x -> A -> (B, C) -> Concat: A, B and C are live together and must not overlap."""
    from onnx import helper

    inits = {"c": np.full((4, 8), 2.0, np.float32)}
    nodes = [helper.make_node("Mul", ["x", "c"], ["a"]), helper.make_node("Add", ["a", "c"], ["b"]),
             helper.make_node("Sub", ["a", "c"], ["d"]),
             helper.make_node("Concat", ["a", "b", "d"], ["y"], axis=0)]
    model = G.finish(nodes, [("x", np.float32, (4, 8))], [("y", np.float32, (12, 8))], inits)
    program = lower(model)
    planner.plan(program)
    planner.check_plan(program)
    assert program.arena_bytes == 3 * 4 * 8 * 4


# ----------------------------------------------------------------------------- whole models

@pytest.mark.parametrize("source", ["mlp", "gemm"])
def test_whole_model_bit_exact_on_host(work, models_dir, source):
    """lbcc.compile(..., target="c", preset="w8a8") -> C, identical to ORT on reference.onnx."""
    out = work()
    if source == "mlp":
        model, calib = models_dir / "mlp.onnx", models_dir / "mlp_calib.npz"
        x = M.mlp_inputs(samples=6, seed=21)[:, None]
    else:  # Gemm (transB, alpha, beta) -> MatMul + Add, one row per sample
        model = M.gemm_model(seq=1)
        np.savez(out / "rows.npz", x=M.mlp_inputs(samples=4).reshape(32, 1, 64)[:, 0])
        calib = out / "rows.npz"
        x = M.mlp_inputs(samples=6, seed=22).reshape(48, 1, 64)[:8]
    result = lbcc.compile(model, target="c", preset="w8a8", calibration=calib, progress=False)
    written = result.save(out / "c")
    assert {p.name for p in written} >= {"model.h", "model.c", "weights.c", "lbcc_kernels.c",
                                         "reference.onnx"}
    notes = result.report.data["passes"][-1]["notes"]
    assert notes["arena_bytes"] > 0 and notes["weight_bytes"] > 0
    assert sum(v for k, v in notes["ops"].items() if k.startswith("qmatmul")) == 2
    got = assert_exact(result.model, [x], out / "build")
    assert np.isfinite(got[0]).all()


def test_weight_only_recipe_runs_float_with_int8_weights_dequantized(work, models_dir):
    """activations.mode = none: the int8 weights are dequantized at compile time (exactly as
    DequantizeLinear does) and the MatMuls run in float, within float32 summation-order error
    of numpy. (Not ORT: it rewrites DQ(int8) + MatMul into MatMulNBits, 1e-2 away.)"""
    from lbcc.recipes import recipe_from_dict

    recipe = recipe_from_dict({"activations": {"mode": "none"}}, default_base="w8a8")
    result = lbcc.compile(models_dir / "mlp.onnx", target="c", recipe=recipe, progress=False)
    ops = result.report.data["passes"][-1]["notes"]["ops"]
    assert ops.get("matmul f32") == 2 and not any(k.startswith("q") for k in ops)
    init = {k: v.const_value.numpy() for k, v in result.model.graph.initializers.items()}
    w1, w2 = (init[f"w{i}_q"].astype(np.float32) * init[f"w{i}_scale"] for i in (1, 2))
    x = M.mlp_inputs(samples=3, seed=5)[:, None]
    (got,), _ = run_c(result.model, [x], work())
    np.testing.assert_allclose(got, np.maximum((x + init["b0"]) @ w1, 0) @ w2, rtol=1e-5,
                               atol=1e-5)


def test_compile_is_deterministic(tmp_path, models_dir):
    """Same model, calibration and preset: the same C sources, byte for byte."""
    texts = []
    for run in ("a", "b"):
        result = lbcc.compile(models_dir / "mlp.onnx", target="c", preset="w8a8",
                              calibration=models_dir / "mlp_calib.npz", progress=False)
        result.save(tmp_path / run)
        texts.append({f: (tmp_path / run / f).read_bytes()
                      for f in ("model.h", "model.c", "weights.c", "lbcc_model.json")})
    assert texts[0] == texts[1]


# ----------------------------------------------------------------------------- command line

def test_cli_compile_target_c_writes_sources_and_report(tmp_path, mlp_path, mlp_calib):
    import json

    from test_cli import lbcc_cli

    out = tmp_path / "mlp_c"
    result = lbcc_cli("compile", mlp_path, "--target", "c", "--preset", "w8a8", "--calib",
                      mlp_calib, "-o", out, "--report", tmp_path / "r.json", "-q")
    assert result.exit_code == 0, result.stderr
    assert {"model.h", "model.c", "weights.c", "lbcc_kernels.c", "lbcc_kernels.h",
            "reference.onnx"} <= {p.name for p in out.iterdir()}
    header = (out / "model.h").read_text()
    assert "int lbcc_model_run(const float *in_x, float *out_y);" in header
    assert "LBCC_MODEL_ARENA_BYTES" in header
    report = json.loads((tmp_path / "r.json").read_text())
    plan = next(p for p in report["passes"] if p["name"] == "plan-c")
    assert plan["notes"]["arena_bytes"] > 0
    assert report["output"]["bytes"] > 0


def test_cli_target_c_rejects_4bit_weights(tmp_path, mlp_path):
    from test_cli import assert_clean_failure, lbcc_cli

    result = lbcc_cli("compile", mlp_path, "--target", "c", "--preset", "w4a16", "-o",
                      tmp_path / "o")
    assert_clean_failure(result, 2, "4-bit")


def test_cli_target_c_names_an_op_it_cannot_run(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from test_cli import assert_clean_failure, lbcc_cli

    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Erf", ["h"], ["y"])],
        "erf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    M.save(model, tmp_path / "erf.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((4, 16))
             .astype(np.float32))
    result = lbcc_cli("compile", tmp_path / "erf.onnx", "--target", "c", "--calib",
                      tmp_path / "calib.npz", "-o", tmp_path / "o")
    assert_clean_failure(result, 2, "Erf")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_measure_c_reports_flash_ram_and_instructions(tmp_path, mlp_path, mlp_calib):
    import json

    from lbcc.targets.c import toolchain
    from test_cli import assert_clean_failure, lbcc_cli

    if not toolchain.have_arm_tools():
        pytest.skip(f"needs arm-none-eabi-gcc and qemu-system-arm ({toolchain.APT_PACKAGES})")
    out = tmp_path / "mlp_c"
    assert lbcc_cli("compile", mlp_path, "--target", "c", "--calib", mlp_calib, "-o", out,
                    "-q").exit_code == 0
    result = lbcc_cli("measure-c", out, "--core", "cortex-m4", "--json")
    assert result.exit_code == 0, result.stderr
    (m4,) = json.loads(result.stdout)
    manifest = json.loads((out / "lbcc_model.json").read_text())
    assert m4["flash_bytes"] > manifest["weight_bytes"] > 0
    assert m4["static_ram_bytes"] >= manifest["arena_bytes"] > 0
    assert 0 < m4["stack_bytes"] < 2048
    assert m4["instructions_per_inference"] > 8 * (64 * 96 + 96 * 48)  # one per MAC at least
    assert_clean_failure(lbcc_cli("measure-c", tmp_path), 2, "lbcc_model.json")


STRICT = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-Wshadow",
          "-Wconversion", "-Wsign-conversion", "-Wcast-qual", "-Wstrict-prototypes",
          "-Wmissing-prototypes", "-Wdouble-promotion", "-Wundef"]


def test_generated_c_is_clean_under_strict_firmware_warnings(tmp_path, models_dir):
    """What firmware builds often turn on (-Wconversion, -Wshadow, ...), as errors, for the host
    and, when the cross compiler is here, Cortex-M4 (SIMD32 path) and Cortex-M3."""
    import subprocess

    from lbcc.targets.c import toolchain

    result = lbcc.compile(models_dir / "mlp.onnx", target="c", preset="w8a8",
                          calibration=models_dir / "mlp_calib.npz", progress=False)
    result.save(tmp_path)
    sources = ["model.c", "weights.c", "lbcc_kernels.c"]
    compilers = [["gcc"]]
    if toolchain.have_arm_tools():
        compilers += [["arm-none-eabi-gcc", *flags] for _, flags in toolchain.CORES.values()]
    for cc in compilers:
        proc = subprocess.run([*cc, *STRICT, "-c", *sources], cwd=tmp_path, capture_output=True,
                              text=True)
        assert proc.returncode == 0, f"{cc}: {proc.stderr[-3000:]}"
