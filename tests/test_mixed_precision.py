"""Mixed precision: measured sensitivities, budgets respected, the most sensitive weights first."""

from __future__ import annotations

import numpy as np
import pytest

import lbcc
import models as M
from lbcc.calibration import RandomFeed
from lbcc.capture import capture
from lbcc.errors import BadInputError
from lbcc.numerics import quantize_weight
from lbcc.passes.mixed_precision import MixedPrecision, stored_bits
from lbcc.passes.sensitivity import kl_divergence as _kl
from lbcc.recipes import preset, recipe_from_dict


def _recipe(**budget):
    r = preset("w4a16", group_size=16)
    for k, v in budget.items():
        setattr(r.mixed_precision, k, v)
    return r


def _compile(**budget):
    return lbcc.compile(M.tied_lm_model(), recipe=_recipe(**budget),
                        calibration=RandomFeed(vocab_size=256, seq_len=16, n=4),
                        progress=False)


def test_stored_bits_count_scales_and_zero_points():
    assert stored_bits(4, 128, 576, symmetric=False) == pytest.approx(4 + 36 / 128)
    assert stored_bits(8, None, 64, symmetric=True) == pytest.approx(8 + 32 / 64)


def test_assignment_upgrades_the_most_sensitive_weight_per_bit_first():
    mp = MixedPrecision(_recipe(), avg_bits=8.0)  # 4-bit g16 stores 6.25 bits, 8-bit 10.5
    spec = preset("w4a16", group_size=16).weights
    cands = {n: {"params": 1000, "out_major": np.zeros((10, 100)), "spec": spec}
             for n in ("a", "b", "c")}
    choice = mp.assign(cands, {"a": 1e-3, "b": 5e-2, "c": 1e-2})
    assert choice["b"] != "4"  # the most sensitive one gets more bits
    assert choice["a"] == "4"
    assert mp._used_bits <= 8.0


def test_ppl_budget_upgrades_until_the_estimated_kl_fits():
    mp = MixedPrecision(_recipe(), max_ppl_increase=0.01)
    spec = preset("w4a16", group_size=16).weights
    cands = {n: {"params": 1000, "out_major": np.zeros((10, 100)), "spec": spec}
             for n in ("a", "b")}
    mp.assign(cands, {"a": 0.004, "b": 0.02})
    assert mp._estimated_kl <= np.log1p(0.01)


def test_sensitivity_is_the_kl_of_quantizing_that_weight_alone():
    r = _compile(avg_bits=8.0)
    rows = {w["weight"]: w for w in
            next(p for p in r.report.data["passes"] if p["name"] == "mixed-precision")
            ["notes"]["weights"]}
    assert set(rows) == {"embed_tokens", "w1", "w2"}
    # recompute w2's sensitivity by hand: quantize it alone, run both models, KL of the logits
    model = M.tied_lm_model()
    w2 = next(t for t in model.graph.initializer if t.name == "w2")
    from onnx import numpy_helper
    w = numpy_helper.to_array(w2)
    wq = quantize_weight(w.T, bits=4, block_size=16, symmetric=False).dequantize().T
    w2.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(wq, np.float32), "w2"))
    feed = RandomFeed(vocab_size=256, seq_len=16, n=4)
    x = next(iter(feed.samples(capture(M.tied_lm_model()))))
    ref = M.run_ort(M.tied_lm_model(), x)[0]
    got = M.run_ort(model, x)[0]
    assert rows["w2"]["sensitivity_4bit"] == pytest.approx(_kl(ref, got), rel=1e-3)


def test_budget_is_met_and_choices_reach_the_layers():
    r = _compile(avg_bits=9.0)
    notes = next(p for p in r.report.data["passes"] if p["name"] == "mixed-precision")["notes"]
    assert notes["avg_bits"] <= 9.0 and notes["budget_met"]
    by_layer = {row["layers"][0]: row["choice"] for row in notes["weights"]}
    bits = {layer["layer"]: layer["weight"]["bits"] if layer["status"] == "quantized" else "float"
            for layer in r.report.layers}
    for row in notes["weights"]:
        for layer in row["layers"]:
            assert str(bits[layer]) == row["choice"]
    assert set(by_layer.values()) - {"4"}, "a 9-bit budget upgrades something"


def test_generous_ppl_budget_keeps_everything_at_4_bits_and_tight_one_upgrades():
    loose = _compile(max_ppl_increase=10.0)
    notes = next(p for p in loose.report.data["passes"] if p["name"] == "mixed-precision")["notes"]
    assert notes["counts"]["4"] == 3
    tight = _compile(max_ppl_increase=1e-12)  # this toy model's KLs are ~1e-9
    notes = next(p for p in tight.report.data["passes"] if p["name"] == "mixed-precision")["notes"]
    assert notes["counts"]["4"] == 0


def test_recipe_errors_are_clear():
    with pytest.raises(BadInputError, match="one budget"):
        recipe_from_dict({"base": "w4a16", "mixed_precision": {"avg_bits": 5,
                                                               "max_ppl_increase": 0.1}})
    with pytest.raises(BadInputError, match="starts from 4-bit"):
        recipe_from_dict({"base": "w8a8", "mixed_precision": {"avg_bits": 9}})
    with pytest.raises(BadInputError, match="did you mean"):
        recipe_from_dict({"base": "w4a16", "mixed_precision": {"avg_bit": 5}})
