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
            dynamic_shapes: Any = None, kv_cache: bool = False) -> ir.Model:
    """Turn ``source`` into an ``ir.Model``.

    ``source``: an ``ir.Model``, an ``onnx.ModelProto``, a path to an ``.onnx`` / ``.gguf`` file or
    to a Hugging Face model directory, a Hugging Face causal LM object (exported as
    ``input_ids -> logits``), or a ``torch.nn.Module`` (then ``example_inputs`` is needed).
    ``kv_cache=True`` exports HF / GGUF causal LMs with a KV cache (see :mod:`lbcc.kvcache`);
    an ONNX source must then already have one.
    """
    if kv_cache:
        model = _capture_with_cache(source)
        _require_kv_cache(model, source)
        return model
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


def _capture_with_cache(source: Any) -> ir.Model:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir() and (path / "config.json").is_file():
            return export_causal_lm(load_hf_causal_lm(path), kv_cache=True)
        if path.suffix.lower() == ".gguf" and path.is_file():
            return export_causal_lm(load_hf_causal_lm(path.parent, gguf_file=path.name),
                                    kv_cache=True)
        return capture(source)
    if not isinstance(source, (ir.Model, onnx.ModelProto)) and _is_hf_causal_lm(source):
        return export_causal_lm(source, kv_cache=True)
    return capture(source)


def _require_kv_cache(model: ir.Model, source: Any) -> None:
    from lbcc.kvcache import kv_layout

    if kv_layout(model) is None:
        what = str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
        raise BadInputError(
            f"{what!r} has no KV cache (no past_key_values.N.key/value inputs), and lbcc can add "
            "one only when it exports the model itself.",
            "Pass the Hugging Face model directory (or .gguf file) instead of a cache-free ONNX "
            "file, or drop --kv-cache.")


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


def export_causal_lm(model: Any, kv_cache: bool = False) -> ir.Model:
    """Export a HF causal LM as ``input_ids[batch, seq] -> logits`` with dynamic batch and seq;
    with ``kv_cache``, as the prefill + decode graph of :mod:`lbcc.kvcache`."""
    torch = _require_torch()
    model = model.eval()
    if kv_cache:
        return _export_causal_lm_with_cache(model)
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


def _causal_lm_cache_wrapper(model: Any, num_layers: int) -> Any:
    torch = _require_torch()
    from transformers import DynamicCache

    attr = WRAPPER_PREFIX.rstrip(".")

    class CausalLMWithCache(torch.nn.Module):
        """(input_ids, attention_mask, position_ids, [k0, v0, k1, ...]) -> (logits, k0', v0', ...)
        where ``k_i' = concat(k_i, new keys, axis=2)``: one graph for prefill and decode.

        Every layer keeps its whole past, sliding-window layers too: the cache is built without
        the model's config, which would make those layers' caches keep only the last window
        (transformers' sliding layers), so that the layers' past lengths would differ and the
        presents no longer extend the pasts. The window stays in the attention mask."""

        def __init__(self, lm: Any):
            super().__init__()
            setattr(self, attr, lm)

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any,
                    past: list) -> tuple:
            lm = getattr(self, attr)
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1])
                                                 for i in range(num_layers)])
            out = lm(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return CausalLMWithCache(model)


def _export_causal_lm_with_cache(model: Any) -> ir.Model:
    """Export with ``past_key_values.N.key/value`` inputs and ``present.N.key/value`` outputs.

    Dims: batch, seq (new tokens), past_seq (cached tokens, 0 at prefill), total_seq (the
    attention mask's length, past_seq + seq). The example uses past 3, seq 5 so that no dim is
    specialized to 0 or 1; the graph itself runs with past 0 (prefill) and seq 1 (decode).
    """
    torch = _require_torch()
    from lbcc.kvcache import MAX_POSITIONS_KEY, past_name, present_name

    config = model.config.get_text_config(decoder=True)
    n_layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    batch, seq, past_len = 2, 5, 3
    vocab = min(100, config.vocab_size)
    ids = torch.randint(0, vocab, (batch, seq), dtype=torch.int64)
    mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    pos = torch.arange(past_len, past_len + seq, dtype=torch.int64)[None].expand(batch, seq)
    past = [torch.zeros(batch, kv_heads, past_len, head_dim) for _ in range(2 * n_layers)]
    b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
    p, t = torch.export.Dim("past_seq"), torch.export.Dim("total_seq")
    dynamic = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: t},
               "position_ids": {0: b, 1: s}, "past": [{0: b, 2: p}] * (2 * n_layers)}
    kinds = [(i, kv) for i in range(n_layers) for kv in ("key", "value")]
    graph = from_torch(_causal_lm_cache_wrapper(model, n_layers),
                       (ids, mask, pos.contiguous(), past), dynamic_shapes=dynamic,
                       input_names=["input_ids", "attention_mask", "position_ids",
                                    *(past_name(i, kv) for i, kv in kinds)],
                       output_names=["logits", *(present_name(i, kv) for i, kv in kinds)])
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and context > 0:  # the rotary caches' length (fuse-ort)
        graph.metadata_props[MAX_POSITIONS_KEY] = str(context)
    return graph
