"""``verify``: prove ONNX Runtime's CPU provider can run the result before anything is written.

1. every op is a standard ONNX op at the model's opset or one of the contrib ops this target emits
   (else :class:`TargetError`, exit code 2, naming the op and its layer);
2. ``onnx.checker`` on the saved graph (by path, so models over 2 GB work);
3. an ONNX Runtime CPU session loads it (kernels exist for every op / dtype pair) and one short
   smoke input runs with finite outputs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from lbcc.errors import TargetError
from lbcc.irutils import layer_name
from lbcc.pipeline import Pass

#: contrib ops (com.microsoft) this target may emit or keep
CONTRIB_OPS = frozenset({
    "MatMulNBits", "DynamicQuantizeMatMul", "GatherBlockQuantized", "MatMulIntegerToFloat",
    "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
    "MultiHeadAttention", "GroupQueryAttention", "QLinearMatMul",
})


def check_ops(model: ir.Model) -> None:
    opset = model.opset_imports.get("", 21)
    for node in model.graph:
        if node.domain in ("", "ai.onnx"):
            if node.op_type == "SimplifiedLayerNormalization":
                continue  # registered by ONNX Runtime in the default domain
            try:
                onnx.defs.get_schema(node.op_type, opset, "")
            except onnx.defs.SchemaError:
                raise TargetError(f"op {node.op_type!r} (layer {layer_name(node)!r}) is not an "
                                  f"ONNX op at opset {opset}.", "Remove or replace it.") from None
        elif node.domain == "com.microsoft":
            if node.op_type not in CONTRIB_OPS:
                raise TargetError(f"contrib op {node.op_type!r} (layer {layer_name(node)!r}) is "
                                  "not one the ort-int8 target emits.",
                                  f"Supported contrib ops: {', '.join(sorted(CONTRIB_OPS))}.")
        else:
            raise TargetError(f"op {node.domain}::{node.op_type} (layer {layer_name(node)!r}) "
                              "cannot run on ONNX Runtime's CPU provider.",
                              "It is probably a fusion helper function left in the graph; "
                              "report it as a bug with the model.")


def smoke_inputs(session) -> dict[str, np.ndarray]:
    from lbcc.kvcache import kv_layout

    layout = kv_layout(session)
    if layout is not None:  # a KV-cache graph: 8 new tokens after 3 cached ones
        past = [np.zeros((1, layout.kv_heads, 3, layout.head_dim), layout.dtype)
                for _ in range(2 * layout.num_layers)]
        return layout.feed(np.ones((1, 8), np.int64), past, 3)
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) else (1 if i == 0 else 8) for i, d in enumerate(inp.shape)]
        if "int" in inp.type:
            feeds[inp.name] = np.ones(shape, dtype=np.int64 if "int64" in inp.type else np.int32)
        else:
            feeds[inp.name] = np.zeros(shape, dtype=np.float32)
    return feeds


class Verify(Pass):
    """Op allowlist, onnx checker and an ONNX Runtime load + smoke run of the final graph."""

    name = "verify"
    preserves = frozenset({"activation-stats"})

    def __init__(self, smoke_run: bool = True):
        super().__init__()
        self.smoke_run = smoke_run

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import onnxruntime as ort

        from lbcc.modelio import save_model

        check_ops(model)
        with tempfile.TemporaryDirectory(prefix="lbcc-verify-") as tmp:
            # ONNX Runtime registers SimplifiedLayerNormalization in the default domain, which the
            # onnx checker does not know: check a copy where it sits in com.microsoft instead
            ort_default = [n for n in model.graph
                           if n.domain == "" and n.op_type == "SimplifiedLayerNormalization"]
            for n in ort_default:
                n.domain = "com.microsoft"
            if ort_default:
                model.opset_imports.setdefault("com.microsoft", 1)
            try:
                check_path = save_model(model, Path(tmp) / "check.onnx", external_data=True)
            finally:
                for n in ort_default:
                    n.domain = ""
            path = save_model(model, Path(tmp) / "verify.onnx", external_data=True)
            try:
                onnx.checker.check_model(str(check_path))
            except onnx.checker.ValidationError as exc:
                raise TargetError(f"the compiled graph fails the ONNX checker: {str(exc)[:400]}",
                                  "This is a bug in a pass; run with --dump-ir DIR to find which."
                                  ) from None
            so = ort.SessionOptions()
            so.log_severity_level = 3
            try:
                sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise TargetError(f"ONNX Runtime's CPU provider cannot load the compiled graph: "
                                  f"{str(exc)[:400]}", "An op / dtype pair has no CPU kernel; "
                                  "choose another preset or report the model.") from None
            if self.smoke_run:
                outs = sess.run(None, smoke_inputs(sess))
                bad = [o.name for o, v in zip(sess.get_outputs(), outs)
                       if np.issubdtype(np.asarray(v).dtype, np.floating)
                       and np.isnan(v).any()]
                if bad:
                    raise TargetError(f"the compiled graph produces NaN in {bad} on a smoke "
                                      "input.", "Inspect the per-layer report for a layer whose "
                                      "scales are degenerate.")
        self.note("ops_checked", len(model.graph))
        return ir.passes.PassResult(model, modified=False)
