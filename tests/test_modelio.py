"""lbcc.modelio: clear load errors, atomic saves, external data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import models as M
from lbcc.errors import BadInputError
from lbcc.modelio import check_opset, load_model, save_model


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ----------------------------------------------------------------------------- load

def test_load_roundtrip(tmp_path):
    path = M.save(M.mlp_model(), tmp_path / "m.onnx")
    model = load_model(path)
    assert isinstance(model, ir.Model)
    np.testing.assert_array_equal(model.graph.initializers["w1"].const_value.numpy(),
                                  onnx.numpy_helper.to_array(M.mlp_model().graph.initializer[0]))


def test_load_with_external_data(tmp_path):
    path = M.save(M.mlp_model(), tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").is_file()
    model = load_model(path)
    assert model.graph.initializers["w2"].const_value.numpy().shape == (96, 48)


def test_load_missing_file(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")


def test_load_directory(tmp_path):
    with pytest.raises(BadInputError, match="directory"):
        load_model(tmp_path)


def test_load_empty_file(tmp_path):
    (tmp_path / "e.onnx").write_bytes(b"")
    with pytest.raises(BadInputError, match="empty"):
        load_model(tmp_path / "e.onnx")


@pytest.mark.parametrize("content", [
    b"\x00\xff garbage bytes that are not a protobuf \xde\xad\xbe\xef" * 10,
    b"PK\x03\x04 a zip file, not onnx",
    "ir_version: 8 (a text file)\n".encode(),
])
def test_load_garbage(tmp_path, content):
    (tmp_path / "g.onnx").write_bytes(content)
    with pytest.raises(BadInputError, match="not a readable ONNX model"):
        load_model(tmp_path / "g.onnx")


def test_load_truncated(tmp_path):
    data = M.mlp_model().SerializeToString()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError) as exc:
        load_model(tmp_path / "t.onnx")
    assert "t.onnx" in exc.value.message


def test_load_missing_external_data(tmp_path):
    path = M.save(M.mlp_model(), tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(BadInputError) as exc:
        load_model(path)
    assert "m.onnx.data" in exc.value.message and "missing" in exc.value.message


def test_load_truncated_external_data(tmp_path):
    path = M.save(M.mlp_model(), tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(BadInputError, match="truncated"):
        load_model(path)


@pytest.mark.parametrize("opset", [7, 12, 99])
def test_load_unsupported_opset(tmp_path, opset):
    path = M.save(M.with_opset(M.mlp_model(), opset), tmp_path / "m.onnx")
    with pytest.raises(BadInputError) as exc:
        load_model(path)
    assert f"opset {opset}" in exc.value.message
    assert "convert" in exc.value.hint.lower()


def test_check_opset_no_default_domain():
    model = ir.from_proto(M.mlp_model())
    model.opset_imports.pop("")
    with pytest.raises(BadInputError, match="no default-domain opset"):
        check_opset(model, "m")


@pytest.mark.parametrize("opset", [13, 17, 21])
def test_supported_opsets_load(tmp_path, opset):
    load_model(M.save(M.mlp_model(opset=opset), tmp_path / "m.onnx"))


# ----------------------------------------------------------------------------- save

def test_save_single_file_and_external(tmp_path):
    model = ir.from_proto(M.mlp_model())
    p = save_model(model, tmp_path / "a.onnx")
    assert p == tmp_path / "a.onnx" and _files(tmp_path) == ["a.onnx"]
    save_model(model, tmp_path / "b.onnx", external_data=True)
    assert _files(tmp_path) == ["a.onnx", "b.onnx", "b.onnx.data"]
    ref = M.run_ort(M.mlp_model(), {"x": M.mlp_inputs(samples=1)})[0]
    for name in ("a.onnx", "b.onnx"):
        np.testing.assert_allclose(M.run_ort(tmp_path / name, {"x": M.mlp_inputs(samples=1)})[0],
                                   ref, rtol=1e-6)


def test_save_after_load_from_external_data_as_single_file(tmp_path):
    """A model loaded from external data and saved as one file must not point at the old data."""
    src = tmp_path / "src"
    src.mkdir()
    M.save(M.mlp_model(), src / "m.onnx", external_data=True)
    out = tmp_path / "out"
    out.mkdir()
    save_model(load_model(src / "m.onnx"), out / "m.onnx", external_data=False)
    assert _files(out) == ["m.onnx"]
    for f in src.iterdir():
        f.unlink()
    src.rmdir()
    M.run_ort(out / "m.onnx", {"x": M.mlp_inputs(samples=1)})


def test_save_into_missing_directory_leaves_nothing(tmp_path):
    model = ir.from_proto(M.mlp_model())
    with pytest.raises(BadInputError, match="does not exist"):
        save_model(model, tmp_path / "no" / "such" / "m.onnx")
    assert _files(tmp_path) == []


def test_save_onto_a_directory(tmp_path):
    (tmp_path / "m.onnx").mkdir()
    with pytest.raises(BadInputError, match="is a directory"):
        save_model(ir.from_proto(M.mlp_model()), tmp_path / "m.onnx")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root can write into read-only directories")
def test_save_into_unwritable_directory_leaves_nothing(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(BadInputError, match="not writable"):
            save_model(ir.from_proto(M.mlp_model()), d / "m.onnx")
        assert _files(d) == []
    finally:
        d.chmod(0o700)


def test_save_when_access_check_says_unwritable(tmp_path, monkeypatch):
    """The same path as an unwritable directory, also when the tests run as root."""
    import lbcc.modelio

    monkeypatch.setattr(lbcc.modelio.os, "access", lambda path, mode: False)
    with pytest.raises(BadInputError, match="not writable"):
        save_model(ir.from_proto(M.mlp_model()), tmp_path / "m.onnx")
    assert _files(tmp_path) == []


@pytest.mark.parametrize("external", [False, True])
def test_failed_save_is_atomic(tmp_path, monkeypatch, external):
    """A write that dies half way leaves neither a partial file nor temp dirs, and keeps the old
    model at the destination intact."""
    dest = tmp_path / "m.onnx"
    save_model(ir.from_proto(M.relu_add_model()), dest)
    old = dest.read_bytes()
    real_save = ir.save

    def dying_save(model, path, **kwargs):
        Path(path).write_bytes(b"partial")
        if kwargs.get("external_data"):
            (Path(path).parent / kwargs["external_data"]).write_bytes(b"partial data")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", dying_save)
    with pytest.raises((OSError, BadInputError)):
        save_model(ir.from_proto(M.mlp_model()), dest, external_data=external)
    monkeypatch.setattr(ir, "save", real_save)
    assert _files(tmp_path) == ["m.onnx"]
    assert dest.read_bytes() == old
