"""Pass base class, analysis cache and the instrumented :class:`Pipeline`.

A pass is an ``onnx_ir.passes.InPlacePass`` with a kebab-case ``name`` and a ``preserves`` set:
the analyses (e.g. ``activation-stats``) that stay valid when it modifies the model. After every
pass that reports ``modified=True`` the pipeline drops every cached analysis it does not preserve,
so a later pass that asks for calibration statistics gets them recomputed on the current model.

Instruments see each pass run: :class:`PassRecord` keeps wall time, peak RSS during the pass, the
op-count diff, and the notes the pass left for the report. ``stop_after`` ends the run after the
named pass; ``dump_dir`` writes ``NNN_<pass>.onnx`` after each pass; ``snapshot_after`` keeps an
in-memory copy of the model after the named passes.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import onnx_ir as ir
import psutil

from lbcc.errors import BadInputError, LbccError, PassError
from lbcc.irutils import op_histogram


@dataclasses.dataclass
class PipelineContext:
    """What passes share: the analysis cache, the calibration feed, options and report notes."""

    calibration: Any = None  # a lbcc.calibration.Feed, or None
    analyses: "AnalysisCache" = dataclasses.field(default_factory=lambda: AnalysisCache())
    notes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    progress: bool = True
    #: whether calibration also accumulates X^T X per input (GPTQ's Hessians)
    second_moments: bool = False
    #: token rows each observer keeps for passes that measure errors on real inputs
    keep_rows: int = 0


class Pass(ir.passes.InPlacePass):
    """Base class of lbcc passes. Subclasses set ``name`` and implement ``call(model)``."""

    name: ClassVar[str] = ""
    preserves: ClassVar[frozenset[str]] = frozenset()
    context: PipelineContext

    def __init__(self) -> None:
        super().__init__()
        self.context = PipelineContext()

    def options(self) -> dict[str, Any]:
        """The pass's options, shown by ``repr`` and in the report."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "context"}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"

    def note(self, key: str, value: Any) -> None:
        """Leave a note for the report under this pass's name."""
        self.context.notes.setdefault(self.name, {})[key] = value

    def fail(self, message: str, hint: str = "", node: ir.Node | None = None) -> PassError:
        return PassError(self.name, message, hint, node.name if node is not None else None)


class AnalysisCache:
    """Lazily computed analyses keyed by name, dropped when a pass modifies the model.

    ``providers`` maps an analysis name to ``f(model, context) -> result``.
    """

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self.providers: dict[str, Callable[[ir.Model, PipelineContext], Any]] = {}
        self.computed: list[str] = []  # names in the order they were computed (for the report)

    def get(self, name: str, model: ir.Model, context: PipelineContext) -> Any:
        if name not in self._values:
            if name not in self.providers:
                raise BadInputError(f"no provider for analysis {name!r}.",
                                    f"Known analyses: {sorted(self.providers)}.")
            self._values[name] = self.providers[name](model, context)
            self.computed.append(name)
        return self._values[name]

    def has(self, name: str) -> bool:
        return name in self._values

    def put(self, name: str, value: Any) -> None:
        self._values[name] = value

    def snapshot(self) -> dict[str, Any]:
        """The cached values now (a shallow copy: analyses are read-only once computed)."""
        return dict(self._values)

    def restore(self, values: dict[str, Any]) -> None:
        self._values = dict(values)

    def invalidate(self, preserved: Iterable[str] = ()) -> list[str]:
        keep = set(preserved)
        dropped = [k for k in self._values if k not in keep]
        for k in dropped:
            del self._values[k]
        return dropped


@dataclasses.dataclass
class PassRecord:
    """What one pass did: the report's per-pass row."""

    index: int
    name: str
    repr: str
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    modified: bool = False
    ops_before: dict[str, int] = dataclasses.field(default_factory=dict)
    ops_after: dict[str, int] = dataclasses.field(default_factory=dict)
    invalidated: list[str] = dataclasses.field(default_factory=list)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def op_diff(self) -> dict[str, int]:
        keys = set(self.ops_before) | set(self.ops_after)
        diff = {k: self.ops_after.get(k, 0) - self.ops_before.get(k, 0) for k in sorted(keys)}
        return {k: v for k, v in diff.items() if v}

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "name": self.name, "pass": self.repr,
            "seconds": round(self.seconds, 4), "peak_rss_mb": round(self.peak_rss_mb, 1),
            "modified": self.modified, "op_diff": self.op_diff,
            "invalidated_analyses": self.invalidated, "notes": self.notes,
        }


