"""lbcc.pipeline: stop_after, analysis cache invalidation, instruments (DumpIR), PassRecord."""

from __future__ import annotations

from typing import ClassVar

import onnx
import onnx_ir as ir
import pytest

import models as M
from lbcc.api import build_pipeline
from lbcc.errors import BadInputError, PassError
from lbcc.pipeline import DumpIR, Instrument, Pass, Pipeline, PipelineContext
from lbcc.recipes import preset
from lbcc.target import get_target


def _model() -> ir.Model:
    return ir.from_proto(M.mlp_model())


class AppendRelu(Pass):
    """Appends Relu(output) as the new graph output (modifies the model)."""

    name = "append-relu"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        y = model.graph.outputs[0]
        node = ir.node("Relu", [y], name=f"relu_{len(model.graph)}")
        out = node.outputs[0]
        out.name, out.type, out.shape = f"{y.name}_r", y.type, y.shape
        model.graph.append(node)
        model.graph.outputs[0] = out
        return ir.passes.PassResult(model, modified=True)


class Looker(Pass):
    """Reads the ``count`` analysis and remembers what it saw (never modifies)."""

    name = "look"
    seen: ClassVar[list] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        type(self).seen.append(self.context.analyses.get("count", model, self.context))
        return ir.passes.PassResult(model, modified=False)


def named(cls: type, name: str, **attrs) -> type:
    return type(f"{cls.__name__}_{name}", (cls,), {"name": name, **attrs})


@pytest.fixture
def counting_context() -> PipelineContext:
    ctx = PipelineContext(progress=False)
    calls = {"n": 0}

    def provider(model, context):
        calls["n"] += 1
        return calls["n"]

    ctx.analyses.providers["count"] = provider
    Looker.seen = []
    return ctx


def test_analysis_invalidated_by_modifying_pass_unless_preserved(counting_context):
    passes = [
        named(Looker, "look-1")(),
        named(AppendRelu, "modify")(),                               # drops "count"
        named(Looker, "look-2")(),
        named(AppendRelu, "modify-preserving", preserves=frozenset({"count"}))(),
        named(Looker, "look-3")(),
        named(Looker, "look-4")(),                                   # no modification at all
    ]
    run = Pipeline(passes, counting_context).run(_model())
    assert Looker.seen == [1, 2, 2, 2]
    rec = {r.name: r for r in run.records}
    assert rec["modify"].invalidated == ["count"]
    assert rec["modify-preserving"].invalidated == []
    assert rec["look-1"].modified is False and rec["modify"].modified is True
    assert counting_context.analyses.computed == ["count", "count"]


def test_stop_after(counting_context):
    passes = [named(AppendRelu, "a")(), named(AppendRelu, "b")(), named(AppendRelu, "c")()]
    run = Pipeline(passes, counting_context).run(_model(), stop_after="b")
    assert run.stopped_after == "b"
    assert [r.name for r in run.records] == ["a", "b"]
    assert M.op_counts(run.model)["Relu"] == 1 + 2
    full = Pipeline([named(AppendRelu, n)() for n in "abc"], counting_context).run(_model())
    assert full.stopped_after is None and len(full.records) == 3


def test_unknown_stop_after_fails_before_any_pass_runs(counting_context):
    class Boom(Pass):
        name = "boom"

        def call(self, model):
            raise AssertionError("must not run")

    with pytest.raises(BadInputError) as exc:
        Pipeline([Boom()], counting_context).run(_model(), stop_after="bom")
    assert "bom" in exc.value.message and "boom" in exc.value.hint


def test_duplicate_pass_names_rejected():
    with pytest.raises(BadInputError, match="duplicate"):
        Pipeline([named(AppendRelu, "x")(), named(AppendRelu, "x")()])


def test_precondition_error_becomes_pass_error():
    class Picky(Pass):
        name = "picky"

        def requires(self, model):
            raise ir.passes.PreconditionError("needs a Gemm")

        def call(self, model):
            return ir.passes.PassResult(model, modified=False)

    with pytest.raises(PassError, match="picky") as exc:
        Pipeline([Picky()]).run(_model())
    assert exc.value.pass_name == "picky" and "needs a Gemm" in str(exc.value)


def test_pass_record_op_diff_and_json(counting_context):
    run = Pipeline([named(AppendRelu, "a")(), named(Looker, "l")()], counting_context).run(
        _model())
    a, look = run.records
    assert a.op_diff == {"Relu": 1}
    assert look.op_diff == {}
    assert a.ops_after["Relu"] == a.ops_before["Relu"] + 1
    j = a.to_json()
    assert j["name"] == "a" and j["index"] == 1 and j["op_diff"] == {"Relu": 1}
    assert j["modified"] is True and j["seconds"] >= 0 and j["peak_rss_mb"] > 0
    assert a.repr.startswith("AppendRelu_a(")


