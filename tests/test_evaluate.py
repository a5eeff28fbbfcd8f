"""lbcc.evaluate: perplexity protocol, sizes, and the ``lbcc eval`` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

import models as M
from conftest import make_text
from lbcc.calibration import load_tokenizer
from lbcc.cli import app
from lbcc.errors import BadInputError
from lbcc.evaluate import evaluate, model_size_bytes


def _manual_ppl(model_path, ids: np.ndarray, seq_len: int) -> float:
    n = len(ids) // seq_len
    nll, count = 0.0, 0
    for w in ids[: n * seq_len].reshape(n, seq_len):
        logits = M.run_ort(model_path, {"input_ids": w[None]})[0][0].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                   keepdims=True))
        logp -= logits.max(-1, keepdims=True)
        nll -= sum(logp[t, w[t + 1]] for t in range(seq_len - 1))
        count += seq_len - 1
    return math.exp(nll / count)


def test_perplexity_matches_a_direct_computation(models_dir, tokenizer_json, tmp_path):
    text = make_text(tmp_path / "eval.txt", 300, seed=3)
    model = models_dir / "tied_dyn.onnx"
    (res,) = evaluate([model], text, tokenizer_json, seq_len=64, max_tokens=200,
                      latency_seqs=(4,), repeats=2, progress=False)
    ids = np.asarray(load_tokenizer(tokenizer_json).encode(text.read_text(),
                                                           add_special_tokens=False).ids)[:200]
    assert res.windows == 3 and res.tokens == 3 * 63  # non-overlapping windows, no BOS
    assert res.perplexity == pytest.approx(_manual_ppl(model, ids, 64), rel=1e-6)
    assert res.latency_ms[4] > 0
    assert res.size_mb == pytest.approx(model.stat().st_size / 1e6)
    j = res.to_json()
    assert j["windows"] == 3 and "seq4" in j["latency_ms"]


def test_too_few_tokens_for_one_window(models_dir, tokenizer_json, tmp_path):
    text = make_text(tmp_path / "eval.txt", 100)
    with pytest.raises(BadInputError, match="fewer than one window"):
        evaluate([models_dir / "tied_dyn.onnx"], text, tokenizer_json, seq_len=512,
                 latency_seqs=(), progress=False)


def test_missing_model(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        evaluate([tmp_path / "nope.onnx"], latency_seqs=(), progress=False)


def test_model_size_counts_external_data(tmp_path):
    M.save(M.mlp_model(), tmp_path / "a.onnx", external_data=True)
    total = (tmp_path / "a.onnx").stat().st_size + (tmp_path / "a.onnx.data").stat().st_size
    assert model_size_bytes(tmp_path / "a.onnx") == total
    assert total > 64 * 96 * 4


def test_eval_cli_json(models_dir, tokenizer_json, tmp_path):
    text = make_text(tmp_path / "eval.txt", 300, seed=3)
    r = CliRunner().invoke(app, ["eval", str(models_dir / "tied_dyn.onnx"), "--text", str(text),
                                 "--tokenizer", str(tokenizer_json), "--seq-len", "64",
                                 "--json", "--threads", "1"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    (res,) = data["results"]
    assert res["windows"] == 4 and res["perplexity"] > 1


def test_eval_cli_text_without_tokenizer(models_dir, tmp_path):
    text = make_text(tmp_path / "eval.txt", 300)
    r = CliRunner().invoke(app, ["eval", str(models_dir / "tied_dyn.onnx"), "--text", str(text)])
    assert r.exit_code == 1
    assert "--tokenizer" in r.stderr and "Traceback" not in r.stderr
