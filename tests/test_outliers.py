"""detect-outliers: statistics and verdicts; `lbcc inspect --calib`."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

import lbcc
import models as M
from lbcc.calibration import ActivationObserver, NpzFeed
from lbcc.cli import app
from lbcc.passes.outliers import FINE, KEEP, SMOOTHABLE
from test_precision import _outlier_inputs, _outlier_model


def test_kurtosis_matches_numpy():
    x = np.random.default_rng(0).standard_t(df=5, size=(3, 40, 8)).astype(np.float32)
    obs = ActivationObserver()
    for b in x:
        obs.update(b)
    v = x.reshape(-1).astype(np.float64)
    ref = ((v - v.mean()) ** 4).mean() / v.var() ** 2
    assert abs(obs.kurtosis - ref) < 1e-3 * ref


def _report(tmp_path, model, x):
    np.savez(tmp_path / "c.npz", x=x)
    r = lbcc.compile(model, preset="w8a8", calibration=NpzFeed(tmp_path / "c.npz"),
                     progress=False)
    return {row["layer"]: row for row in r.report.data["outliers"]}


def test_verdicts(tmp_path):
    bad = _report(tmp_path, _outlier_model(), _outlier_inputs())["fc1"]
    assert bad["verdict"] in (SMOOTHABLE, KEEP)
    assert bad["top_channels"][0] == 7 and bad["channels_over_20x_median"] == 1
    assert bad["kurtosis"] > 10
    good = _report(tmp_path, M.mlp_model(k=64), M.mlp_inputs(k=64, seq=8, samples=8))["fc1"]
    assert good["verdict"] == FINE and good["channels_over_20x_median"] == 0


def test_inspect_with_calibration(tmp_path):
    model = M.save(_outlier_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=_outlier_inputs())
    res = CliRunner().invoke(app, ["inspect", str(model), "--calib", str(tmp_path / "c.npz"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert {r["layer"] for r in info["outliers"]} == {"fc1", "fc2"}
    res = CliRunner().invoke(app, ["inspect", str(model), "--calib", str(tmp_path / "c.npz")],
                             env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "verdict" in res.output