def test_dump_ir_writes_numbered_models(tmp_path, counting_context):
    dump = tmp_path / "dump"
    passes = [named(AppendRelu, "first")(), named(Looker, "look")(),
              named(AppendRelu, "third")()]
    Pipeline(passes, counting_context, [DumpIR(dump)]).run(_model())
    files = sorted(p.name for p in dump.iterdir() if p.suffix == ".onnx")
    assert files == ["001_first.onnx", "002_look.onnx", "003_third.onnx"]
    relus = [sum(n.op_type == "Relu" for n in onnx.load(str(dump / f)).graph.node)
             for f in files]
    assert relus == [2, 2, 3]


def test_instruments_and_snapshots(counting_context):
    events = []

    class Spy(Instrument):
        def before_pass(self, p, model, record):
            events.append(("before", p.name))

        def after_pass(self, p, model, record):
            events.append(("after", p.name, record.modified))

    run = Pipeline([named(AppendRelu, "a")(), named(AppendRelu, "b")()], counting_context,
                   [Spy()]).run(_model(), snapshot_after=["a"])
    assert events == [("before", "a"), ("after", "a", True), ("before", "b"), ("after", "b", True)]
    assert set(run.snapshots) == {"a"}
    # the snapshot is a copy: it does not see pass b's edit
    assert M.op_counts(run.snapshots["a"])["Relu"] == 2
    assert M.op_counts(run.model)["Relu"] == 3


def test_pass_repr_and_describe():
    from lbcc.passes import PASSES

    assert {"capture-normalize", "calibrate", "select-precision", "round-weights-rtn",
            "insert-qdq", "fuse-ort", "cleanup"} <= set(PASSES)
    for name, cls in PASSES.items():
        assert cls.name == name and name == name.lower() and " " not in name
    pipe = build_pipeline(preset("w4a16"), get_target("ort-int8"), PipelineContext())
    lines = pipe.describe()
    assert len(lines) == len(pipe.passes)
    assert "capture-normalize" in lines[0] and "CaptureNormalize(" in lines[0]


def _per_tensor_dynamic():
    from lbcc.recipes import recipe_from_dict

    return recipe_from_dict({"weights": {"group_size": "channel"},
                             "activations": {"mode": "dynamic"}}, default_base="w8a8")


@pytest.mark.parametrize("make,has,lacks", [
    (lambda: preset("w8a8"), ["calibrate", "insert-qdq"], []),
    (lambda: preset("w8a8-dynamic"), [], ["calibrate"]),
    (_per_tensor_dynamic, ["insert-qdq"], ["calibrate"]),
    (lambda: preset("w4a16"), [], ["calibrate", "insert-qdq"]),
], ids=["w8a8", "w8a8-dynamic", "dynamic-per-tensor", "w4a16"])
def test_build_pipeline_per_preset(make, has, lacks):
    names = build_pipeline(make(), get_target("ort-int8"), PipelineContext()).names
    assert names[0] == "capture-normalize"
    for required in ("select-precision", "round-weights-rtn", "lower-ort", "verify"):
        assert required in names
    assert names.index("select-precision") < names.index("round-weights-rtn") < names.index(
        "lower-ort") < names.index("verify")
    assert names[-1] == "verify"
    for n in has:
        assert n in names
    for n in lacks:
        assert n not in names
    if "calibrate" in names:
        assert names.index("calibrate") < names.index("select-precision")
    if "insert-qdq" in names:
        assert names.index("round-weights-rtn") < names.index("insert-qdq") < names.index(
            "lower-ort")


# ----------------------------------------------------------------------------- public API names

def test_lazy_api_functions_survive_submodule_imports():
    """``lbcc.capture`` / ``lbcc.evaluate`` are functions named like their submodules: importing
    the submodules (``lbcc.compile`` does) must not replace the functions on the package."""
    import subprocess
    import sys

    code = ("import lbcc, lbcc.capture, lbcc.evaluate\n"
            "print(callable(lbcc.capture), callable(lbcc.evaluate), callable(lbcc.compile))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "True"], proc.stdout


def test_lazy_api_names_resolve():
    import lbcc

    for name in ("compile", "build_pipeline", "Pipeline", "Recipe", "preset", "load_recipe",
                 "BadInputError", "TargetError"):
        assert getattr(lbcc, name) is not None
    with pytest.raises(AttributeError):
        lbcc.no_such_thing  # noqa: B018
