"""``round-weights-rtn``: round every planned weight to integers and put it behind DequantizeLinear.

Each weight initializer is quantized once, in the orientation it is stored, and replaced for its
planned consumers by ``DequantizeLinear(q, scale[, zero_point])`` (opset 21: int4/uint4 and
``block_size`` for groups; ``float8e4m3fn`` q for FP8 weights, per channel). Orientation, with
N output channels and K the reduction axis:

- ``MatMul(x, W[K, N])``: per-channel ``axis=1`` (scale[N]); groups ``axis=0``, scale[K/g, N];
- ``MatMul(x, Transpose(W[N, K]))`` and ``Gather(W[N, K])``: per-channel ``axis=0``; groups
  ``axis=1``, scale[N, K/g]. A tied embedding / lm_head therefore shares one integer tensor.

Rounding is round-to-nearest with a per-group clip ratio chosen to minimize the reconstruction
error weighted by the input's per-channel mean square E[x_k^2] when calibration statistics exist
(see :mod:`lbcc.numerics`). The graph stays standard ONNX and runs in ONNX Runtime as is; the
target's lowering turns these patterns into its integer kernels. Weight rounding changes
activations only by the rounding noise, so the activation statistics are declared preserved.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lbcc.irutils import add_initializer, copy_identity
from lbcc.numerics import QuantizedWeight, quantize_weight, quantize_weight_e4m3, relative_error
from lbcc.pipeline import Pass
from lbcc.passes.calibrate import ACTIVATION_STATS
from lbcc.passes.precision import plan_of
from lbcc.passes.sites import Site, find_sites


def _int_dtype(bits: int, symmetric: bool) -> Any:
    if bits in (7, 8):  # 7: int8 storage of values in [-64, 63] (saturation-safe)
        return np.int8 if symmetric else np.uint8
    if bits == 4:
        return ml_dtypes.int4 if symmetric else ml_dtypes.uint4
    raise ValueError(f"unsupported bit width {bits}")


def dequantize_node(qw: QuantizedWeight, stored_transposed: bool, graph: ir.Graph, base: str
                    ) -> ir.Node:
    """DequantizeLinear for ``qw`` (out-major [N, K]); stored as [K, N] when ``stored_transposed``."""
    dtype = ml_dtypes.float8_e4m3fn if qw.format == "e4m3" else _int_dtype(qw.bits, qw.symmetric)
    q, scale, zp = qw.q, qw.scale, qw.zero_point
    per_channel = qw.block_size >= q.shape[1]
    if stored_transposed:
        q = q.T
        scale, zp = scale.T, (zp.T if zp is not None else None)
        channel_axis, block_axis = 1, 0
    else:
        channel_axis, block_axis = 0, 1
    if per_channel:
        scale = scale.reshape(-1)
        zp = zp.reshape(-1) if zp is not None else None
    inputs = [add_initializer(graph, f"{base}_q", np.ascontiguousarray(q).astype(dtype)),
              add_initializer(graph, f"{base}_scale", np.ascontiguousarray(scale, np.float32))]
    if zp is not None:
        inputs.append(add_initializer(graph, f"{base}_zero_point",
                                      np.ascontiguousarray(zp).astype(dtype)))
    attrs: dict[str, Any] = {"axis": channel_axis if per_channel else block_axis}
    if not per_channel:
        attrs["block_size"] = qw.block_size
    return ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{base}_dq")


def resolve_clip(clip: str, obs: Any) -> str:
    """The clip search a weight gets: ``auto`` is ``mse`` with statistics, else ``none``;
    ``output`` needs the input's X^T X and degrades to ``mse`` / ``none`` without it."""
    if clip == "output" and (obs is None or obs.xtx is None):
        clip = "auto"
    if clip == "auto":
        clip = "mse" if obs is not None and obs.channel_mean_square() is not None else "none"
    return clip


def _scale_summary(scale: np.ndarray) -> dict[str, float]:
    return {"min": float(scale.min()), "median": float(np.median(scale)),
            "max": float(scale.max()), "count": int(scale.size)}