class _PeakRss:
    """Samples this process's RSS in a background thread; ``peak_mb`` after ``stop``."""

    def __init__(self, interval: float = 0.05):
        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> "_PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


class Instrument:
    """Hook called around every pass (TVM's PassInstrument, reduced to what lbcc needs)."""

    def before_pass(self, p: Pass, model: ir.Model, record: PassRecord) -> None: ...

    def after_pass(self, p: Pass, model: ir.Model, record: PassRecord) -> None: ...


class DumpIR(Instrument):
    """Writes the model after each pass to ``DIR/NNN_<pass>.onnx`` (external data beside it)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def after_pass(self, p: Pass, model: ir.Model, record: PassRecord) -> None:
        from lbcc.modelio import save_model

        self.directory.mkdir(parents=True, exist_ok=True)
        save_model(model, self.directory / f"{record.index:03d}_{p.name}.onnx")


def copy_model(model: ir.Model) -> ir.Model:
    """A structural deep copy (``Model.clone``): new graph, nodes and values with their types and
    shapes; tensors are shared, not copied, so a snapshot of a large model costs no weight memory
    and external data stays where it is (a proto round trip would lose the external files' base
    directory). Passes never modify a tensor's data in place; they register new initializers."""
    return model.clone(deep_copy=True)


class Snapshot(Instrument):
    """Keeps an in-memory copy of the model after the named passes (``"*"`` for all)."""

    def __init__(self, after: Iterable[str]):
        self.after = set(after)
        self.models: dict[str, ir.Model] = {}
        #: per snapshot: (cached analyses, report notes) at that point, so a run can resume there
        #: without recomputing calibration statistics
        self.states: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}

    def after_pass(self, p: Pass, model: ir.Model, record: PassRecord) -> None:
        if "*" in self.after or p.name in self.after:
            self.models[p.name] = copy_model(model)
            self.states[p.name] = (p.context.analyses.snapshot(), copy.deepcopy(p.context.notes))


@dataclasses.dataclass
class PipelineRun:
    model: ir.Model
    records: list[PassRecord]
    context: PipelineContext
    stopped_after: str | None = None
    snapshots: dict[str, ir.Model] = dataclasses.field(default_factory=dict)
    #: per snapshot: (analyses, notes) at that point; what :meth:`Pipeline.resume` restores
    states: dict[str, tuple[dict[str, Any], dict[str, Any]]] = dataclasses.field(
        default_factory=dict)


