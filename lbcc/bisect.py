"""Bisection: which pass lost the accuracy, and which layers to keep in float to win it back.

Over the passes: one pipeline run with a probe after every pass that changed the model; after
each, the end metric (perplexity, or the output error against the float model) is measured on the
evaluation samples. The culprit is the first pass whose degradation exceeds the tolerance. Every
pass up to the target's lowering leaves a model ONNX Runtime runs, so this is one compile plus
one short evaluation per pass: cheaper than re-running the pipeline log2(passes) times, and it
shows the whole curve.

Over the layers: the run keeps a snapshot just before ``select-precision`` with its calibration
statistics; every trial resumes from it with a recipe that adds ``[[layers]] skip = true`` rules
for the layers tried in float, so no trial recalibrates. Candidates are ranked by the layer's
estimated own noise, from the report: ``nu = e_w^2 + 10^(-SQNR_act / 10)`` (e_w the relative
weight rounding error, SQNR_act the estimated output SQNR of its static activation range, both
computed from the calibration statistics), largest first. Then
1. all candidates in float must meet the tolerance (else no set of layers can);
2. binary search for the shortest prefix of the ranking that meets it (assumes more layers in
   float never hurts): about log2(N) trials;
3. greedy minimization: each chosen layer is put back to quantized if the rest still meet the
   tolerance (only while the set is small, ``prune_limit``).
Every trial (layers, metric, degradation, verdict, seconds) is in the result.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any, Callable

import onnx_ir as ir

from lbcc.accuracy import Metric, make_metric
from lbcc.debug import DEBUG_SCHEMA_VERSION
from lbcc.errors import BadInputError, LbccError
from lbcc.pipeline import Instrument, Pass, PassRecord, PipelineContext, PipelineRun
from lbcc.recipes import LayerOverride, Recipe

RESUME_BEFORE = "select-precision"


def _escape(name: str) -> str:
    """An fnmatch pattern matching exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _round(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")


class MetricProbe(Instrument):
    """Measures the metric after every pass that changed the model (None: ORT cannot run it)."""

    def __init__(self, metric: Metric, tolerance: float, progress: Callable[[str], None]):
        self.metric = metric
        self.tolerance = tolerance
        self.rows: list[dict[str, Any]] = []
        self._say = progress

    @staticmethod
    def _fingerprint(model: ir.Model) -> tuple[int, dict[str, int]]:
        """What the model computes, short of metadata: nodes (op, inputs, outputs, attributes)
        and the identity of every weight tensor."""
        nodes = hash(tuple(
            (n.domain, n.op_type, tuple(v.name if v is not None else "" for v in n.inputs),
             tuple(v.name for v in n.outputs), repr(sorted(n.attributes.items())))
            for n in model.graph))
        return nodes, {name: id(v.const_value) for name, v in model.graph.initializers.items()}

    def before_pass(self, p: Pass, model: ir.Model, record: PassRecord) -> None:
        self._before = self._fingerprint(model)

    def after_pass(self, p: Pass, model: ir.Model, record: PassRecord) -> None:
        # a pass that only annotates (select-precision writes its plans into node metadata)
        # computes the same function as before it: nothing to measure
        if not record.modified or self._fingerprint(model) == self._before:
            return
        start = time.perf_counter()
        try:
            value = self.metric.measure(model)
        except LbccError as exc:
            self.rows.append({"pass": p.name, "index": record.index, "metric": None,
                              "degradation": None, "exceeds": None, "raw": None,
                              "note": f"not runnable here: {exc.message[:160]}"})
            return
        deg = self.metric.degradation(value)
        self.rows.append({"pass": p.name, "index": record.index, "metric": _round(value),
                          "degradation": _round(deg), "exceeds": bool(deg > self.tolerance),
                          "raw": value,
                          "seconds": round(time.perf_counter() - start, 2)})
        self._say(f"after {p.name}: {self.metric.name} {value:.5g} ({deg:+.4f})")


def layer_ranking(layers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Quantized layers, largest estimated own noise first (see the module docstring)."""
    ranked: dict[str, dict[str, Any]] = {}
    for order, entry in enumerate(layers.values()):
        if entry.get("status") != "quantized":
            continue
        plan = entry.get("plan") or {}
        w_err = float((entry.get("weight") or {}).get("rel_error", 0.0))
        noise = w_err ** 2
        sqnr = plan.get("sqnr_db") if plan.get("activation") == "static" else None
        if sqnr is not None:
            noise += 10 ** (-float(sqnr) / 10)
        name = entry["layer"]
        row = ranked.setdefault(name, {"layer": name, "noise": 0.0, "order": order,
                                       "weight_rel_error": w_err, "activation": plan.get(
                                           "activation"), "activation_sqnr_db": sqnr})
        row["noise"] = max(row["noise"], noise)
    rows = sorted(ranked.values(), key=lambda r: (-r["noise"], r["order"]))
    for r in rows:
        r["estimated_sqnr_db"] = _round(-10 * math.log10(r["noise"])) if r["noise"] > 0 else None
        r["noise"] = _round(r["noise"])
    return rows


class Trials:
    """A compile that can be re-run from its pre-``select-precision`` snapshot with layers in
    float, reusing the calibration statistics (the engine of layer bisection and auto-fallback)."""

    def __init__(self, model: ir.Model, recipe: Recipe, target: Any, feed: Any, metric: Metric,
                 tolerance: float, probe_passes: bool = False, progress: bool = False,
                 say: Callable[[str], None] = lambda s: None, dump_ir: Any = None):
        from lbcc.api import build_pipeline
        from lbcc.pipeline import DumpIR

        self.recipe, self.target, self.feed = recipe, target, feed
        self.metric, self.tolerance, self.progress, self.say = metric, tolerance, progress, say
        pipe = build_pipeline(recipe, target, PipelineContext(calibration=feed, progress=progress))
        if RESUME_BEFORE not in pipe.names:
            raise BadInputError(f"the pipeline has no {RESUME_BEFORE!r} pass to resume from.", "")
        self.resume_after = pipe.names[pipe.names.index(RESUME_BEFORE) - 1]
        self.probe = MetricProbe(metric, tolerance, say) if probe_passes else None
        if self.probe is not None:
            pipe.instruments.append(self.probe)
        if dump_ir is not None:
            pipe.instruments.append(DumpIR(dump_ir))
        self.base = pipe.run(model, snapshot_after=[self.resume_after])
        last = self.probe.rows[-1] if self.probe is not None and self.probe.rows else None
        if last is not None and last["index"] == self.base.records[-1].index and \
                last["raw"] is not None:
            self.base_value = last["raw"]  # the probe measured the final model already
        else:
            self.base_value = metric.measure(self.base.model)
        self.trials: list[dict[str, Any]] = []
        #: metric per tried set (runs are not kept: each holds a compiled model)
        self._memo: dict[frozenset[str], float] = {}

    def ok(self, value: float) -> bool:
        return self.metric.degradation(value) <= self.tolerance

    def recipe_with_float(self, layers: list[str]) -> Recipe:
        rec = copy.deepcopy(self.recipe)
        rec.layers = [LayerOverride(match=_escape(n), skip=True) for n in layers] + rec.layers
        return rec

    def run(self, layers: list[str]) -> tuple[PipelineRun | None, float]:
        """Compile with ``layers`` kept in float (resumed from the snapshot) and measure it.
        A set tried before that missed the tolerance is not compiled again (run None)."""
        from lbcc.api import build_pipeline

        key = frozenset(layers)
        if key in self._memo and not self.ok(self._memo[key]):
            return None, self._memo[key]
        start = time.perf_counter()
        rec = self.recipe_with_float(layers)
        pipe = build_pipeline(rec, self.target, PipelineContext(calibration=self.feed,
                                                                progress=self.progress))
        run = pipe.resume(self.base, after=self.resume_after)
        value = self.metric.measure(run.model)
        deg = self.metric.degradation(value)
        self.trials.append({"float_layers": len(layers), "layers": list(layers),
                            "metric": _round(value), "degradation": _round(deg),
                            "within_tolerance": bool(deg <= self.tolerance),
                            "seconds": round(time.perf_counter() - start, 2)})
        self.say(f"trial: {len(layers)} layer(s) in float -> {self.metric.name} {value:.5g} "
                 f"({deg:+.4f})")
        self._memo[key] = value
        return run, value

    def search(self, prune_limit: int = 8, max_trials: int = 40) -> dict[str, Any]:
        """The smallest set of layers (found by the module docstring's search) to keep in float;
        returns the set, its run and metric, and whether it meets the tolerance."""
        ranking = layer_ranking(self.base.context.notes.get("layers", {}))
        names = [r["layer"] for r in ranking]
        out: dict[str, Any] = {"candidates": len(names), "ranking": ranking[:25],
                               "layers": [], "restored": self.ok(self.base_value),
                               "run": self.base, "metric": self.base_value}
        if out["restored"] or not names:
            return out
        best_run, best_value = self.run(names)
        if not self.ok(best_value):
            out.update(run=best_run, metric=best_value, layers=names, restored=False,
                       note="even with every candidate layer in float the tolerance is missed: "
                            "the loss comes from a pass that is not per-layer (e.g. smoothing)")
            return out
        lo, hi = 0, len(names)  # prefix lo fails, prefix hi passes (its run is best_run)
        while hi - lo > 1 and len(self.trials) < max_trials:
            mid = (lo + hi) // 2
            run, value = self.run(names[:mid])
            if self.ok(value):
                hi, best_run, best_value = mid, run, value
            else:
                lo = mid
            del run  # only the best passing compile is kept alive
        chosen = names[:hi]
        if len(chosen) <= prune_limit:
            for name in list(chosen):
                if len(chosen) == 1 or len(self.trials) >= max_trials:
                    break
                trial = [n for n in chosen if n != name]
                run, value = self.run(trial)
                if self.ok(value) and run is not None:
                    chosen, best_run, best_value = trial, run, value
        out.update(layers=chosen, run=best_run, metric=best_value, restored=True)
        return out


@dataclasses.dataclass
class BisectResult:
    data: dict[str, Any]
    #: the compile with the culprit layers kept in float (None when no layer search ran)
    restored_run: PipelineRun | None = None

    @property
    def culprit_pass(self) -> str | None:
        return self.data["passes"]["culprit"]

    @property
    def culprit_layers(self) -> list[str]:
        return self.data["layers"]["culprits"] if self.data.get("layers") else []

    def to_json(self) -> dict[str, Any]:
        return self.data

    def render(self, console: Any) -> None:
        from rich.table import Table

        d = self.data
        m = d["metric"]
        t = Table(title=f"{m['metric']} after each pass (float {m['baseline']}, tolerance "
                        f"{d['tolerance']})")
        for col in ("#", "pass", m["metric"], "degradation", ""):
            t.add_column(col)
        for row in d["passes"]["rows"]:
            flag = "culprit" if row["pass"] == d["passes"]["culprit"] else (
                row.get("note", "") if row["metric"] is None else "")
            t.add_row(str(row["index"]), row["pass"], str(row["metric"]),
                      "-" if row["degradation"] is None else f"{row['degradation']:+.4f}", flag)
        console.print(t)
        lay = d.get("layers")
        if lay:
            t = Table(title=f"layer trials ({lay['candidates']} quantized layers ranked by "
                            "estimated own noise)")
            for col in ("layers in float", "metric", "degradation", "ok", "s"):
                t.add_column(col)
            for tr in lay["trials"]:
                shown = ", ".join(tr["layers"][:4]) + (
                    f", ... (+{len(tr['layers']) - 4})" if len(tr["layers"]) > 4 else "")
                t.add_row(f"{tr['float_layers']}: {shown}", str(tr["metric"]),
                          f"{tr['degradation']:+.4f}", "yes" if tr["within_tolerance"] else "no",
                          f"{tr['seconds']:.1f}")
            console.print(t)
        console.print(d["summary"], highlight=False, soft_wrap=True)


def prepare_search(source: Any, preset: str | None, recipe: Any, target: str, calibration: Any,
                   tokenizer: Any, group_size: int | None = None
                   ) -> tuple[Recipe, Any, ir.Model, Any]:
    """What a search over compiles of ``source`` starts from: (recipe, checked against the
    target; the target; the float model, captured, and copied when ``source`` is already an
    ``ir.Model`` so that the caller's model is never changed; the calibration feed or None).
    A recipe that needs calibration data and has none is a :class:`BadInputError`."""
    from lbcc.api import make_feed, require_calibration, resolve_recipe
    from lbcc.capture import capture
    from lbcc.target import check_recipe, get_target

    rec = resolve_recipe(preset, recipe, group_size)
    tgt = get_target(target)
    check_recipe(rec, tgt)
    model = capture(source)
    if isinstance(source, ir.Model):
        model = ir.from_proto(ir.to_proto(model))
    feed = make_feed(calibration, tokenizer, rec, model)
    require_calibration(rec, feed)
    return rec, tgt, model, feed


def bisect(model: Any, *, preset: str | None = None, recipe: Any = None,
           target: str = "ort-int8", calibration: Any = None, tokenizer: Any = None,
           metric: str = "ppl", tolerance: float = 0.02, eval_data: Any = None,
           eval_samples: int | None = 8, layers: bool = True, progress: bool = False,
           say: Callable[[str], None] = lambda s: None) -> BisectResult:
    """Which pass first pushes ``metric`` past ``tolerance``, and the smallest set of layers
    that, kept in float, brings it back (see the module docstring).

    ``eval_data`` (a feed spec like ``calibration``) defaults to the calibration samples (then
    the result says so); ``eval_samples`` caps the samples measured per step.
    """
    from lbcc.api import make_feed

    start = time.perf_counter()
    rec, tgt, source, feed = prepare_search(model, preset, recipe, target, calibration, tokenizer)
    efeed = make_feed(eval_data, tokenizer, rec, source) if eval_data is not None else feed
    if efeed is None:
        raise BadInputError("bisect needs samples to measure the metric on.",
                            "Pass --calib (and --eval-text for a held-out evaluation text).")
    m = make_metric(metric, source, efeed, max_samples=eval_samples)
    say(f"float {m.name}: {m.baseline:.5g}")
    trials = Trials(source, rec, tgt, feed, m, tolerance, probe_passes=True, progress=progress,
                    say=say)
    rows = [{k: v for k, v in r.items() if k != "raw"} for r in trials.probe.rows]
    culprit = next((r["pass"] for r in rows if r["exceeds"]), None)
    final_deg = m.degradation(trials.base_value)
    data: dict[str, Any] = {
        "schema_version": DEBUG_SCHEMA_VERSION, "kind": "bisect", "recipe": rec.name,
        "target": tgt.name, "tolerance": tolerance,
        "metric": {**m.describe(), "final": _round(trials.base_value),
                   "final_degradation": _round(final_deg),
                   "data": "calibration samples" if eval_data is None else "evaluation data"},
        "passes": {"rows": rows, "culprit": culprit},
        "layers": None,
    }
    restored_run = None
    if layers and final_deg > tolerance:
        found = trials.search()
        data["layers"] = {"candidates": found["candidates"], "ranking": found["ranking"],
                          "trials": trials.trials, "culprits": found["layers"],
                          "restored": found["restored"], "metric": _round(found["metric"]),
                          "degradation": _round(m.degradation(found["metric"])),
                          **({"note": found["note"]} if "note" in found else {})}
        restored_run = found["run"]
    lay = data["layers"]
    parts = [f"{m.name}: float {m.baseline:.5g}, compiled {trials.base_value:.5g} "
             f"({final_deg:+.2%}; tolerance {tolerance:+.2%})."]
    if final_deg <= tolerance:
        parts.append("Within tolerance: nothing to bisect.")
    else:
        parts.append(f"Culprit pass: {culprit or 'none found (only the final model exceeds)'}.")
        if lay and lay["restored"]:
            shown = ", ".join(lay["culprits"][:8])
            more = len(lay["culprits"]) - 8
            parts.append(f"Keeping {len(lay['culprits'])} layer(s) in float restores it "
                         f"({lay['degradation']:+.2%}): {shown}"
                         + (f", ... (+{more}; all in the JSON)." if more > 0 else "."))
        elif lay:
            parts.append("No set of layers kept in float restores it: " + lay.get("note", ""))
    data["summary"] = " ".join(parts)
    data["seconds"] = round(time.perf_counter() - start, 2)
    return BisectResult(data, restored_run)
