"""GPTQ on small synthetic problems where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from lbcc.gptq import gptq_quantize
from lbcc.numerics import quantize_weight


def _correlated_inputs(rng, n, k):
    """Inputs with a strongly non-diagonal covariance (where GPTQ's error feedback pays off)."""
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    base = rng.standard_normal((n, k)) * np.linspace(3.0, 0.2, k)
    return (base @ mix + 0.1 * rng.standard_normal((n, k))).astype(np.float32)


def _output_error(w, qw, x):
    return float(np.linalg.norm(x @ w.T - x @ qw.dequantize().T) / np.linalg.norm(x @ w.T))


@pytest.mark.parametrize("bits,group,symmetric,k", [(4, 32, False, 96), (4, 32, True, 100),
                                                     (4, None, False, 64), (8, None, True, 64),
                                                     (4, 128, False, 576)])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group, symmetric, k, act_order):
    rng = np.random.default_rng(0)
    n_out = 48
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    x = _correlated_inputs(rng, 1024, k)
    rtn = quantize_weight(w, bits, group, symmetric, clip="none")
    gq = gptq_quantize(w, x.T.astype(np.float64) @ x, bits, group, symmetric, act_order=act_order,
                       clip="none")
    # same grid and storage layout as RTN: only the integer choices differ
    assert gq.q.shape == rtn.q.shape and gq.q.dtype == rtn.q.dtype
    np.testing.assert_array_equal(gq.scale, rtn.scale)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert gq.q.min() >= lo and gq.q.max() <= hi
    e_rtn, e_gptq = _output_error(w, rtn, x), _output_error(w, gq, x)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_e4m3_beats_rtn_e4m3_on_correlated_inputs(act_order):
    """GPTQ on the FP8 E4M3 grid: the same per-channel scales as RTN, every code an E4M3
    value, a lower output error; with H = I it rounds exactly like RTN."""
    import ml_dtypes

    from lbcc.numerics import quantize_weight_e4m3

    rng = np.random.default_rng(5)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    x = _correlated_inputs(rng, 1024, 96)
    rtn = quantize_weight_e4m3(w)
    gq = gptq_quantize(w, x.T.astype(np.float64) @ x, 8, None, True, act_order=act_order,
                       clip="none", fmt="e4m3")
    assert gq.format == "e4m3" and gq.q.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(gq.scale, rtn.scale)
    assert np.abs(gq.q.astype(np.float32)).max() <= 448
    e_rtn, e_gptq = _output_error(w, rtn, x), _output_error(w, gq, x)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    ident = gptq_quantize(w, np.eye(96), 8, None, True, percdamp=0.0, act_order=False,
                          clip="none", fmt="e4m3")
    np.testing.assert_array_equal(ident.q.view(np.uint8), rtn.q.view(np.uint8))


