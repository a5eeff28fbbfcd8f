"""lbcc: a compiler for low-bit large language models.

    import lbcc
    result = lbcc.compile("model.onnx", target="ort-int8", preset="w4a16")
    result.save("model.w4a16.onnx", report_path="report.json")

The pipeline is importable for pass-level work: ``lbcc.Pipeline``, ``lbcc.build_pipeline``,
``lbcc.passes.PASSES``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["compile", "capture", "build_pipeline", "Pipeline", "PipelineContext", "Recipe",
           "preset", "load_recipe", "evaluate", "LbccError", "BadInputError", "TargetError",
           "AccuracyGateError", "__version__"]

# ``capture`` and ``evaluate`` are both submodules and public functions: import them eagerly so
# the package attribute is the function (a lazy import would leave the module object there).
from lbcc.capture import capture  # noqa: E402
from lbcc.evaluate import evaluate  # noqa: E402

_LAZY = {
    "compile": ("lbcc.api", "compile"),
    "build_pipeline": ("lbcc.api", "build_pipeline"),
    "CompileResult": ("lbcc.api", "CompileResult"),
    "Pipeline": ("lbcc.pipeline", "Pipeline"),
    "PipelineContext": ("lbcc.pipeline", "PipelineContext"),
    "Recipe": ("lbcc.recipes", "Recipe"),
    "preset": ("lbcc.recipes", "preset"),
    "load_recipe": ("lbcc.recipes", "load_recipe"),
    "LbccError": ("lbcc.errors", "LbccError"),
    "BadInputError": ("lbcc.errors", "BadInputError"),
    "TargetError": ("lbcc.errors", "TargetError"),
    "AccuracyGateError": ("lbcc.errors", "AccuracyGateError"),
    "gated_compile": ("lbcc.gates", "gated_compile"),
}


#: submodules reachable as attributes without an explicit import (``lbcc.debug.compare``)
_SUBMODULES = ("debug", "bisect", "gates", "accuracy")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"lbcc.{name}")
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'lbcc' has no attribute {name!r}")
