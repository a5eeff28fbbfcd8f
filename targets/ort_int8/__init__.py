"""Target ``ort-int8``: an ONNX graph that ONNX Runtime's CPU provider runs in int8 / int4.

Static W8A8 is emitted as QDQ (uint8 activations per tensor, int8 weights per channel), which
ONNX Runtime fuses into ``MatMulIntegerToFloat`` at load; dynamic W8A8 as
``DynamicQuantizeMatMul``; 4-bit weights as ``MatMulNBits`` (``accuracy_level=4``) and
``GatherBlockQuantized`` for the embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir

from lbcc.modelio import save_model
from lbcc.target import Capabilities

GROUPS = frozenset({16, 32, 64, 128, 256})


class OrtInt8Target:
    name = "ort-int8"
    capabilities = Capabilities(
        weight_bits=frozenset({4, 8}),
        weight_granularity={8: frozenset({None}) | GROUPS, 4: GROUPS},
        activation_modes={8: frozenset({"static", "dynamic", "none"}), 4: frozenset({"none"})},
        activation_dtype="uint8",
        quantizable_ops=frozenset({"MatMul", "Gemm", "Gather"}),
    )

    def passes(self, recipe: Any) -> list:
        from lbcc.passes.cleanup import Cleanup
        from lbcc.targets.ort_int8.lowering import LowerORT
        from lbcc.targets.ort_int8.verify import Verify

        return [LowerORT(), Cleanup(), Verify()]

    def emit(self, model: ir.Model, path: Path, external_data: bool | None = None,
             **_: Any) -> list[Path]:
        path = Path(path)
        save_model(model, path, external_data=external_data)
        data = path.with_name(path.name + ".data")
        return [path, data] if data.is_file() and external_data is not False else [path]