class RoundWeightsRTN(Pass):
    """Round-to-nearest (with MSE clip search) into DequantizeLinear form, per the plan."""

    name = "round-weights-rtn"
    method = "rtn"
    preserves = frozenset({ACTIVATION_STATS})

    def round_weight(self, w: np.ndarray, spec: dict[str, Any], obs: Any
                     ) -> tuple[QuantizedWeight, dict[str, Any]]:
        """Quantize out-major ``w[N, K]``; ``obs`` is the input's observer, if calibrated."""
        if spec.get("format") == "e4m3":
            return quantize_weight_e4m3(w), {"method": "rtn", "clip_used": "none",
                                             "importance_weighted": False}
        importance = obs.channel_mean_square() if obs is not None else None
        clip = resolve_clip(spec["clip"], obs)
        qw = quantize_weight(w, bits=spec.get("value_bits", spec["bits"]),
                             block_size=spec["group_size"], symmetric=spec["symmetric"], clip=clip,
                             importance=importance if clip == "mse" else None,
                             hessian=obs.xtx if clip == "output" else None)
        return qw, {"method": "rtn", "clip_used": clip,
                    "importance_weighted": clip == "mse" and importance is not None}

    def planned_weights(self, model: ir.Model) -> dict[str, list[tuple[Site, dict[str, Any]]]]:
        """Weight name -> the planned sites that read it, in graph order."""
        by_weight: dict[str, list[tuple[Site, dict[str, Any]]]] = {}
        for site in find_sites(model)[0]:
            plan = plan_of(site.node)
            if plan is not None:
                by_weight.setdefault(site.weight.name, []).append((site, plan))
        return by_weight

    def round_group(self, graph: ir.Graph, wname: str,
                    group: list[tuple[Site, dict[str, Any]]], stats: Any) -> float:
        """Round one weight for all its planned sites; returns its relative error."""
        layers = self.context.notes.setdefault("layers", {})
        weight = group[0][0].weight
        kinds = {s.kind for s, _ in group}
        if "matmul" in kinds and len(kinds) > 1:
            for s, _ in group:
                if s.kind != "matmul":
                    layers[s.node.name].update(
                        status="float", reason="weight is shared with a MatMul in another "
                        "orientation; left in float")
            group = [(s, p) for s, p in group if s.kind == "matmul"]
        spec = next((p["weight"] for s, p in group if s.kind != "gather"), group[0][1]["weight"])
        w = weight.const_value.numpy().astype(np.float32)
        stored_transposed = group[0][0].kind == "matmul"
        out_major = w.T if stored_transposed else w
        observers = [stats[s.activation.name] for s, _ in group
                     if stats is not None and s.activation is not None
                     and s.activation.name in stats]
        qw, how = self.round_weight(out_major, spec, observers[0] if observers else None)
        err = relative_error(out_major, qw)
        dq = dequantize_node(qw, stored_transposed, graph, wname)
        copy_identity(group[0][0].node, dq)
        graph.insert_before(_first_user(graph, [s.node for s, _ in group]), dq)
        dq.outputs[0].name = f"{wname}_dequantized"
        dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        dq.outputs[0].shape = ir.Shape(list(w.shape))
        for s, _ in group:
            if s.kind == "matmul-transposed":
                s.node.inputs[1].producer().replace_input_with(0, dq.outputs[0])
            elif s.kind == "matmul":
                s.node.replace_input_with(1, dq.outputs[0])
            else:
                s.node.replace_input_with(0, dq.outputs[0])
            layers[s.node.name]["weight"] = {
                **spec, **how, "rel_error": round(err, 6),
                "scale": _scale_summary(qw.scale), "dtype": dq.inputs[0].dtype.name,
                "block_size": None if qw.block_size >= out_major.shape[1] else qw.block_size}
        if not weight.uses():
            graph.initializers.pop(weight.name, None)
        return err

    def finish(self, n_weights: int, errors: list[float]) -> None:
        self.note("weights_rounded", n_weights)
        self.note("method", self.method)
        if errors:
            self.note("mean_rel_error", round(float(np.mean(errors)), 6))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        by_weight = self.planned_weights(model)
        stats = (self.context.analyses.get(ACTIVATION_STATS, model, self.context)
                 if self.context.analyses.has(ACTIVATION_STATS) else None)
        errors = [self.round_group(model.graph, w, g, stats) for w, g in by_weight.items()]
        self.finish(len(by_weight), errors)
        return ir.passes.PassResult(model, modified=bool(by_weight))


