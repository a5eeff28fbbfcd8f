"""``calibrate``: run the current model in ONNX Runtime on the calibration feed and cache the
streaming statistics of every weight-site input as the ``activation-stats`` analysis.

The statistics are an analysis, not a graph change: a pass that modifies the model drops them
unless it declares that it preserves them, and the next pass that asks recomputes them.
"""

from __future__ import annotations

import time
from typing import Any

import onnx_ir as ir

from lbcc.calibration import ActivationObserver, collect_activation_stats
from lbcc.pipeline import Pass, PipelineContext
from lbcc.passes.sites import activation_tensors, find_sites

ACTIVATION_STATS = "activation-stats"


def compute_activation_stats(model: ir.Model, context: PipelineContext
                             ) -> dict[str, ActivationObserver]:
    """Analysis provider for ``activation-stats``."""
    if context.calibration is None:
        from lbcc.errors import BadInputError

        raise BadInputError("this pipeline needs calibration data (static activation ranges) "
                            "and none was given.", "Pass --calib FILE.txt --tokenizer T, or "
                            "--calib FILE.npz, or use a preset that does not calibrate "
                            "(w8a8-dynamic, w4a16).")
    sites, _ = find_sites(model)
    return collect_activation_stats(model, context.calibration, activation_tensors(sites),
                                    progress=context.progress,
                                    second_moments=context.second_moments,
                                    keep_rows=context.keep_rows)


class Calibrate(Pass):
    """Collects ``activation-stats`` (min/max, per-channel abs-max and mean square, histogram)."""

    name = "calibrate"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        start = time.perf_counter()
        stats = self.context.analyses.get(ACTIVATION_STATS, model, self.context)
        feed: Any = self.context.calibration
        self.note("feed", feed.describe() if feed is not None else None)
        self.note("tensors_observed", len(stats))
        self.note("seconds", round(time.perf_counter() - start, 2))
        return ir.passes.PassResult(model, modified=False)
