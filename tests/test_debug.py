"""lbcc.debug (compare, diff), notebook pipeline helpers, bisect and the accuracy gate, on tiny
graphs built here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import numpy_helper

import lbcc
import models as M
from lbcc import debug
from lbcc.bisect import bisect, layer_ranking
from lbcc.calibration import NpzFeed
from lbcc.errors import BadInputError
from lbcc.recipes import recipe_from_dict

OUTLIER_CHANNEL = 3
OUTLIER_SCALE = 30.0


def outlier_inputs(samples: int = 8) -> np.ndarray:
    """mlp inputs whose channel 3 is 30x larger than the others (an LLM-like outlier channel)."""
    x = M.mlp_inputs(samples=samples)
    x[..., OUTLIER_CHANNEL] *= OUTLIER_SCALE
    return x


def outlier_mlp():
    """mlp_model whose fc1 weight row for the outlier channel is 30x smaller, so the outlier
    does not dominate the output (as in LLMs): a per-tensor uint8 range on fc1's input, set by
    the outlier, then drowns every other channel in rounding noise."""
    model = M.mlp_model()
    for i, init in enumerate(model.graph.initializer):
        if init.name == "w1":
            w = numpy_helper.to_array(init).copy()
            w[OUTLIER_CHANNEL, :] /= OUTLIER_SCALE
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, "w1"))
    return model


#: per-tensor static W8A8 with the outlier fallback switched off: breaks fc1 on outlier inputs
NO_FALLBACK = {"activations": {"min_sqnr_db": 0.0}}


@pytest.fixture
def outlier_data(tmp_path: Path) -> tuple[Path, Path]:
    x = outlier_inputs()
    np.savez(tmp_path / "calib.npz", x=x[:4])
    np.savez(tmp_path / "eval.npz", x=x[4:])
    return tmp_path / "calib.npz", tmp_path / "eval.npz"


class CountingFeed(NpzFeed):
    """An NpzFeed that counts how often its samples are iterated (calibration runs)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.passes = 0

    def samples(self, model):
        self.passes += 1
        yield from super().samples(model)


# ----------------------------------------------------------------------------- compare

def test_pair_stats_streamed_equal_batch():
    rng = np.random.default_rng(0)
    r = rng.standard_normal((3, 50)).astype(np.float32)
    q = r + 0.01 * rng.standard_normal((3, 50)).astype(np.float32)
    st = debug.PairStats()
    for i in range(3):
        st.update(r[i], q[i])
    row = st.row()
    rr, qq = r.astype(np.float64), q.astype(np.float64)
    assert row["sqnr_db"] == pytest.approx(10 * np.log10((rr ** 2).sum() / ((qq - rr) ** 2).sum()),
                                           abs=1e-3)
    cos = (rr * qq).sum() / np.sqrt((rr ** 2).sum() * (qq ** 2).sum())
    assert row["cosine"] == pytest.approx(cos, abs=1e-6)
    assert row["max_abs_error"] == pytest.approx(np.abs(qq - rr).max(), rel=1e-5)
    assert row["elements"] == 150


