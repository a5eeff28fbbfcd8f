"""Slow: ``lbcc.debug.compare`` on the SmolLM2 sample: cost against one evaluation pass over the
same samples, and memory that does not grow with what would be stored (statistics streamed)."""

from __future__ import annotations

import time

import pytest

import lbcc
from conftest import WIKITEXT
from lbcc import debug
from lbcc.calibration import TextFeed, load_tokenizer
from lbcc.pipeline import _PeakRss

pytestmark = pytest.mark.slow
WINDOWS, SEQ = 4, 512


def test_smollm2_compare_cost_and_memory(smollm2, tmp_path):
    from lbcc.evaluate import evaluate

    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} is not available")
    out = tmp_path / "smollm2.w4a16.onnx"
    lbcc.compile(smollm2["onnx"], preset="w4a16", progress=False).save(out)
    tok = load_tokenizer(smollm2["tokenizer"])

    cpu, wall = time.process_time(), time.perf_counter()  # CPU time: robust to other load
    (res,) = evaluate([out], WIKITEXT, tok, seq_len=SEQ, max_tokens=WINDOWS * SEQ,
                      latency_seqs=(), progress=False)
    eval_cpu, eval_wall = time.process_time() - cpu, time.perf_counter() - wall
    assert res.windows == WINDOWS

    feed = TextFeed(WIKITEXT, tok, seq_len=SEQ, max_samples=WINDOWS)
    cpu, wall = time.process_time(), time.perf_counter()
    with _PeakRss() as rss:
        base = rss.peak
        cmp = debug.compare(smollm2["onnx"], out, feed)
    cmp_cpu, cmp_wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"compare {cmp_wall:.1f} s wall / {cmp_cpu:.1f} s CPU; eval {eval_wall:.1f} s wall / "
          f"{eval_cpu:.1f} s CPU; peak +{(rss.peak - base) / 2**20:.0f} MB")
    assert cmp.samples == WINDOWS
    assert len(cmp) == 212 + 1  # 30 x 7 projections, the embedding, lm_head + the logits
    assert cmp_cpu <= 3.0 * eval_cpu, (cmp_cpu, eval_cpu)
    # storing every matched activation of both models for all samples would take this much:
    stored = 2 * 4 * sum(r["elements"] for r in cmp)
    assert rss.peak - base < 0.5 * stored, (rss.peak - base, stored)
    worst = cmp[0]
    assert worst["sqnr_db"] < cmp["model.embed_tokens"]["sqnr_db"]
