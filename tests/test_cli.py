"""The ``lbcc`` command: exit codes, one-paragraph errors, no output on failure, passes, inspect."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import models as M
from conftest import make_text
from lbcc.cli import app

runner = CliRunner()


def lbcc_cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, code: int, *needles: str, out_dir: Path | None = None,
                         before: list[str] | None = None) -> str:
    """Exit ``code``, an ``error:`` paragraph on stderr naming ``needles``, no traceback, and
    (if given) ``out_dir`` holding exactly what it held ``before``."""
    text = result.stderr
    assert result.exit_code == code, (result.exit_code, text, result.stdout)
    assert "Traceback" not in text + result.stdout
    assert "internal error" not in text
    assert text.lstrip().startswith("error:"), text
    assert "\n\n" not in text.strip(), "one paragraph, no blank lines"
    assert len(text.strip().splitlines()) <= 4, text
    for needle in needles:
        assert needle.lower() in text.lower(), (needle, text)
    if out_dir is not None:
        assert sorted(p.name for p in out_dir.iterdir()) == (before or [])
    return text


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def _compile_args(model, out_dir: Path, *extra: str) -> list[str]:
    return ["compile", str(model), "-o", str(out_dir / "q.onnx"), "-q", *extra]


# ----------------------------------------------------------------------------- success

def test_compile_w8a8_with_npz_and_report(mlp_path, mlp_calib, out_dir):
    r = lbcc_cli(*_compile_args(mlp_path, out_dir, "--preset", "w8a8", "--calib", mlp_calib,
                                "--report", out_dir / "report.json"))
    assert r.exit_code == 0, r.stderr
    assert "wrote" in r.stdout
    assert sorted(p.name for p in out_dir.iterdir()) == ["q.onnx", "report.json"]
    report = json.loads((out_dir / "report.json").read_text())
    assert report["schema_version"] >= 1 and report["recipe"]["name"] == "w8a8"
    assert report["command"][0] == "lbcc"
    got = M.run_ort(out_dir / "q.onnx", {"x": M.mlp_inputs(samples=1)})[0]
    ref = M.run_ort(mlp_path, {"x": M.mlp_inputs(samples=1)})[0]
    assert M.rel_err(ref, got) < 0.05


def test_compile_w4a16_prints_table(mlp_path, out_dir):
    r = lbcc_cli("compile", mlp_path, "-o", out_dir / "q.onnx", "--preset", "w4a16",
                 "--group-size", "16")
    assert r.exit_code == 0, r.stderr
    assert "fc1" in r.stderr and "fc2" in r.stderr  # the per-layer table
    assert (out_dir / "q.onnx").is_file()


def test_compile_text_calibration(models_dir, out_dir, tokenizer_json, tmp_path):
    text = make_text(tmp_path / "cal.txt", 2000)
    recipe = tmp_path / "r.toml"
    recipe.write_text('base = "w8a8"\n[calibration]\nseq_len = 64\nsamples = 4\n')
    r = lbcc_cli(*_compile_args(models_dir / "tied_dyn.onnx", out_dir, "--recipe", recipe,
                                "--calib", text, "--tokenizer", tokenizer_json))
    assert r.exit_code == 0, r.stderr
    assert (out_dir / "q.onnx").is_file()


def test_passes_lists_the_pipeline():
    r = lbcc_cli("passes", "--preset", "w8a8")
    assert r.exit_code == 0, r.stderr
    for name in ("capture-normalize", "calibrate", "select-precision", "round-weights-rtn",
                 "insert-qdq", "lower-ort", "verify"):
        assert name in r.stdout
    lines = [l for l in r.stdout.splitlines() if l.strip()[:3].strip().rstrip(".").isdigit()]
    assert lines[0].split()[1] == "capture-normalize" and lines[-1].split()[1] == "verify"
    r4 = lbcc_cli("passes", "--preset", "w4a16")
    assert r4.exit_code == 0 and "calibrate" not in r4.stdout and "insert-qdq" not in r4.stdout


def test_passes_with_bad_preset_and_recipe(tmp_path):
    assert_clean_failure(lbcc_cli("passes", "--preset", "w3a3"), 1, "w3a3", "w8a8")
    recipe = tmp_path / "r.toml"
    recipe.write_text('base = "w4a16"\n[weights]\nbits = 3\n')
    assert_clean_failure(lbcc_cli("passes", "--recipe", recipe), 2, "3-bit")


def test_inspect(tied_path):
    r = lbcc_cli("inspect", tied_path)
    assert r.exit_code == 0, r.stderr
    assert "MatMul" in r.stdout and "Gather" in r.stdout
    assert "4 float weight sites" in r.stdout
    rj = lbcc_cli("inspect", tied_path, "--json")
    assert rj.exit_code == 0
    info = json.loads(rj.stdout)
    assert info["ops"]["MatMul"] == 3 and info["ops"]["Gather"] == 1
    kinds = sorted(s["kind"] for s in info["float_weight_sites"])
    assert kinds == ["gather", "matmul", "matmul", "matmul-transposed"]
    assert info["opset"][""] == 18


def test_inspect_bad_file(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"junk" * 10)
    assert_clean_failure(lbcc_cli("inspect", tmp_path / "x.onnx"), 1, "not a readable ONNX")
    assert_clean_failure(lbcc_cli("inspect", tmp_path / "none.onnx"), 1, "does not exist")


# ----------------------------------------------------------------------------- bad inputs

def test_missing_model(tmp_path, out_dir):
    r = lbcc_cli(*_compile_args(tmp_path / "missing.onnx", out_dir, "--preset", "w4a16"))
    assert_clean_failure(r, 1, "missing.onnx", "does not exist", out_dir=out_dir)


def test_truncated_model(tmp_path, out_dir):
    data = M.mlp_model().SerializeToString()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 3])
    r = lbcc_cli(*_compile_args(tmp_path / "t.onnx", out_dir, "--preset", "w4a16"))
    assert_clean_failure(r, 1, "t.onnx", out_dir=out_dir)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n not a model" * 20, b"hello world\n"])
def test_not_an_onnx_model(tmp_path, out_dir, content):
    (tmp_path / "m.onnx").write_bytes(content)
    r = lbcc_cli(*_compile_args(tmp_path / "m.onnx", out_dir, "--preset", "w4a16"))
    assert_clean_failure(r, 1, "not a readable ONNX model", out_dir=out_dir)


def test_empty_model_file(tmp_path, out_dir):
    (tmp_path / "m.onnx").write_bytes(b"")
    r = lbcc_cli(*_compile_args(tmp_path / "m.onnx", out_dir, "--preset", "w4a16"))
    assert_clean_failure(r, 1, "empty", out_dir=out_dir)


def test_missing_external_data(tmp_path, out_dir):
    M.save(M.mlp_model(), tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    r = lbcc_cli(*_compile_args(tmp_path / "m.onnx", out_dir, "--preset", "w4a16"))
    assert_clean_failure(r, 1, "m.onnx.data", "missing", out_dir=out_dir)


def test_unsupported_opset(tmp_path, out_dir):
    M.save(M.with_opset(M.mlp_model(), 9), tmp_path / "m.onnx")
    r = lbcc_cli(*_compile_args(tmp_path / "m.onnx", out_dir, "--preset", "w4a16"))
    assert_clean_failure(r, 1, "opset 9", out_dir=out_dir)


def test_nothing_to_quantize(models_dir, out_dir):
    r = lbcc_cli(*_compile_args(models_dir / "relu_add.onnx", out_dir, "--preset", "w8a8-dynamic"))
    assert_clean_failure(r, 1, "nothing to quantize", out_dir=out_dir)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights(tmp_path, out_dir, value):
    M.save(M.with_nonfinite(M.mlp_model(), "w2", value), tmp_path / "m.onnx")
    r = lbcc_cli(*_compile_args(tmp_path / "m.onnx", out_dir, "--preset", "w8a8-dynamic"))
    assert_clean_failure(r, 1, "'w2'", "NaN", out_dir=out_dir)


def test_empty_calibration_text(models_dir, out_dir, tokenizer_json, tmp_path):
    (tmp_path / "cal.txt").write_text("\n  \n", encoding="utf-8")
    r = lbcc_cli(*_compile_args(models_dir / "tied_dyn.onnx", out_dir, "--preset", "w8a8",
                                "--calib", tmp_path / "cal.txt", "--tokenizer", tokenizer_json))
    assert_clean_failure(r, 1, "cal.txt", "empty", out_dir=out_dir)


def test_too_short_calibration_text(models_dir, out_dir, tokenizer_json, tmp_path):
    text = make_text(tmp_path / "cal.txt", 10)
    r = lbcc_cli(*_compile_args(models_dir / "tied_dyn.onnx", out_dir, "--preset", "w8a8",
                                "--calib", text, "--tokenizer", tokenizer_json))
    assert_clean_failure(r, 1, "only 10 tokens", out_dir=out_dir)


def test_missing_calibration_text(models_dir, out_dir, tokenizer_json, tmp_path):
    r = lbcc_cli(*_compile_args(models_dir / "tied_dyn.onnx", out_dir, "--preset", "w8a8",
                                "--calib", tmp_path / "nope.txt", "--tokenizer", tokenizer_json))
    assert_clean_failure(r, 1, "nope.txt", "does not exist", out_dir=out_dir)


def test_calibration_text_without_tokenizer(models_dir, out_dir, calib_text):
    r = lbcc_cli(*_compile_args(models_dir / "tied_dyn.onnx", out_dir, "--preset", "w8a8",
                                "--calib", calib_text))
    assert_clean_failure(r, 1, "--tokenizer", out_dir=out_dir)


@pytest.mark.parametrize("preset,why,instead", [
    ("w8a8", "static activation ranges", "w8a8-dynamic"),
    ("auto", "static activation ranges, GPTQ's Hessians and SmoothQuant's scales",
     "w8a8-dynamic"),
    ("w4a16-e4-gptq", "GPTQ's Hessians", "w4a16 or w4a16-e4"),
    ("w4a16-e4-gptq-g64", "GPTQ's Hessians", "w4a16 or w4a16-e4"),
    ("w4a16-awq", "AWQ's scales", "w4a16 or w4a16-e4"),
    ("w4a16-mixed", "measured layer sensitivities", "w4a16 or w4a16-e4"),
])
def test_preset_without_calibration(mlp_path, out_dir, preset, why, instead):
    """The error says what the preset computes from calibration data, and which preset of the
    same kind needs none."""
    r = lbcc_cli(*_compile_args(mlp_path, out_dir, "--preset", preset))
    assert_clean_failure(r, 1, "calibration", why, f"--preset {instead}", out_dir=out_dir)


def test_tokenizer_larger_than_model_vocab(models_dir, out_dir, big_tokenizer_json, tmp_path):
    text = make_text(tmp_path / "cal.txt", 2000, n_words=300)
    recipe = tmp_path / "r.toml"
    recipe.write_text('base = "w8a8"\n[calibration]\nseq_len = 64\n')
    r = lbcc_cli(*_compile_args(models_dir / "tied_dyn.onnx", out_dir, "--recipe", recipe,
                                "--calib", text, "--tokenizer", big_tokenizer_json))
    assert_clean_failure(r, 1, "301 tokens", "256", out_dir=out_dir)


def test_unknown_preset(mlp_path, out_dir):
    r = lbcc_cli(*_compile_args(mlp_path, out_dir, "--preset", "w4a4"))
    assert_clean_failure(r, 1, "w4a4", "w4a16", out_dir=out_dir)


def test_unknown_target(mlp_path, out_dir):
    r = lbcc_cli(*_compile_args(mlp_path, out_dir, "--preset", "w4a16", "--target", "gpu"))
    assert_clean_failure(r, 1, "gpu", "ort-int8", out_dir=out_dir)


def test_unknown_stop_after(mlp_path, out_dir):
    r = lbcc_cli(*_compile_args(mlp_path, out_dir, "--preset", "w4a16", "--group-size", "16",
                                "--stop-after", "lower-orts"))
    assert_clean_failure(r, 1, "lower-orts", "lower-ort", out_dir=out_dir)


def test_group_size_with_8bit_preset(mlp_path, out_dir):
    r = lbcc_cli(*_compile_args(mlp_path, out_dir, "--preset", "w8a8-dynamic", "--group-size",
                                "32"))
    assert_clean_failure(r, 1, "--group-size", out_dir=out_dir)


def test_recipe_typo(mlp_path, out_dir, tmp_path):
    recipe = tmp_path / "typo.toml"
    recipe.write_text(textwrap.dedent("""
        base = "w4a16"
        [weights]
        bits = 4
        gruop_size = 32
        """))
    r = lbcc_cli(*_compile_args(mlp_path, out_dir, "--recipe", recipe))
    assert_clean_failure(r, 1, "gruop_size", "group_size", out_dir=out_dir)


def test_recipe_asking_3bit_weights(mlp_path, out_dir, tmp_path):
    recipe = tmp_path / "w3.toml"
    recipe.write_text('base = "w4a16"\n[weights]\nbits = 3\n')
    r = lbcc_cli(*_compile_args(mlp_path, out_dir, "--recipe", recipe))
    assert_clean_failure(r, 2, "3-bit", out_dir=out_dir)


def test_recipe_4bit_static(mlp_path, out_dir, tmp_path):
    recipe = tmp_path / "w4a8.toml"
    recipe.write_text('base = "w4a16"\n[activations]\nmode = "static"\n')
    r = lbcc_cli(*_compile_args(mlp_path, out_dir, "--recipe", recipe))
    assert_clean_failure(r, 2, "static", out_dir=out_dir)


def test_output_in_missing_directory(mlp_path, mlp_calib, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "q.onnx"
    r = lbcc_cli("compile", mlp_path, "-o", out, "-q", "--preset", "w8a8", "--calib", mlp_calib)
    assert_clean_failure(r, 1, "does not exist")
    assert not (tmp_path / "no").exists()


def test_output_is_a_directory(mlp_path, mlp_calib, out_dir):
    (out_dir / "q.onnx").mkdir()
    r = lbcc_cli(*_compile_args(mlp_path, out_dir, "--preset", "w8a8", "--calib", mlp_calib))
    assert_clean_failure(r, 1, "directory", out_dir=out_dir, before=["q.onnx"])


def test_report_in_missing_directory(mlp_path, mlp_calib, out_dir, tmp_path):
    r = lbcc_cli(*_compile_args(mlp_path, out_dir, "--preset", "w8a8", "--calib", mlp_calib,
                                "--report", tmp_path / "nope" / "r.json"))
    assert_clean_failure(r, 1, "report", out_dir=out_dir)


def test_debug_flag_shows_the_traceback(tmp_path, out_dir):
    r = runner.invoke(app, ["--debug", *_compile_args(tmp_path / "missing.onnx", out_dir)])
    assert r.exit_code != 0
    from lbcc.errors import BadInputError

    assert isinstance(r.exception, BadInputError)


# ----------------------------------------------------------------------------- as a process

def test_python_m_lbcc_process(tmp_path):
    """The real entry point: exit code 1 and a clean message on stderr, nothing on stdout."""
    out = tmp_path / "q.onnx"
    proc = subprocess.run([sys.executable, "-m", "lbcc", "compile", str(tmp_path / "m.onnx"),
                           "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr
    assert proc.stdout == "" and not out.exists()
    help_ = subprocess.run([sys.executable, "-m", "lbcc", "--help"], capture_output=True,
                           text=True, timeout=120)
    assert help_.returncode == 0
    for cmd in ("compile", "eval", "passes", "inspect"):
        assert cmd in help_.stdout