def _first_user(graph: ir.Graph, nodes: list[ir.Node]) -> ir.Node:
    """The earliest of ``nodes`` (or of the Transposes feeding them) in graph order."""
    candidates = set()
    for n in nodes:
        candidates.add(n)
        p = n.inputs[1].producer() if n.op_type == "MatMul" and n.inputs[1] is not None else None
        if p is not None and p.op_type == "Transpose":
            candidates.add(p)
    for node in graph:
        if node in candidates:
            return node
    return nodes[0]


class RoundWeightsGPTQ(RoundWeightsRTN):
    """GPTQ rounding (:mod:`lbcc.gptq`) with H = 2 X^T X / n from the calibration statistics.

    ``sequential=True`` (the paper's procedure): the weight inputs are taken in graph order in
    stages of ``stage_inputs`` distinct activations (4 = one Llama block: q/k/v, o, gate/up,
    down), and each stage's X^T X is measured on the model whose earlier stages are already
    rounded, so every layer compensates the error of the layers before it; only one stage's
    statistics are held at a time. ``sequential=False``: every H from the float model, in one
    calibration pass. A weight whose input has no statistics (an untied embedding) is rounded
    with RTN.
    """

    name = "round-weights-gptq"
    method = "gptq"

    def __init__(self, percdamp: float = 0.01, act_order: bool = True, block_size: int = 128,
                 sequential: bool = False, stage_inputs: int = 4):
        super().__init__()
        self.percdamp = percdamp
        self.act_order = act_order
        self.block_size = block_size
        self.sequential = sequential
        self.stage_inputs = stage_inputs

    def _need_calibration(self) -> None:
        if self.context.calibration is None:
            raise self.fail("GPTQ needs calibration data (the inputs' X^T X).",
                            "Pass --calib FILE.txt --tokenizer T (or .npz).")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._need_calibration()
        if self.sequential:
            return self._call_sequential(model)
        if not self.context.analyses.has(ACTIVATION_STATS) or not self.context.second_moments:
            self.context.second_moments = True
            self.context.analyses.invalidate(())
            self.context.analyses.get(ACTIVATION_STATS, model, self.context)
        return super().call(model)

    def _call_sequential(self, model: ir.Model) -> ir.passes.PassResult:
        from lbcc.calibration import collect_activation_stats
        from lbcc.passes.sites import activation_tensors

        by_weight = self.planned_weights(model)
        first_input: dict[str, str | None] = {}
        for wname, group in by_weight.items():
            acts = [s.activation.name for s, _ in group if s.activation is not None]
            first_input[wname] = acts[0] if acts else None
        order = [a for a in activation_tensors([s for g in by_weight.values() for s, _ in g])]
        stages = [order[i:i + self.stage_inputs] for i in range(0, len(order),
                                                                  self.stage_inputs)]
        errors: list[float] = []
        from lbcc.progress import track

        for stage in track(stages, description="GPTQ stages", enabled=self.context.progress):
            stats = collect_activation_stats(model, self.context.calibration, stage,
                                             progress=False, second_moments=True)
            for wname, group in list(by_weight.items()):
                if first_input[wname] in stage:
                    errors.append(self.round_group(model.graph, wname, group, stats))
                    del by_weight[wname]
        for wname, group in by_weight.items():  # no input activation: RTN
            errors.append(self.round_group(model.graph, wname, group, None))
        self.note("stages", len(stages))
        self.finish(len(errors), errors)
        return ir.passes.PassResult(model, modified=bool(errors))

    def round_weight(self, w: np.ndarray, spec: dict[str, Any], obs: Any
                     ) -> tuple[QuantizedWeight, dict[str, Any]]:
        from lbcc.gptq import gptq_quantize

        if obs is None or obs.xtx is None:
            qw, how = super().round_weight(w, spec, obs)
            return qw, {**how, "note": "no input statistics: RTN"}
        clip = resolve_clip(spec["clip"], obs)
        qw = gptq_quantize(w, obs.xtx, bits=spec.get("value_bits", spec["bits"]),
                           group_size=spec["group_size"],
                           symmetric=spec["symmetric"], percdamp=self.percdamp,
                           block_size=self.block_size, act_order=self.act_order, clip=clip,
                           fmt=spec.get("format", "int"))
        return qw, {"method": "gptq", "act_order": self.act_order, "percdamp": self.percdamp,
                    "clip_used": clip, "sequential": self.sequential}