def test_compare_matches_direct_computation(mlp_calib):
    result = lbcc.compile(M.mlp_model(), preset="w8a8", calibration=mlp_calib, progress=False)
    cmp = debug.compare(M.mlp_model(), result.model, mlp_calib, check_fusions=True)
    assert {r["layer"] for r in cmp} == {"fc1", "fc2", "output:y"}
    sqnrs = cmp.column("sqnr_db")
    assert sqnrs == sorted(sqnrs)  # worst first
    # the output row is the deployed model's error, recomputed here from plain runs
    x = np.load(mlp_calib)["x"]
    ref = np.concatenate([M.run_ort(M.mlp_model(), {"x": x[i:i + 1]})[0] for i in range(len(x))])
    got = np.concatenate([M.run_ort(result.model, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    ref64, err = ref.astype(np.float64), got.astype(np.float64) - ref
    expect = 10 * np.log10((ref64 ** 2).sum() / (err ** 2).sum())
    assert cmp["output:y"]["sqnr_db"] == pytest.approx(expect, abs=0.05)
    assert cmp.samples == len(x)
    doc = json.loads(json.dumps(cmp.to_json()))
    assert doc["schema_version"] == debug.DEBUG_SCHEMA_VERSION and doc["kind"] == "compare"
    assert doc["layers"][0]["layer"] == cmp[0]["layer"]


def test_compare_identical_models_is_lossless(mlp_path, mlp_calib):
    cmp = debug.compare(mlp_path, debug.normalize(mlp_path), mlp_calib, layers="all")
    assert len(cmp) >= 3
    for row in cmp:
        assert row["sqnr_db"] is None and row["max_abs_error"] == 0.0  # None: infinite SQNR
        assert row["cosine"] == pytest.approx(1.0)


def test_compare_matches_layers_through_lowering():
    """w4a16 lowers MatMul -> MatMulNBits and the embedding -> GatherBlockQuantized; layers are
    still matched by name, the tied lm_head included."""
    src = M.tied_lm_model(dim=64)
    result = lbcc.compile(src, preset="w4a16", group_size=16, progress=False)
    cmp = debug.compare(src, result.model, "random:256", max_samples=2)
    assert {r["layer"] for r in cmp} == {"embed", "up_proj", "down_proj", "lm_head",
                                         "output:logits"}
    assert cmp.samples == 2
    assert all(r["sqnr_db"] is not None and 5 < r["sqnr_db"] < 80 for r in cmp)


#: a recipe that breaks one named layer on purpose: fc2 in 4-bit groups of 32, no clip search
BREAK_FC2 = {"layers": [{"match": "fc2", "bits": 4, "group_size": 32, "clip": "none",
                         "activations": "none"}]}


def test_compare_names_the_broken_layer(mlp_calib):
    rec = recipe_from_dict(BREAK_FC2, default_base="w8a8")
    broken = lbcc.compile(M.mlp_model(), recipe=rec, calibration=mlp_calib, progress=False)
    healthy = lbcc.compile(M.mlp_model(), preset="w8a8", calibration=mlp_calib, progress=False)
    bad = debug.compare(M.mlp_model(), broken.model, mlp_calib, check_fusions=True)
    good = debug.compare(M.mlp_model(), healthy.model, mlp_calib)
    assert bad[0]["layer"] in ("fc2", "output:y")  # worst first
    assert bad["fc2"]["sqnr_db"] < good["fc2"]["sqnr_db"] - 8
    assert bad["fc1"]["sqnr_db"] == pytest.approx(good["fc1"]["sqnr_db"], abs=0.5)
    assert set(bad.instrumented_outputs) == {"output:y"}


def test_compare_qdq_numerics_is_the_quantization_alone(mlp_calib):
    """numerics="qdq" runs Q/DQ as written: its output error equals that of the QDQ graph run
    with ONNX Runtime's graph optimizations off."""
    import onnxruntime as ort

    result = lbcc.compile(M.mlp_model(), preset="w8a8", calibration=mlp_calib, progress=False)
    cmp = debug.compare(M.mlp_model(), result.model, mlp_calib, numerics="qdq")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(ir.to_proto(result.model).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    x = np.load(mlp_calib)["x"]
    ref = np.concatenate([M.run_ort(M.mlp_model(), {"x": x[i:i + 1]})[0] for i in range(len(x))])
    got = np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    assert cmp["output:y"]["rel_error"] == pytest.approx(M.rel_err(ref, got), rel=1e-3)
    assert cmp.to_json()["numerics"] == "qdq"
    with pytest.raises(BadInputError, match="numerics"):
        debug.compare(M.mlp_model(), result.model, mlp_calib, numerics="fast")


def test_compare_errors_are_clear(mlp_path, mlp_calib, tied_path):
    with pytest.raises(BadInputError, match="no layer of the float model"):
        debug.compare(mlp_path, tied_path, mlp_calib)
    with pytest.raises(BadInputError, match="needs samples"):
        debug.compare(mlp_path, mlp_path, None)


# ----------------------------------------------------------------------------- pipeline

def test_from_preset_stop_resume_reuses_calibration(mlp_path, mlp_calib):
    feed = CountingFeed(mlp_calib)
    pipe = lbcc.Pipeline.from_preset("w8a8", calibration=feed, progress=False)
    run = pipe.run(ir.load(mlp_path), stop_after="detect-outliers",
                   snapshot_after=["detect-outliers"])
    assert run.stopped_after == "detect-outliers" and feed.passes == 1
    full = pipe.resume(run, after="detect-outliers")
    assert feed.passes == 1  # statistics restored with the snapshot, not recomputed
    assert [r.name for r in full.records] == pipe.names
    again = pipe.resume(run, after="detect-outliers")  # the snapshot is left untouched
    straight = lbcc.compile(mlp_path, preset="w8a8", calibration=mlp_calib, progress=False)
    assert _graph_bytes(again.model) == _graph_bytes(straight.model)
    assert _graph_bytes(full.model) == _graph_bytes(straight.model)


def _graph_bytes(model: ir.Model) -> bytes:
    """Nodes, initializers, inputs and outputs (value_info, i.e. shape annotations, left out:
    a straight compile loses those of tensors calibration once exposed as outputs)."""
    proto = ir.to_proto(model)
    proto.graph.ClearField("value_info")
    return proto.SerializeToString()


def test_with_options_reruns_one_pass(mlp_path, mlp_calib):
    pipe = lbcc.Pipeline.from_preset("w8a8", calibration=mlp_calib, progress=False)
    run = pipe.run(ir.load(mlp_path), snapshot_after=["detect-outliers"])
    skip_fc1 = recipe_from_dict({"layers": [{"match": "fc1", "skip": True}]},
                                default_base="w8a8")
    other = pipe.with_options("select-precision", recipe=skip_fc1)
    assert other.passes[4] is not pipe.passes[4] and pipe.passes[4].recipe.name == "w8a8"
    rerun = other.resume(run, after="detect-outliers")
    fc1 = next(n for n in rerun.model.graph if n.name == "fc1")
    assert fc1.op_type == "MatMul" and fc1.inputs[1].const_value is not None  # float weight
    assert rerun.context.notes["layers"]["fc1"]["status"] == "float"
    with pytest.raises(BadInputError, match="no option"):
        pipe.with_options("select-precision", alpha=0.5)
    with pytest.raises(BadInputError, match="no snapshot"):
        pipe.resume(run, after="calibrate")


def test_diff_between_snapshots(mlp_path, mlp_calib):
    pipe = lbcc.Pipeline.from_preset("w8a8", calibration=mlp_calib, progress=False)
    run = pipe.run(ir.load(mlp_path), snapshot_after=["select-precision", "round-weights-rtn"])
    d = debug.diff(run.snapshots["select-precision"], run.snapshots["round-weights-rtn"])
    assert d["ops"] == {"DequantizeLinear": 2}
    assert {"w1", "w2"} <= set(d["initializers"]["removed"])
    assert {r["layer"] for r in d["layers"]} == {"fc1", "fc2"}
    fc1 = next(r for r in d["layers"] if r["layer"] == "fc1")
    assert fc1["weight_bytes_after"] < fc1["weight_bytes_before"] / 3  # int8 + scales
    same = debug.diff(run.snapshots["select-precision"], run.snapshots["select-precision"])
    assert same["ops"] == {} and same["layers"] == [] and same["initializers"]["changed"] == []


# ----------------------------------------------------------------------------- bisect

def test_bisect_names_culprit_pass_and_layer(outlier_data):
    calib, evald = outlier_data
    rec = recipe_from_dict(NO_FALLBACK, default_base="w8a8")
    res = bisect(outlier_mlp(), recipe=rec, calibration=calib, eval_data=evald,
                 metric="output-error", tolerance=0.05)
    assert res.culprit_pass == "insert-qdq"  # activation quantization, not weight rounding
    rows = {r["pass"]: r for r in res.data["passes"]["rows"]}
    assert not rows["round-weights-rtn"]["exceeds"] and rows["insert-qdq"]["exceeds"]
    assert res.culprit_layers == ["fc1"]
    lay = res.data["layers"]
    assert lay["restored"] and lay["degradation"] <= 0.05
    assert res.data["metric"]["final_degradation"] > 0.1
    assert lay["ranking"][0]["layer"] == "fc1" and lay["ranking"][0]["activation_sqnr_db"] < 22
    # the restored compile really keeps fc1 in float and meets the tolerance
    model = res.restored_run.model
    fc1 = next(n for n in model.graph if n.name == "fc1")
    assert fc1.op_type == "MatMul" and fc1.inputs[1].const_value is not None
    x = np.load(evald)["x"]
    ref = np.concatenate([M.run_ort(outlier_mlp(), {"x": x[i:i + 1]})[0] for i in range(len(x))])
    got = np.concatenate([M.run_ort(model, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    assert M.rel_err(ref, got) <= 0.05
    assert json.loads(json.dumps(res.to_json()))["schema_version"] == debug.DEBUG_SCHEMA_VERSION


def test_default_fallback_keeps_the_outlier_layer_healthy(outlier_data):
    """The same model with the preset's own outlier fallback (select-precision sends fc1 to int8
    per block at run time) stays within the tolerance: nothing to bisect."""
    calib, evald = outlier_data
    res = bisect(outlier_mlp(), preset="w8a8", calibration=calib, eval_data=evald,
                 metric="output-error", tolerance=0.05)
    assert res.data["metric"]["final_degradation"] <= 0.05 and res.data["layers"] is None


def test_bisect_names_rounding_and_the_broken_layer(mlp_calib):
    rec = recipe_from_dict(BREAK_FC2, default_base="w8a8")
    res = bisect(M.mlp_model(), recipe=rec, calibration=mlp_calib, metric="output-error",
                 tolerance=0.03)
    assert res.culprit_pass == "round-weights-rtn"
    assert res.culprit_layers == ["fc2"]
    assert res.data["layers"]["ranking"][0]["layer"] == "fc2"
    assert res.data["layers"]["degradation"] <= 0.03


def test_bisect_within_tolerance_does_no_layer_search(mlp_calib):
    res = bisect(M.mlp_model(), preset="w8a8", calibration=mlp_calib, metric="output-error",
                 tolerance=0.5)
    assert res.culprit_pass is None and res.data["layers"] is None
    assert "nothing to bisect" in res.data["summary"]


def test_layer_ranking_orders_by_estimated_noise():
    layers = {
        "a": {"layer": "a", "status": "quantized", "weight": {"rel_error": 0.01},
              "plan": {"activation": "static", "sqnr_db": 40.0}},
        "b": {"layer": "b", "status": "quantized", "weight": {"rel_error": 0.01},
              "plan": {"activation": "static", "sqnr_db": 10.0}},
        "c": {"layer": "c", "status": "quantized", "weight": {"rel_error": 0.2},
              "plan": {"activation": "none"}},
        "d": {"layer": "d", "status": "float", "reason": "x"},
    }
    ranked = layer_ranking(layers)
    assert [r["layer"] for r in ranked] == ["b", "c", "a"]  # 0.1001 > 0.04 > 0.0002
    assert ranked[0]["estimated_sqnr_db"] == pytest.approx(-10 * math.log10(0.1 + 1e-4), abs=1e-3)