class Pipeline:
    """An ordered list of passes run with instruments, ``stop_after`` and an analysis cache."""

    def __init__(self, passes: Sequence[Pass], context: PipelineContext | None = None,
                 instruments: Sequence[Instrument] = ()):
        self.passes = list(passes)
        self.context = context or PipelineContext()
        self.instruments = list(instruments)
        names = [p.name for p in self.passes]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise BadInputError(f"pipeline has duplicate pass names {sorted(dupes)}.",
                                "Give each pass instance a distinct place in the pipeline.")

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def describe(self) -> list[str]:
        return [f"{i:2d}. {p.name:<22} {p!r}" for i, p in enumerate(self.passes, 1)]

    def run(self, model: ir.Model, stop_after: str | None = None,
            snapshot_after: Iterable[str] = (), start_after: str | None = None) -> PipelineRun:
        """Run the passes on ``model`` (in place). ``start_after`` skips the passes up to and
        including that one (the model is taken to be their output: see :meth:`resume`)."""
        for option, name in (("--stop-after", stop_after), ("start_after", start_after)):
            if name is not None and name not in self.names:
                raise BadInputError(f"{option} {name!r} is not a pass of this pipeline.",
                                    f"The passes are: {', '.join(self.names)}.")
        first = self.names.index(start_after) + 1 if start_after is not None else 0
        snap = Snapshot(snapshot_after)
        instruments = [*self.instruments, snap]
        records: list[PassRecord] = []
        for index, p in enumerate(self.passes, 1):
            if index <= first:
                continue
            p.context = self.context
            record = PassRecord(index=index, name=p.name, repr=repr(p),
                                ops_before=op_histogram(model))
            for inst in instruments:
                inst.before_pass(p, model, record)
            start = time.perf_counter()
            with _PeakRss() as rss:
                try:
                    result = p(model)
                except LbccError:
                    raise
                except ir.passes.PreconditionError as exc:
                    raise PassError(p.name, str(exc)) from exc
            record.seconds = time.perf_counter() - start
            record.peak_rss_mb = rss.peak_mb
            model = result.model
            record.modified = bool(result.modified)
            record.ops_after = op_histogram(model)
            record.notes = self.context.notes.get(p.name, {})
            if result.modified:
                record.invalidated = self.context.analyses.invalidate(p.preserves)
            for inst in instruments:
                inst.after_pass(p, model, record)
            records.append(record)
            if stop_after == p.name:
                return PipelineRun(model, records, self.context, p.name, snap.models, snap.states)
        return PipelineRun(model, records, self.context, None, snap.models, snap.states)

    # ------------------------------------------------------------------ notebook helpers
    @classmethod
    def from_preset(cls, name: str | None = None, target: str = "ort-int8", *,
                    recipe: Any = None, calibration: Any = None, tokenizer: Any = None,
                    model: ir.Model | None = None, progress: bool = True) -> "Pipeline":
        """The pipeline ``lbcc compile --preset NAME`` runs, ready for ``run`` / ``resume``.

        ``calibration`` is anything ``lbcc.compile`` accepts (a Feed, .txt + ``tokenizer``, .npz,
        ``"random:VOCAB"``); ``model`` is only needed to size a random feed to its input.
        """
        from lbcc.api import build_pipeline, make_feed, resolve_recipe
        from lbcc.target import check_recipe, get_target

        rec = resolve_recipe(name, recipe)
        tgt = get_target(target)
        check_recipe(rec, tgt)
        feed = make_feed(calibration, tokenizer, rec, model)
        pipe = build_pipeline(rec, tgt, PipelineContext(calibration=feed, progress=progress))
        pipe.recipe, pipe.target = rec, tgt  # type: ignore[attr-defined]
        return pipe

    def resume(self, run: PipelineRun, after: str, stop_after: str | None = None,
               snapshot_after: Iterable[str] = ()) -> PipelineRun:
        """Run the passes after ``after`` on a copy of ``run``'s snapshot taken after that pass,
        with the analyses (calibration statistics) and notes it had then; the snapshot itself is
        left untouched, so one snapshot serves many resumes. The returned run's records start
        with ``run``'s records up to ``after``."""
        if after not in run.snapshots:
            raise BadInputError(f"no snapshot after pass {after!r} in this run.",
                                f"Run with snapshot_after=[{after!r}] first (it has: "
                                f"{', '.join(run.snapshots) or 'none'}).")
        model = copy_model(run.snapshots[after])
        analyses, notes = run.states.get(after, ({}, {}))
        self.context.analyses.restore(analyses)
        self.context.notes = copy.deepcopy(notes)
        new = self.run(model, stop_after=stop_after, snapshot_after=snapshot_after,
                       start_after=after)
        done = [r for r in run.records if r.index <= self.names.index(after) + 1]
        new.records = done + new.records
        return new

    def with_options(self, pass_name: str, **options: Any) -> "Pipeline":
        """A pipeline sharing this one's context, with pass ``pass_name`` given other options
        (``pipe.with_options("smooth-quant", alpha=0.8).resume(run, after="detect-outliers")``)."""
        if pass_name not in self.names:
            raise BadInputError(f"{pass_name!r} is not a pass of this pipeline.",
                                f"The passes are: {', '.join(self.names)}.")
        passes = []
        for p in self.passes:
            if p.name == pass_name:
                known = p.options()
                unknown = sorted(set(options) - set(known))
                if unknown:
                    raise BadInputError(f"pass {pass_name!r} has no option(s) {unknown}.",
                                        f"Its options: {', '.join(known) or 'none'}.")
                p = copy.copy(p)
                for k, v in options.items():
                    setattr(p, k, v)
            passes.append(p)
        new = Pipeline(passes, self.context, self.instruments)
        for attr in ("recipe", "target"):
            if hasattr(self, attr):
                setattr(new, attr, getattr(self, attr))
        return new
