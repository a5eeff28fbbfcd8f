"""``lbcc view``: the layer graph (precision per layer, measured error), HTML / SVG / DOT; the
page renders in headless Chromium, offline, and shows the layers."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import lbcc
import models as M
from lbcc import debug
from lbcc.cli import app
from lbcc.view import COLORS, build_view, layer_graph

runner = CliRunner()


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def compiled(tmp_path, mlp_calib):
    """mlp compiled w8a8 (+ report) and its comparison JSON."""
    result = lbcc.compile(M.mlp_model(), preset="w8a8", calibration=mlp_calib, progress=False)
    q = tmp_path / "q.onnx"
    result.save(q, report_path=tmp_path / "r.json")
    cmp = debug.compare(M.mlp_model(), result.model, mlp_calib)
    (tmp_path / "c.json").write_text(json.dumps(cmp.to_json()))
    return q, tmp_path / "r.json", tmp_path / "c.json", result


def by_name(view):
    return {layer["name"]: layer for layer in view["layers"]}


def test_precision_per_layer():
    mlp = lbcc.compile(M.mlp_model(), preset="w8a8", calibration=_npz(), progress=False)
    layers = by_name(layer_graph(mlp.model))
    assert layers["fc1"]["precision"] == layers["fc2"]["precision"] == "int8 static"
    assert layers["input:x"]["precision"] == "input/output"
    tied = lbcc.compile(M.tied_lm_model(dim=64), preset="w4a16", group_size=16, progress=False)
    layers = by_name(layer_graph(tied.model))
    assert layers["up_proj"]["precision"] == layers["down_proj"]["precision"] == "int4"
    assert layers["lm_head"]["precision"] in ("int8 block", "int8 weights")  # 8-bit lm_head rule
    assert layers["embed"]["precision"] in ("int8 weights", "int4 weights")
    floaty = by_name(layer_graph(lbcc.debug.normalize(M.mlp_model())))
    assert floaty["fc1"]["precision"] == "float" and floaty["relu"]["precision"] == "no weights"


def _npz():
    import tempfile

    path = Path(tempfile.mkdtemp()) / "c.npz"
    np.savez(path, x=M.mlp_inputs())
    return path


def test_view_merges_report_and_compare(compiled):
    q, report, cmp, result = compiled
    from lbcc.view import view

    v = view(q, report=report, compare=cmp)
    layers = by_name(v)
    assert layers["fc1"]["sqnr_source"] == "measured"
    assert layers["fc1"]["sqnr_db"] == json.loads(cmp.read_text())["layers"][
        [r["layer"] for r in json.loads(cmp.read_text())["layers"]].index("fc1")]["sqnr_db"]
    assert layers["fc1"]["report"][0]["status"] == "quantized"
    edges = {(v["layers"][a]["name"], v["layers"][b]["name"]) for a, b in v["edges"]}
    assert ("fc1", "relu") in edges and ("fc2", "output:y") in edges
    ranks = {layer["name"]: pos[0] for layer, pos in zip(v["layers"], v["positions"])}
    assert ranks["input:x"] < ranks["fc1"] < ranks["fc2"] < ranks["output:y"]
    # a report alone gives a chain of its layers with the report's precision
    only = by_name(view(report))
    assert only["fc1"]["precision"] == "int8 static" and "sqnr_db" in only["fc1"]  # estimate


def test_dot_and_svg(compiled, tmp_path):
    q, report, cmp, _ = compiled
    res = cli("view", q, "--report", report, "--compare", cmp, "--dot", tmp_path / "v.dot",
              "--svg", tmp_path / "v.svg")
    assert res.exit_code == 0, res.stderr
    dot = (tmp_path / "v.dot").read_text()
    assert dot.startswith("digraph lbcc {") and '"fc1\\nint8 static\\nSQNR' in dot
    assert dot.count("->") == len(build_view(lbcc.capture(q))["edges"])
    svg = (tmp_path / "v.svg").read_text()
    assert svg.startswith("<svg") and svg.count('class="layer"') == dot.count("[label=")
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg", str(tmp_path / "v.dot")], check=True,
                       capture_output=True)


def test_view_errors(tmp_path):
    res = cli("view", tmp_path / "missing.json", "-o", tmp_path / "v.html")
    assert res.exit_code == 1 and "does not exist" in res.stderr
    res = cli("view", tmp_path / "missing.onnx")
    assert res.exit_code == 1 and "nothing to write" in res.stderr


def test_html_is_self_contained(compiled, tmp_path):
    q, report, cmp, _ = compiled
    assert cli("view", q, "--report", report, "--compare", cmp, "-o",
               tmp_path / "v.html").exit_code == 0
    page = (tmp_path / "v.html").read_text()
    # no resource from the network: no src/href/url()/@import pointing anywhere
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "url(" not in page and "@import" not in page and "<link" not in page
    assert "fc1" in page and "fc2" in page


# ----------------------------------------------------------------------------- headless Chromium

def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                       "google-chrome")) if p), None)


def chromium_run(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        if os.environ.get("LBCC_REQUIRE_CHROMIUM"):
            pytest.fail("LBCC_REQUIRE_CHROMIUM is set but no chromium is on PATH")
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    return subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900", *args,
         page.as_uri()], capture_output=True, text=True, timeout=120)


def read_png(path: Path) -> np.ndarray:
    """Pixels [H, W, C] of an 8-bit, non-interlaced RGB / RGBA PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    ch = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * ch
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        cur = np.zeros(stride, dtype=np.int32)
        if f in (0, 2):
            cur = (line + (prev if f == 2 else 0)) & 255
        else:  # Sub, Average, Paeth depend on the pixel to the left: byte by byte
            for i in range(stride):
                a = cur[i - ch] if i >= ch else 0
                b = prev[i]
                c = prev[i - ch] if i >= ch else 0
                if f == 1:
                    pred = a
                elif f == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (line[i] + pred) & 255
        out[y] = cur
        prev = cur
    return out.reshape(height, width, ch)[..., :3]


def pixels_of(img: np.ndarray, hex_color: str, tol: int = 12) -> int:
    rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img.astype(np.int32) - rgb).max(axis=-1) <= tol).sum())


def test_html_renders_in_headless_chromium(compiled, tmp_path):
    q, report, cmp, _ = compiled
    page = tmp_path / "v.html"
    assert cli("view", q, "--report", report, "--compare", cmp, "-o", page).exit_code == 0
    dom = chromium_run(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    n_layers = len(build_view(lbcc.capture(q))["layers"])
    # the page's script ran (it parsed the embedded data and marked the body)
    assert f'data-layers="{n_layers}"' in dom.stdout
    assert dom.stdout.count('class="layer"') == n_layers
    shot = tmp_path / "shot.png"
    res = chromium_run(page, tmp_path, f"--screenshot={shot}")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = read_png(shot)
    assert img.shape[0] >= 800 and img.shape[1] >= 1000
    # the int8 layers' boxes and bars are drawn in their color, the float ops' boxes in theirs
    assert pixels_of(img, COLORS["int8 static"]) > 2000
    assert pixels_of(img, COLORS["no weights"]) > 2000
