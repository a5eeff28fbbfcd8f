"""examples/export_pipeline.py: lbcc as an export-pipeline step (artefacts, report, manifest with
hashes, versions and command; exit 3 when the gate is missed, artefacts still written)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_text
from test_debug_cli import soft_lm

SCRIPT = REPO / "examples" / "export_pipeline.py"


def run_script(tmp_path: Path, tok: Path, max_increase: str, *extra: str):
    model = soft_lm(tmp_path / "lm.onnx")
    calib = make_text(tmp_path / "calib.txt", 2000, seed=0)
    evalt = make_text(tmp_path / "eval.txt", 2000, seed=1)
    out = tmp_path / "artefacts"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(model), "--out", str(out), "--preset", "w4a16",
         "--group-size", "16", "--calib", str(calib), "--tokenizer", str(tok),
         "--eval-text", str(evalt),
         "--eval-tokens", "1024", "--eval-seq-len", "64", "--max-ppl-increase", max_increase,
         *extra], capture_output=True, text=True, timeout=600)
    return proc, out


def check_manifest(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert "export_pipeline.py" in " ".join(manifest["command"])
    assert "lbcc" in manifest["versions"] and "onnxruntime" in manifest["versions"]
    names = {a["path"] for a in manifest["artefacts"]}
    assert {"model.float.onnx", "model.onnx", "report.json"} <= names
    for art in manifest["artefacts"]:
        data = (out / art["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == art["sha256"] and len(data) == art["bytes"]
    assert manifest["inputs"]["model"]["sha256"]
    return manifest


@pytest.mark.parametrize("extra", [(), ("--auto-fallback",)])
def test_export_pipeline_passes(tmp_path, tokenizer_json, extra):
    proc, out = run_script(tmp_path, tokenizer_json, "0.0012" if extra else "0.05", *extra)
    assert proc.returncode == 0, proc.stderr
    manifest = check_manifest(out)
    assert manifest["status"] == "passed" and manifest["accuracy_gate"]["passed"]
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy_gate"] == json.loads(json.dumps(manifest["accuracy_gate"]))
    if extra:
        assert manifest["accuracy_gate"]["auto_fallback"]["layers"]


def test_export_pipeline_gate_missed(tmp_path, tokenizer_json):
    proc, out = run_script(tmp_path, tokenizer_json, "0.0012")
    assert proc.returncode == 3, proc.stderr
    assert "MISSED" in proc.stderr
    manifest = check_manifest(out)
    assert manifest["status"] == "gate-missed"
