"""Generic lbcc passes, one family a module; :data:`PASSES` maps each pass name to its class."""

from __future__ import annotations

from lbcc.passes.awq import AWQ
from lbcc.passes.calibrate import Calibrate
from lbcc.passes.cleanup import Cleanup
from lbcc.passes.fusion import FuseKVAttention, FuseORT
from lbcc.passes.mixed_precision import MixedPrecision
from lbcc.passes.normalize import CaptureNormalize
from lbcc.passes.outliers import DetectOutliers
from lbcc.passes.precision import SelectPrecision
from lbcc.passes.qdq import InsertQDQ
from lbcc.passes.rounding import RoundWeightsGPTQ, RoundWeightsRTN
from lbcc.passes.smoothing import SmoothQuant

PASSES = {cls.name: cls for cls in (CaptureNormalize, Calibrate, DetectOutliers, SelectPrecision,
                                    RoundWeightsRTN, RoundWeightsGPTQ, SmoothQuant, AWQ,
                                    MixedPrecision, InsertQDQ, FuseORT, FuseKVAttention,
                                    Cleanup)}

__all__ = ["PASSES", "AWQ", "Calibrate", "CaptureNormalize", "DetectOutliers", "Cleanup",
           "FuseKVAttention", "FuseORT", "InsertQDQ", "MixedPrecision",
           "RoundWeightsGPTQ", "RoundWeightsRTN", "SelectPrecision", "SmoothQuant"]
