"""Where the weights are: every MatMul / Gather, either a quantizable site or a reason why not.

A site is a node that consumes a 2-D float initializer as a weight:
- ``matmul``: ``MatMul(x, W[K, N])``;
- ``matmul-transposed``: ``MatMul(x, Transpose(W[N, K]))``, the form a tied ``lm_head`` takes;
- ``gather``: ``Gather(W[V, D], ids)``, an embedding table.
Everything else (attention's activation x activation MatMuls, index Gathers) is listed with the
reason it is not a site, so the report can account for every MatMul/Gemm/Gather.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from lbcc.irutils import layer_name

WEIGHT_OPS = ("MatMul", "Gemm", "Gather")


@dataclasses.dataclass
class Site:
    node: ir.Node
    kind: str  # matmul | matmul-transposed | gather
    weight: ir.Value
    layer: str

    @property
    def activation(self) -> ir.Value | None:
        return self.node.inputs[0] if self.kind != "gather" else None


def _float_2d_initializer(value: ir.Value | None) -> bool:
    return (value is not None and value.const_value is not None
            and value.const_value.dtype.is_floating_point() and len(value.const_value.shape) == 2)


def find_sites(model: ir.Model) -> tuple[list[Site], list[tuple[ir.Node, str]]]:
    sites: list[Site] = []
    skipped: list[tuple[ir.Node, str]] = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_OPS:
            continue
        name = layer_name(node)
        if node.op_type == "Gemm":
            skipped.append((node, "Gemm left after capture-normalize (not lowered to MatMul)"))
        elif node.op_type == "MatMul":
            w = node.inputs[1]
            producer = w.producer() if w is not None else None
            if _float_2d_initializer(w):
                sites.append(Site(node, "matmul", w, name))
            elif (producer is not None and producer.op_type == "Transpose"
                  and _float_2d_initializer(producer.inputs[0])
                  and list(producer.attributes.get_ints("perm", [1, 0])) == [1, 0]):
                sites.append(Site(node, "matmul-transposed", producer.inputs[0], name))
            elif producer is not None and producer.op_type == "DequantizeLinear":
                skipped.append((node, "weight is already quantized (DequantizeLinear input)"))
            elif w is not None and w.const_value is not None:
                skipped.append((node, f"constant weight is not a 2-D float matrix "
                                      f"(shape {list(w.const_value.shape)}, "
                                      f"{w.const_value.dtype.name})"))
            else:
                skipped.append((node, "both inputs are activations (e.g. attention scores x "
                                      "values): there is no weight to quantize"))
        else:  # Gather
            data = node.inputs[0]
            if _float_2d_initializer(data) and node.attributes.get_int("axis", 0) == 0:
                sites.append(Site(node, "gather", data, name))
            elif data is not None and data.const_value is not None:
                skipped.append((node, "gathers from a small or non-float constant, not an "
                                      "embedding table"))
            else:
                skipped.append((node, "gathers from an activation (shape / index arithmetic)"))
    return sites, skipped


def activation_tensors(sites: list[Site]) -> list[str]:
    """Distinct activation inputs of MatMul sites, in graph order (what calibration observes)."""
    seen: dict[str, None] = {}
    for s in sites:
        if s.activation is not None and s.activation.name:
            seen.setdefault(s.activation.name, None)
    return list(seen)
