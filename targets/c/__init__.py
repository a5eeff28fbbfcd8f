"""Target ``c``: portable C99 for microcontrollers, bit-exact with ONNX Runtime on integer ops.

The target takes the graph that ``insert-qdq`` leaves (the QDQ graph ``ort-int8`` would hand ONNX
Runtime, before any ORT-specific lowering), quantizes convolutions (``quantize-conv``), moves
QuantizeLinear above MaxPool/Reshape as ORT does (``hoist-quantize``), lowers it to a program of
kernel calls
(:mod:`.lowering`), gives every intermediate tensor an offset in one static arena
(:mod:`.planner`) and writes ``model.h``, ``model.c``, ``weights.c`` and the kernel runtime into
an output directory (:mod:`.emit`). ``reference.onnx`` beside them is the exact graph the C code
reproduces: ONNX Runtime on that file gives bit-identical integer results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir

from lbcc.pipeline import Pass
from lbcc.target import Capabilities


class PlanC(Pass):
    """``plan-c``: lower to C kernel calls and plan the arena; fails early on what C can't run.

    Leaves the graph as it is; the report gets the arena size, weight bytes and kernel counts.
    """

    name = "plan-c"
    preserves = frozenset({"activation-stats"})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from lbcc.targets.c import emit, planner
        from lbcc.targets.c.lowering import lower

        program = lower(model)
        self.note("memory", planner.plan(program))
        for k, v in emit.summary(program).items():
            self.note(k, v)
        return ir.passes.PassResult(model, modified=False)


class CTarget:
    name = "c"
    #: ``-o`` names a directory
    output_is_directory = True
    capabilities = Capabilities(
        weight_bits=frozenset({8}),
        weight_granularity={8: frozenset({None})},
        activation_modes={8: frozenset({"static", "none"})},
        activation_dtype="uint8",
        quantizable_ops=frozenset({"MatMul", "Gemm", "Gather", "Conv"}),
        weight_layout_for_mode={"static": "channel"},
        int8_weight_max_exact=63,  # bit-exact against ORT's u8 x s8 QDQ reference on AVX2
    )

    def passes(self, recipe: Any) -> list:
        from lbcc.passes.cleanup import Cleanup
        from lbcc.targets.c.convs import HoistQuantize, QuantizeConv

        convs = []
        if recipe.activations.mode == "static":
            acts = recipe.activations
            convs.append(QuantizeConv(method="mse" if acts.method == "output" else acts.method,
                                      percentile=acts.percentile,
                                      saturation_safe=recipe.weights.saturation_safe))
        return [*convs, HoistQuantize(), Cleanup(), PlanC()]

    def emit(self, model: ir.Model, path: Path, prefix: str = "lbcc_model",
             reference: bool = True, **_: Any) -> list[Path]:
        """Write the C sources into directory ``path``; returns the files written."""
        from lbcc.modelio import save_model
        from lbcc.targets.c import emit, planner
        from lbcc.targets.c.lowering import lower

        path = Path(path)
        program = lower(model)
        planner.plan(program)
        title = f"lbcc model '{model.graph.name or 'model'}' (target c)"
        written = emit.write(program, path, prefix=prefix, title=title)
        if reference:
            written.append(save_model(model, path / "reference.onnx", external_data=False))
        return written
