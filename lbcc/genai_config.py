"""``genai_config.json`` beside a KV-cache model, so that onnxruntime-genai can load lbcc's output.

onnxruntime-genai reads a model directory: the ONNX decoder, ``genai_config.json`` (names of the
graph's inputs / outputs, shapes of the cache, special tokens, search defaults) and the tokenizer
files. lbcc's KV-cache graph (:mod:`lbcc.kvcache`) already uses its input / output names.
``past_present_share_buffer`` is true when every ``present`` is a ``GroupQueryAttention`` output
(a fused graph: the kernel writes into a fixed-size buffer in place, as genai's own models do),
false when the cache grows by concatenation (``present`` = ``past`` + new).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lbcc.errors import BadInputError
from lbcc.kvcache import KVLayout

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def genai_config(layout: KVLayout, hf_config: dict[str, Any], filename: str,
                 share_buffer: bool = False) -> dict[str, Any]:
    """The config dict for a model file ``filename`` with cache ``layout`` and HF ``config.json``;
    ``share_buffer``: the graph can run with past and present in one buffer."""
    heads = hf_config.get("num_attention_heads")
    hidden = hf_config.get("hidden_size")
    if not heads or not hidden:
        raise BadInputError("config.json lacks num_attention_heads / hidden_size.",
                            "Pass the Hugging Face directory the model was exported from.")
    context = int(hf_config.get("max_position_embeddings") or 2048)
    inputs = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key",
              "past_value_names": "past_key_values.%d.value"}
    if layout.has_attention_mask:
        inputs["attention_mask"] = "attention_mask"
    if layout.has_position_ids:
        inputs["position_ids"] = "position_ids"

    def token(name: str) -> Any:  # genai needs numbers: fall back to eos, then 0
        for key in (name, "eos_token_id"):
            if hf_config.get(key) is not None:
                return hf_config[key]
        return 0

    return {
        "model": {
            "bos_token_id": token("bos_token_id"), "eos_token_id": token("eos_token_id"),
            "pad_token_id": token("pad_token_id"), "context_length": context,
            "type": hf_config.get("model_type", "llama"),
            "vocab_size": hf_config.get("vocab_size"),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename, "head_size": layout.head_dim, "hidden_size": hidden,
                "num_attention_heads": heads, "num_hidden_layers": layout.num_layers,
                "num_key_value_heads": layout.kv_heads, "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": share_buffer,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                   "early_stopping": True, "length_penalty": 1.0, "diversity_penalty": 0.0,
                   "no_repeat_ngram_size": 0},
    }


def write_genai_config(model_path: str | Path, hf_dir: str | Path) -> Path:
    """Write ``genai_config.json`` (atomically) and copy the tokenizer files beside the model."""
    from lbcc.kvcache import kv_layout, presents_from_gqa
    from lbcc.modelio import load_model

    model_path, hf_dir = Path(model_path), Path(hf_dir)
    model = load_model(model_path)
    layout = kv_layout(model)
    if layout is None:
        raise BadInputError(f"{str(model_path)!r} has no KV cache; onnxruntime-genai needs one.",
                            "Compile with --kv-cache.")
    try:
        hf_config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot read {str(hf_dir / 'config.json')!r}: {exc}",
                            "Pass the Hugging Face model directory.") from None
    cfg = genai_config(layout, hf_config, model_path.name, share_buffer=presents_from_gqa(model))
    out = model_path.parent / "genai_config.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg, indent=4))
    tmp.replace(out)
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file() and not (model_path.parent / name).exists():
            shutil.copyfile(hf_dir / name, model_path.parent / name)
    return out
