"""Shared fixtures: tiny models on disk, calibration data, tokenizers, the torch Llama, the sample.

Every output goes under ``tmp_path`` (or a session temp dir); nothing here touches the network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

# Triton kernels in the tests run on the CPU through Triton's interpreter (CI has no GPU); the
# variable must be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

import models as M  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"


# ----------------------------------------------------------------------------- tiny ONNX models

@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only tiny models saved once per session (tests must not write here)."""
    d = tmp_path_factory.mktemp("models")
    M.save(M.mlp_model(), d / "mlp.onnx")
    M.save(M.mlp_model(k=40, hidden=72), d / "mlp_k40.onnx")
    M.save(M.gemm_model(), d / "gemm.onnx")
    M.save(M.tied_lm_model(), d / "tied.onnx")
    M.save(M.tied_lm_model(dynamic_seq=True), d / "tied_dyn.onnx")
    M.save(M.relu_add_model(), d / "relu_add.onnx")
    np.savez(d / "mlp_calib.npz", x=M.mlp_inputs())
    np.savez(d / "mlp_k40_calib.npz", x=M.mlp_inputs(k=40))
    return d


@pytest.fixture
def mlp_path(models_dir: Path) -> Path:
    return models_dir / "mlp.onnx"


@pytest.fixture
def tied_path(models_dir: Path) -> Path:
    return models_dir / "tied.onnx"


@pytest.fixture
def mlp_calib(models_dir: Path) -> Path:
    return models_dir / "mlp_calib.npz"


# ----------------------------------------------------------------------------- tokenizers / text

def make_tokenizer(path: Path, n_words: int = 190) -> Path:
    """A WordLevel ``tokenizers`` tokenizer over ``w0 .. w{n-1}`` (+ [UNK]) saved as JSON."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(n_words)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def make_text(path: Path, n_tokens: int, seed: int = 0, n_words: int = 190) -> Path:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in rng.integers(0, n_words, n_tokens)]
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tokenizer_json(tmp_path: Path) -> Path:
    """191 tokens: fits the tiny LMs' 256-token vocabulary."""
    return make_tokenizer(tmp_path / "tok" / "tokenizer.json")


@pytest.fixture
def big_tokenizer_json(tmp_path: Path) -> Path:
    """301 tokens: more than the tiny LMs' 256-token vocabulary."""
    return make_tokenizer(tmp_path / "bigtok" / "tokenizer.json", n_words=300)


@pytest.fixture
def calib_text(tmp_path: Path) -> Path:
    return make_text(tmp_path / "calib.txt", 600)


# ----------------------------------------------------------------------------- torch Llama

LLAMA_VOCAB = 256
LLAMA_SEQ = 32


@pytest.fixture(scope="session")
def tiny_llama_capture():
    """(torch module, example ids, captured onnx_ir.Model serialized as ModelProto)."""
    pytest.importorskip("torch")
    import onnx_ir as ir
    import torch

    from lbcc.capture import capture

    module = M.tiny_llama(vocab=LLAMA_VOCAB)
    ids = torch.randint(0, LLAMA_VOCAB, (1, LLAMA_SEQ),
                        generator=torch.Generator().manual_seed(0))
    model = capture(module, (ids,))
    return module, ids, ir.to_proto(model)


# ----------------------------------------------------------------------------- the sample model

@pytest.fixture(scope="session")
def smollm2():
    """Paths of the SmolLM2-135M sample (HF dir, tokenizer.json, model.onnx), prepared once."""
    from lbcc.errors import BadInputError
    from lbcc.samples import prepare_smollm2

    try:
        return prepare_smollm2(REPO / ".cache" / "smollm2")
    except BadInputError as exc:
        pytest.skip(f"sample model unavailable: {exc}")
