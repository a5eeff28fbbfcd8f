"""Accuracy gates on a compile: ``--max-ppl-increase X --eval-text FILE [--auto-fallback]``.

The compiled model's perplexity on the evaluation text (non-overlapping windows of ``seq_len``
tokens, the first ``eval_tokens`` tokens, no BOS: the protocol of :mod:`lbcc.evaluate`) is
compared with the float model's on the same windows; the gate holds when
``ppl / ppl_float - 1 <= X``. A missed gate is exit code 3 (:class:`AccuracyGateError`), and the
best model found and its report are still written.

With ``auto_fallback`` a missed gate starts the layer search of :mod:`lbcc.bisect` from the
compile's own pre-``select-precision`` snapshot (calibration statistics reused): the layers with
the largest estimated own noise are kept in float, as few as the search finds, until the gate
holds. The report's ``accuracy_gate`` section lists them with the reason and every trial, and
each such layer's row says why it is float.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Sequence

from lbcc.errors import BadInputError


def gated_compile(source: Any, *, max_ppl_increase: float, eval_text: str | os.PathLike,
                  tokenizer: Any, target: str = "ort-int8", preset: str | None = None,
                  recipe: Any = None, calibration: Any = None, group_size: int | None = None,
                  eval_tokens: int = 8192, seq_len: int = 512, auto_fallback: bool = False,
                  dump_ir: Any = None, progress: bool = True,
                  command: Sequence[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """``lbcc.compile`` plus the gate; returns (CompileResult, the report's gate section)."""
    from lbcc.accuracy import Perplexity
    from lbcc.api import CompileResult
    from lbcc.bisect import Trials, prepare_search
    from lbcc.calibration import TextFeed, load_tokenizer
    from lbcc.irutils import initializer_bytes
    from lbcc.report import build_report

    if max_ppl_increase < 0:
        raise BadInputError(f"--max-ppl-increase {max_ppl_increase} is negative.",
                            "Give the allowed relative increase, e.g. 0.02 for 2 %.")
    if tokenizer is None:
        raise BadInputError("--eval-text needs --tokenizer.",
                            "Pass the model's tokenizer.json or its Hugging Face directory.")
    start = time.perf_counter()
    rec, tgt, model, feed = prepare_search(source, preset, recipe, target, calibration,
                                           tokenizer, group_size)
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    efeed = TextFeed(eval_text, tok, seq_len=seq_len, max_samples=max(1, eval_tokens // seq_len),
                     min_tokens=seq_len)
    samples = list(efeed.samples(model))
    input_bytes = initializer_bytes(model)
    metric = Perplexity(model, samples)
    trials = Trials(model, rec, tgt, feed, metric, max_ppl_increase, progress=progress,
                    dump_ir=dump_ir)
    run, value, used = trials.base, trials.base_value, rec
    fallback: dict[str, Any] | None = None
    if not trials.ok(value) and auto_fallback:
        found = trials.search()
        if metric.degradation(found["metric"]) < metric.degradation(value):
            run, value = found["run"], found["metric"]
            used = trials.recipe_with_float(found["layers"])
        ranks = {r["layer"]: (i + 1, r) for i, r in enumerate(found["ranking"])}
        why = []
        for name in found["layers"] if used is not rec else []:
            rank, r = ranks.get(name, (None, {}))
            why.append({"layer": name, "rank": rank, "estimated_sqnr_db": r.get(
                "estimated_sqnr_db"), "reason": (
                f"kept in float by --auto-fallback: among the {found['candidates']} quantized "
                f"layers it has the #{rank} largest estimated own noise "
                f"({r.get('estimated_sqnr_db')} dB estimated output SQNR), and the layer search "
                f"needed it in float to bring the perplexity increase within "
                f"{max_ppl_increase:.2%}")})
        fallback = {"layers": why, "restored": found["restored"], "trials": trials.trials,
                    "before": {"ppl": round(trials.base_value, 5),
                               "increase": round(metric.degradation(trials.base_value), 6)},
                    **({"note": found["note"]} if "note" in found else {})}
    deg = metric.degradation(value)
    gate = {"metric": "ppl", "max_increase": max_ppl_increase,
            "float_ppl": round(metric.baseline, 5), "ppl": round(value, 5),
            "increase": round(deg, 6), "passed": bool(deg <= max_ppl_increase),
            "eval": {**efeed.describe(), "windows": len(samples)},
            "auto_fallback": fallback}
    report = build_report(run, used, tgt.name,
                          source=str(source) if isinstance(source, (str, os.PathLike))
                          else type(source).__name__,
                          input_bytes=input_bytes, seconds=time.perf_counter() - start,
                          command=list(command) if command is not None else sys.argv)
    reasons = {w["layer"]: w["reason"] for w in (fallback or {}).get("layers", [])}
    for row in report.layers:
        if row.get("layer") in reasons and row.get("status") == "float":
            row["reason"] = reasons[row["layer"]]
    report.data["accuracy_gate"] = gate
    return CompileResult(model=run.model, report=report, run=run, target=tgt), gate


def gate_message(gate: dict[str, Any]) -> str:
    """One line for the user: the gate, the measured increase and the fallback, if any."""
    head = (f"accuracy gate {'met' if gate['passed'] else 'MISSED'}: perplexity "
            f"{gate['float_ppl']:.4f} -> {gate['ppl']:.4f} ({gate['increase']:+.2%}, allowed "
            f"{gate['max_increase']:+.2%})")
    fb = gate.get("auto_fallback")
    if fb and fb["layers"]:
        head += (f"; --auto-fallback kept {len(fb['layers'])} layer(s) in float: "
                 + ", ".join(w["layer"] for w in fb["layers"]))
    return head
