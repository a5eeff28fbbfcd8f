"""Target ``ort-int8``: an ONNX graph that ONNX Runtime's CPU provider runs in int8 / int4.

Static W8A8 is emitted as QDQ (uint8 activations per tensor, int8 weights per channel, stored as
uint8 + 128 when the recipe is saturation-safe, see ``lowering``), which
ONNX Runtime fuses into ``MatMulIntegerToFloat`` at load; per-tensor dynamic W8A8 as
``DynamicQuantizeMatMul``; per-token dynamic W8A8 as ``MatMulIntegerToFloat`` on a
per-row quantized input; grouped weights (4-bit, or 8-bit with per-block dynamic activations)
as ``MatMulNBits`` with ``accuracy_level=4`` (activations quantized to int8 per block inside the
kernel) and ``GatherBlockQuantized`` for the embedding; sibling MatMulNBits reading one input
(a SwiGLU MLP's gate and up projections) are packed into one (``pack-nbits``), and a constant
bias after a MatMulNBits goes into its bias input (``fold-nbits-bias``). With
``--kv-cache-dtype int8`` the attention keeps its KV cache in int8 (``quantize-kv-cache``). A cache-free
graph's causal attention (rotary, grouped-query heads, causal mask) becomes one
``GroupQueryAttention`` a layer (``fuse-attention``, :mod:`lbcc.passes.causal_attention`).
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
        activation_modes={8: frozenset({"static", "dynamic", "dynamic-block", "dynamic-token",
                                        "none"}),
                          4: frozenset({"none", "dynamic-block"})},
        activation_dtype="uint8",
        quantizable_ops=frozenset({"MatMul", "Gemm", "Gather"}),
        weight_layout_for_mode={"static": "channel", "dynamic": "channel",
                                "dynamic-token": "channel", "dynamic-block": "group"},
        kv_cache_dtypes=frozenset({"float", "int8"}),
        # FP8 runs as float MatMuls on the E4M3 values (no FP8 kernels on ORT's CPU provider)
        fp8_activation_modes=frozenset({"dynamic-token", "none"}),
    )

    def passes(self, recipe: Any, kv_cache_dtype: str = "float") -> list:
        from lbcc.passes.causal_attention import FuseAttention
        from lbcc.passes.cleanup import Cleanup
        from lbcc.targets.ort_int8.lowering import LowerORT
        from lbcc.targets.ort_int8.packing import FoldNBitsBias, PackNBits, PackQKV
        from lbcc.targets.ort_int8.verify import Verify

        kv = []
        if kv_cache_dtype == "int8":
            from lbcc.targets.ort_int8.kv_cache import QuantizeKVCache

            kv = [QuantizeKVCache()]
        return [FuseAttention(), LowerORT(uint8_weights=recipe.weights.saturation_safe),
                PackQKV(), PackNBits(), FoldNBitsBias(), *kv, Cleanup(), Verify()]

    def emit(self, model: ir.Model, path: Path, external_data: bool | None = None,
             **_: Any) -> list[Path]:
        from lbcc.irutils import initializer_bytes
        from lbcc.modelio import EXTERNAL_DATA_THRESHOLD

        path = Path(path)
        if external_data is None:  # the same rule save_model applies
            external_data = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
        save_model(model, path, external_data=external_data)
        return [path, path.with_name(path.name + ".data")] if external_data else [path]
