"""Load and save ONNX models: clear errors on the way in, atomic writes on the way out.

Loading checks what users get wrong: a missing, truncated or non-ONNX file, external data that is
missing or shorter than the model says, an opset outside what lbcc and ONNX Runtime handle.
Saving writes into a temporary directory beside the destination and renames into place, so a
failed or interrupted compile never leaves a half-written model. Initializers go to external data
(``<name>.data``) when the model is over the 2 GB protobuf limit or when asked.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from lbcc.errors import BadInputError

#: Protobuf cannot serialize more than 2 GiB; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
MIN_OPSET = 13


def _check_external_data(model: ir.Model, path: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            data_path = Path(tensor.base_dir) / tensor.location
            if not data_path.is_file():
                raise BadInputError(
                    f"{path}: initializer {value.name!r} lives in external data file "
                    f"{str(tensor.location)!r}, which is missing (looked in {data_path.parent}).",
                    "Keep the .onnx file and its external data file(s) in the same directory, "
                    "with the names they were saved under.")
            end = (tensor.offset or 0) + (tensor.length or 0)
            if data_path.stat().st_size < end:
                raise BadInputError(
                    f"{path}: external data file {data_path.name!r} is truncated: "
                    f"initializer {value.name!r} needs bytes up to {end:,}, the file has "
                    f"{data_path.stat().st_size:,}.", "Copy the external data file again in full.")


def load_model(path: str | os.PathLike) -> ir.Model:
    """Read an ``.onnx`` file (with external data, any size) into ``onnx_ir``; tensors stay lazy."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"model file {str(path)!r} does not exist.",
                            "Check the path, or pass a Hugging Face directory or a .gguf file.")
    if path.is_dir():
        raise BadInputError(f"{str(path)!r} is a directory, not an ONNX file.",
                            "Pass the .onnx file inside it, or a Hugging Face model directory "
                            "(one with config.json).")
    if path.stat().st_size == 0:
        raise BadInputError(f"model file {str(path)!r} is empty.", "Export or copy it again.")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise BadInputError(
            f"{str(path)!r} is not a readable ONNX model (it is truncated or another format: "
            f"{type(exc).__name__}: {str(exc)[:200]}).",
            "Export the model again with torch.onnx.export(..., dynamo=True), or pass a PyTorch "
            "/ Hugging Face / GGUF source instead.") from None
    _check_external_data(model, path)
    check_opset(model, str(path))
    return model


def check_opset(model: ir.Model, where: str) -> None:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    newest = onnx.defs.onnx_opset_version()
    if opset is None:
        raise BadInputError(f"{where}: the model imports no default-domain opset.",
                            "Re-export it with a standard ONNX exporter.")
    if opset < MIN_OPSET or opset > newest:
        raise BadInputError(
            f"{where}: default-domain opset {opset} is not supported (lbcc handles opsets "
            f"{MIN_OPSET} to {newest}).",
            "Convert it first, e.g. onnx.version_converter.convert_version(model, 21), or "
            "re-export with a current exporter.")


def _materialize_external(model: ir.Model) -> None:
    """Load tensors still backed by the source's external data file, so a single-file save does
    not keep references to a file that is not beside the output."""
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            tensor = ir.tensor(value.const_value.numpy(), name=value.name)
            value.const_value = tensor


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early (before a long compile) if ``path`` cannot be written; returns its directory."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BadInputError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist.",
                            "Create the directory first or choose another output path.")
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"cannot write {str(path)!r}: directory {str(parent)!r} is not writable.",
                            "Choose an output path in a directory you can write to.")
    if path.is_dir():
        raise BadInputError(f"cannot write {str(path)!r}: it is a directory.",
                            "Give a file name ending in .onnx.")
    return parent


def save_model(model: ir.Model, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Atomically write ``model`` to ``path``; returns the path.

    ``external_data``: None decides by size (over ~1.8 GB goes external), True/False forces it.
    The data file is ``<path name>.data`` beside the model.
    """
    path = Path(path)
    parent = check_output_path(path)
    if external_data is None:
        total = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                    if v.const_value is not None)
        external_data = total > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(prefix=".lbcc-tmp-", dir=parent))
    try:
        tmp_model = tmpdir / path.name
        if external_data:
            ir.save(model, tmp_model, external_data=data_name)
            os.replace(tmpdir / data_name, parent / data_name)
        else:
            _materialize_external(model)
            ir.save(model, tmp_model)
        os.replace(tmp_model, path)
    except OSError as exc:
        raise BadInputError(f"cannot write {str(path)!r}: {exc.strerror or exc}.",
                            "Check free disk space and permissions of the output directory."
                            ) from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path
