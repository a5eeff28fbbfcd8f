"""``quantize-kv-cache``: an int8 KV cache for ONNX Runtime's ``GroupQueryAttention``.

ONNX Runtime's CPU ``GroupQueryAttention`` keeps its past / present caches in int8 when given
``kv_cache_bit_width = 8`` and the scales ``k_scale`` / ``v_scale`` (inputs 12 and 13): each new
key / value is stored as ``q = clip(rint(x / s), -128, 127)`` and read back as ``q * s`` inside the
kernel. With ``PER_CHANNEL`` scales ``s[h, d]`` (one per KV head and head channel) a channel
whose keys are large, as rotary keys often are in a few channels, does not cost the others
their resolution.

The scales come from the graph as compiled (weights already rounded, kernels already chosen):
the pass runs it on the calibration feed, with an empty past so that ``present.N.key`` /
``present.N.value`` hold the rotated keys and the values of every calibration token, and takes
``s[h, d] = headroom * max |x[h, :, d]| / 127`` per layer. The kernel saturates what falls
outside the range, and a key a little larger than any the calibration windows showed is common
(measured on a tiny random Llama: 25 % beyond its 128 calibration tokens' maximum in one channel);
``headroom = 1.25`` keeps such keys exact for a quarter more rounding step, whose noise stays
below 0.5 % of a channel's range at int8. Halving the cache's bytes halves what a decode
step reads from it; the weights and the attention arithmetic are unchanged (the kernel
dequantizes into float).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from lbcc.errors import BadInputError, TargetError
from lbcc.irutils import add_initializer
from lbcc.pipeline import Pass

MS = "com.microsoft"
#: GroupQueryAttention inputs: past key / value, and the int8 cache's k_scale / v_scale
_PAST_KEY, _PAST_VALUE, _K_SCALE, _V_SCALE = 3, 4, 12, 13
INT8_MAX = 127


def _cache_absmax(model: ir.Model, feed: Any, names: list[str]) -> dict[str, np.ndarray]:
    """Per ``present`` output: ``max |x|`` over batch and positions, shape [kv_heads, head_dim].
    Calibration windows longer than the model's context (the fused rotary's table) are cut."""
    from lbcc.calibration import _session
    from lbcc.kvcache import max_positions, prefill_inputs
    from lbcc.modelio import save_model

    context = max_positions(model.metadata_props)
    absmax: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="lbcc-kv-") as tmp:
        sess = _session(save_model(model, Path(tmp) / "kv.onnx", external_data=True))
        for sample in feed.samples(model):
            if context and sample["input_ids"].shape[1] > context:
                sample = prefill_inputs(model, sample["input_ids"][:, :context])
            for name, arr in zip(names, sess.run(names, sample)):
                m = np.abs(arr).max(axis=(0, 2))
                absmax[name] = m if name not in absmax else np.maximum(absmax[name], m)
    return absmax


class QuantizeKVCache(Pass):
    """Every GroupQueryAttention's cache -> int8 with per-channel scales from calibration."""

    name = "quantize-kv-cache"

    def __init__(self, headroom: float = 1.25):
        super().__init__()
        self.headroom = headroom

    def options(self) -> dict[str, Any]:
        return {"headroom": self.headroom}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from lbcc.kvcache import kv_layout

        if kv_layout(model) is None:
            raise BadInputError("an int8 KV cache needs a KV-cache graph; this one has no "
                                "past_key_values inputs.",
                                "Compile with --kv-cache (a Hugging Face or GGUF source).")
        if self.context.calibration is None:
            raise BadInputError("--kv-cache-dtype int8 takes the cache's scales from "
                                "calibration data, and none was given.",
                                "Pass --calib FILE.txt --tokenizer T.")
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        outputs = {v.name: v for v in graph.outputs}
        attns = [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == MS]
        caches = []  # (attention, past key, past value, present key, present value)
        for gqa in attns:
            past = [gqa.inputs[i] if i < len(gqa.inputs) else None
                    for i in (_PAST_KEY, _PAST_VALUE)]
            present = list(gqa.outputs[1:3])
            if any(v is None or inputs.get(v.name) is not v for v in past) or any(
                    outputs.get(v.name) is not v for v in present):
                raise TargetError(f"{gqa.name}: its past / present caches are not graph inputs "
                                  "and outputs, so they cannot change type.",
                                  "Use --kv-cache-dtype float for this model.")
            caches.append((gqa, *past, *present))
        others = [v for v in graph.inputs if v.name.startswith("past_key_values.")
                  and not any(v is c[1] or v is c[2] for c in caches)]
        if not caches or others:
            raise TargetError(
                "an int8 KV cache needs every layer's attention fused into GroupQueryAttention"
                + (f"; {len(others)} cache inputs feed something else" if others else "") + ".",
                "Use --kv-cache-dtype float, or see the fuse-kv-attention notes for why the "
                "attention did not fuse.")
        names = [v.name for c in caches for v in c[3:]]
        absmax = _cache_absmax(model, self.context.calibration, names)
        scales = {}
        for gqa, past_k, past_v, present_k, present_v in caches:
            if len(gqa.inputs) <= _V_SCALE:
                gqa.resize_inputs(_V_SCALE + 1)
            for slot, present in ((_K_SCALE, present_k), (_V_SCALE, present_v)):
                s = (self.headroom * np.maximum(absmax[present.name], 1e-8)
                     / INT8_MAX).astype(np.float32)
                gqa.replace_input_with(slot, add_initializer(graph, f"{present.name}_scale", s))
                scales[present.name] = [float(s.min()), float(np.median(s)), float(s.max())]
            gqa.attributes["kv_cache_bit_width"] = ir.AttrInt64("kv_cache_bit_width", 8)
            for key in ("k_quant_type", "v_quant_type"):
                gqa.attributes[key] = ir.AttrString(key, "PER_CHANNEL")
            for v in (past_k, past_v, present_k, present_v):
                v.type = ir.TensorType(ir.DataType.INT8)
        self.note("layers", len(caches))
        self.note("quant_type", "int8 symmetric, PER_CHANNEL (one scale per KV head and channel)")
        self.note("scale_min_median_max", dict(list(scales.items())[:4]))
        return ir.passes.PassResult(model, modified=True)