def test_gptq_with_identity_hessian_is_rtn():
    """With H = I there is nothing to compensate: GPTQ rounds exactly like RTN."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    rtn = quantize_weight(w, 4, 32, False, clip="none")
    gq = gptq_quantize(w, np.eye(64), 4, 32, False, percdamp=0.0, act_order=False, clip="none")
    np.testing.assert_array_equal(gq.q, rtn.q)


def test_gptq_handles_dead_inputs():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 32)).astype(np.float32)
    x = rng.standard_normal((256, 32)).astype(np.float32)
    x[:, 5] = 0.0  # a channel that is never active
    gq = gptq_quantize(w, x.T @ x, 4, 16, False)
    assert np.isfinite(gq.dequantize()).all()


def test_w4a16_gptq_preset_end_to_end(tmp_path):
    """The preset compiles, records GPTQ per layer, and its model is no worse than RTN's on the
    calibration distribution itself."""
    import lbcc
    from lbcc.calibration import NpzFeed

    import models as M

    model = M.mlp_model(k=64, hidden=96, n=48, seq=8)
    x = M.mlp_inputs(k=64, seq=8, samples=8)
    np.savez(tmp_path / "calib.npz", x=x)
    feed = NpzFeed(tmp_path / "calib.npz")
    gptq = lbcc.compile(model, preset="w4a16-gptq", calibration=feed, group_size=32,
                        progress=False)
    rtn = lbcc.compile(model, preset="w4a16", calibration=feed, group_size=32, progress=False)
    methods = {r["weight"]["method"] for r in gptq.report.layers if r["status"] == "quantized"}
    assert methods == {"gptq"}
    names = [p["name"] for p in gptq.report.data["passes"]]
    assert "round-weights-gptq" in names and "calibrate" in names
    ref = np.concatenate([M.run_ort(model, {"x": s[None]})[0] for s in x])
    out_g = np.concatenate([M.run_ort(gptq.model, {"x": s[None]})[0] for s in x])
    out_r = np.concatenate([M.run_ort(rtn.model, {"x": s[None]})[0] for s in x])
    assert M.rel_err(ref, out_g) <= M.rel_err(ref, out_r) * 1.05


def test_w8a8_fp8_gptq_preset_end_to_end(tmp_path):
    """GPTQ on the E4M3 grid through the pipeline: every layer rounded by GPTQ into
    float8e4m3fn weights, the model no worse than w8a8-fp8's (RTN) on the calibration data."""
    import lbcc
    from lbcc.calibration import NpzFeed

    import models as M

    model = M.mlp_model(k=64, hidden=96, n=48, seq=8)
    x = M.mlp_inputs(k=64, seq=8, samples=8)
    np.savez(tmp_path / "calib.npz", x=x)
    feed = NpzFeed(tmp_path / "calib.npz")
    gptq = lbcc.compile(model, preset="w8a8-fp8-gptq", calibration=feed, progress=False)
    rtn = lbcc.compile(model, preset="w8a8-fp8", progress=False)
    rows = [r for r in gptq.report.layers if r["status"] == "quantized"]
    assert {r["weight"]["method"] for r in rows} == {"gptq"}
    assert {r["weight"]["dtype"] for r in rows} == {"FLOAT8E4M3FN"}
    ref = np.concatenate([M.run_ort(model, {"x": s[None]})[0] for s in x])
    out_g = np.concatenate([M.run_ort(gptq.model, {"x": s[None]})[0] for s in x])
    out_r = np.concatenate([M.run_ort(rtn.model, {"x": s[None]})[0] for s in x])
    assert M.rel_err(ref, out_g) <= M.rel_err(ref, out_r) * 1.05


def test_gptq_preset_without_calibration_is_a_clear_error():
    import lbcc
    from lbcc.errors import BadInputError

    import models as M

    with pytest.raises(BadInputError, match="calibration"):
        lbcc.compile(M.mlp_model(), preset="w4a16-gptq", group_size=32, progress=False)


def test_sequential_gptq_sees_the_rounded_inputs_and_is_no_worse(tmp_path):
    """Sequential, one input per stage: the second layer's X^T X comes from the model whose
    first layer is already rounded, so it compensates that error; end to end it is no worse
    than one-pass GPTQ."""
    import lbcc
    from lbcc.api import build_pipeline
    from lbcc.calibration import NpzFeed
    from lbcc.capture import capture
    from lbcc.pipeline import PipelineContext
    from lbcc.recipes import preset
    from lbcc.target import get_target

    import models as M

    model = M.mlp_model(k=64, hidden=96, n=48, seq=8)
    x = M.mlp_inputs(k=64, seq=8, samples=8)
    np.savez(tmp_path / "calib.npz", x=x)
    feed = NpzFeed(tmp_path / "calib.npz")
    recipe = preset("w4a16-gptq", group_size=32)
    recipe.weights.sequential = True
    pipe = build_pipeline(recipe, get_target("ort-int8"),
                          PipelineContext(calibration=feed, progress=False))
    gptq = next(p for p in pipe.passes if p.name == "round-weights-gptq")
    assert gptq.sequential
    gptq.stage_inputs = 1
    run = pipe.run(capture(model))
    notes = next(r for r in run.records if r.name == "round-weights-gptq").notes
    assert notes["stages"] == 2 and notes["weights_rounded"] == 2
    one = lbcc.compile(model, preset="w4a16-gptq", calibration=feed, group_size=32,
                       progress=False)
    ref = np.concatenate([M.run_ort(model, {"x": s[None]})[0] for s in x])
    err_seq = M.rel_err(ref, np.concatenate([M.run_ort(run.model, {"x": s[None]})[0]
                                             for s in x]))
    err_one = M.rel_err(ref, np.concatenate([M.run_ort(one.model, {"x": s[None]})[0]
                                             for s in x]))
    assert err_seq <= err_one * 1.02


