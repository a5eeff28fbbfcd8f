"""Capture: an ONNX file, a torch module, a Hugging Face causal-LM directory or a GGUF file -> ir.Model.

PyTorch sources go through ``torch.onnx.export(..., dynamo=True)``, whose ``.model`` already is an
``onnx_ir.Model`` (no serialize/parse round trip). A causal LM is wrapped so that the graph is
``input_ids[batch, seq] -> logits[batch, seq, vocab]`` without a KV cache; the wrapper's attribute is
named so that layer names come out as ``model.layers.3.mlp.down_proj``.
Normalization (Gemm -> MatMul, folding, shape inference, layer names) is the ``capture-normalize``
pass, not done here, so that it shows up in the report like every other step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from lbcc.errors import BadInputError
from lbcc.irutils import WRAPPER_PREFIX
from lbcc.modelio import load_model


def _require_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise BadInputError("capturing a PyTorch / Hugging Face / GGUF model needs torch.",
                            "Install lbcc with the torch extra: pip install -e '.[torch]'.") from None
    return torch


def capture(source: Any, example_inputs: tuple | None = None, *,
            dynamic_shapes: Any = None) -> ir.Model:
    """Turn ``source`` into an ``ir.Model``.

    ``source``: an ``ir.Model``, an ``onnx.ModelProto``, a path to an ``.onnx`` / ``.gguf`` file or
    to a Hugging Face model directory, a Hugging Face causal LM object (exported as
    ``input_ids -> logits``), or a ``torch.nn.Module`` (then ``example_inputs`` is needed).
    """
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, onnx.ModelProto):
        return ir.from_proto(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise BadInputError(
                    f"{str(path)!r} is a directory without config.json, so it is not a Hugging "
                    "Face model directory.", "Pass an .onnx file, a .gguf file or a directory "
                    "saved with save_pretrained().")
            return from_hf_dir(path)
        if path.suffix.lower() == ".gguf":
            return from_gguf(path)
        return load_model(path)
    torch = _require_torch()
    if isinstance(source, torch.nn.Module):
        if example_inputs is None and _is_hf_causal_lm(source):
            return export_causal_lm(source)
        if example_inputs is None:
            raise BadInputError("capturing a torch.nn.Module needs example inputs.",
                                "Pass example_inputs=(tensor, ...) matching forward().")
        return from_torch(source, example_inputs, dynamic_shapes=dynamic_shapes)
    raise BadInputError(f"cannot capture a {type(source).__name__}.",
                        "Pass an .onnx path, a HF directory, a .gguf file, a torch.nn.Module "
                        "or an onnx_ir.Model.")


def _is_hf_causal_lm(module: Any) -> bool:
    """A transformers model with a language-modeling head (``AutoModelForCausalLM`` output)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(module, PreTrainedModel) and hasattr(module, "get_output_embeddings") \
        and module.get_output_embeddings() is not None


def from_torch(module: Any, example_inputs: tuple, *, dynamic_shapes: Any = None,
               input_names: list[str] | None = None,
               output_names: list[str] | None = None) -> ir.Model:
    """Export with ``torch.onnx.export(..., dynamo=True)`` and return its ``ir.Model``."""
    torch = _require_torch()
    module = module.eval()
    with torch.no_grad():
        program = torch.onnx.export(module, tuple(example_inputs), dynamo=True,
                                    dynamic_shapes=dynamic_shapes, input_names=input_names,
                                    output_names=output_names, verbose=False)
    return program.model


def _causal_lm_wrapper(model: Any) -> Any:
    torch = _require_torch()
    attr = WRAPPER_PREFIX.rstrip(".")

    class CausalLMLogits(torch.nn.Module):
        """input_ids -> logits, no KV cache."""

        def __init__(self, lm: Any):
            super().__init__()
            setattr(self, attr, lm)

        def forward(self, input_ids: Any) -> Any:
            return getattr(self, attr)(input_ids=input_ids, use_cache=False).logits

    return CausalLMLogits(model)


def export_causal_lm(model: Any) -> ir.Model:
    """Export a HF causal LM as ``input_ids[batch, seq] -> logits`` with dynamic batch and seq."""
    torch = _require_torch()
    model = model.eval()
    model.config.use_cache = False
    wrapper = _causal_lm_wrapper(model)
    example = torch.randint(0, min(100, model.config.vocab_size), (2, 16), dtype=torch.int64)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    return from_torch(wrapper, (example,), dynamic_shapes={"input_ids": dims},
                      input_names=["input_ids"], output_names=["logits"])


def load_hf_causal_lm(path: str | Path, gguf_file: str | None = None) -> Any:
    """Load a HF causal LM in float32 (from a directory, or a GGUF file dequantized on load)."""
    _require_torch()
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(f"cannot load a causal LM from {str(path)!r}: {str(exc)[:300]}",
                            "Check that it is a complete save_pretrained() directory or GGUF "
                            "file of a causal language model.") from None
    # A GGUF load keeps a quantizer marker although the weights are float now.
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def from_hf_dir(path: str | Path) -> ir.Model:
    return export_causal_lm(load_hf_causal_lm(path))


def from_gguf(path: str | Path) -> ir.Model:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"GGUF file {str(path)!r} does not exist.", "Check the path.")
    return export_causal_lm(load_hf_causal_lm(path.parent, gguf_file=path.name))