def test_w4a16_e4_gptq_keeps_the_decode_layout_and_rounds_the_tied_table():
    """w4a16-e4-gptq: the same graph as w4a16-e4 (one 4-bit table shared by the embedding's
    GatherBlockQuantized and the lm_head's MatMulNBits, symmetric groups of 32), every weight
    GPTQ-rounded, the tied lm_head included; on held-out tokens of the calibration distribution
    clearly better than w4a16-e4's round-to-nearest (with an isotropic random table GPTQ has
    no correlation to exploit: it measured 10 % worse there)."""
    import lbcc
    from lbcc.calibration import RandomFeed

    import models as M

    from onnx import numpy_helper

    model = M.tied_lm_model(dim=64)
    # an embedding table with correlated channels (rank 8 plus noise), as LLMs' are: GPTQ's
    # Hessian is then far from isotropic, where it has nothing to exploit
    rng = np.random.default_rng(5)
    table = rng.standard_normal((256, 8)) @ rng.standard_normal((8, 64)) / np.sqrt(8)
    table += 0.1 * rng.standard_normal((256, 64))
    init = next(i for i in model.graph.initializer if i.name == "embed_tokens")
    init.CopyFrom(numpy_helper.from_array(table.astype(np.float32), "embed_tokens"))
    feed = RandomFeed(256, seq_len=16, n=8, seed=3)
    gptq = lbcc.compile(model, preset="w4a16-e4-gptq", calibration=feed, progress=False)
    rtn = lbcc.compile(model, preset="w4a16-e4", calibration=feed, progress=False)
    assert M.op_counts(gptq.model) == M.op_counts(rtn.model)
    nbits = [n for n in gptq.model.graph if n.op_type == "MatMulNBits"]
    assert {n.attributes.get_int("block_size") for n in nbits} == {32}
    assert all(len(n.inputs) == 3 for n in nbits)  # symmetric: no zero points
    rows = {r["node"]: r for r in gptq.report.layers if r["status"] == "quantized"}
    assert rows["lm_head"]["weight"]["method"] == "gptq"
    assert {r["weight"]["method"] for n, r in rows.items() if n != "embed"} == {"gptq"}
    rng = np.random.default_rng(11)  # held-out ids from the calibration distribution
    ids = [rng.integers(0, 256, (1, 16), dtype=np.int64) for _ in range(4)]
    ref = np.concatenate([M.run_ort(model, {"input_ids": i})[0] for i in ids])
    out_g = np.concatenate([M.run_ort(gptq.model, {"input_ids": i})[0] for i in ids])
    out_r = np.concatenate([M.run_ort(rtn.model, {"input_ids": i})[0] for i in ids])
    assert M.rel_err(ref, out_g) < 0.8 * M.rel_err(ref, out_r)  # measured 0.032 vs 0.049


def test_w4a16_e4_gptq_g64_is_the_decode_layout_in_groups_of_64():
    """w4a16-e4-gptq-g64: w4a16-e4-gptq's graph with every block (the MatMulNBits and the tied
    table's GatherBlockQuantized) 64 wide, so half the scales; GPTQ-rounded like its parent, with
    at most twice its logit error (one group of 64 against two of 32 a row here)."""
    import lbcc
    from lbcc.calibration import RandomFeed

    import models as M

    model = M.tied_lm_model(dim=128)
    feed = RandomFeed(256, seq_len=16, n=8, seed=3)
    g64 = lbcc.compile(model, preset="w4a16-e4-gptq-g64", calibration=feed, progress=False)
    g32 = lbcc.compile(model, preset="w4a16-e4-gptq", calibration=feed, progress=False)
    assert M.op_counts(g64.model) == M.op_counts(g32.model)
    blocked = [n for n in g64.model.graph
               if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    assert {n.op_type for n in blocked} == {"MatMulNBits", "GatherBlockQuantized"}
    assert {n.attributes.get_int("block_size") for n in blocked} == {64}
    assert all(len(n.inputs) == 3 for n in blocked if n.op_type == "MatMulNBits")
    rows = [r for r in g64.report.layers if r["status"] == "quantized" and r["node"] != "embed"]
    assert rows and {r["weight"]["method"] for r in rows} == {"gptq"}
    for n in blocked:  # MatMulNBits (A, B, scales): N x K/64 scales (K = 128 here)
        if n.op_type == "MatMulNBits":
            scales = n.inputs[2].const_value
            assert scales is not None and scales.size == n.attributes.get_int("N") * 128 // 64
    rng = np.random.default_rng(11)
    ids = [rng.integers(0, 256, (1, 16), dtype=np.int64) for _ in range(4)]
    ref = np.concatenate([M.run_ort(model, {"input_ids": i})[0] for i in ids])
    err64 = M.rel_err(ref, np.concatenate([M.run_ort(g64.model, {"input_ids": i})[0] for i in ids]))
    err32 = M.rel_err(ref, np.concatenate([M.run_ort(g32.model, {"input_ids": i})[0] for i in ids]))
    assert err64 < 2 * err32
