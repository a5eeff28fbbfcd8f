"""Small helpers the IR lacks: layer identity, metadata propagation, initializers, op histograms.

Layer identity: exported initializers are named ``val_123``; the module path lives in node metadata
(``pkg.torch.onnx.name_scopes``, a Python-literal list whose second-to-last entry is the module,
e.g. ``model.layers.3.mlp.down_proj``). ``capture-normalize`` resolves it once into ``lbcc.layer``;
every node a pass inserts copies that key from the node it replaces, so reports keep their names.
"""

from __future__ import annotations

import ast
import collections
import contextlib
from typing import Iterable, Iterator

import numpy as np
import onnx_ir as ir

LAYER_KEY = "lbcc.layer"
PLAN_KEY = "lbcc.plan"
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
#: Prefix of the wrapper module lbcc puts around a Hugging Face model before export.
WRAPPER_PREFIX = "lbcc_wrapped."


def _module_from_scopes(raw: str) -> str | None:
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list) or len(scopes) < 2:
        return None
    module = str(scopes[-2])
    if module.startswith(WRAPPER_PREFIX):
        module = module[len(WRAPPER_PREFIX):]
    elif module + "." == WRAPPER_PREFIX:
        module = ""
    return module or None


def layer_name(node: ir.Node) -> str:
    """The user-facing layer name of ``node``: its module path, else the node name."""
    name = node.metadata_props.get(LAYER_KEY)
    if name:
        return name
    raw = node.metadata_props.get(NAME_SCOPES_KEY)
    module = _module_from_scopes(raw) if raw else None
    return module or node.name or node.op_type


def copy_identity(src: ir.Node, dst: ir.Node) -> None:
    """Give ``dst`` the layer identity of ``src`` (inserted nodes keep the replaced node's name)."""
    dst.metadata_props[LAYER_KEY] = layer_name(src)
    for key in (NAME_SCOPES_KEY, "namespace"):
        if key in src.metadata_props:
            dst.metadata_props[key] = src.metadata_props[key]


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy array behind an initializer / constant value, or None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """Register a new initializer with a unique name derived from ``name``."""
    tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(array)
    unique = name
    i = 1
    while unique in graph.initializers:
        unique = f"{name}_{i}"
        i += 1
    tensor.name = unique
    value = ir.Value(name=unique, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def op_histogram(model: ir.Model) -> dict[str, int]:
    """Op counts over the main graph, keyed ``op`` or ``domain::op`` for non-default domains."""
    counts: collections.Counter[str] = collections.Counter()
    for node in model.graph:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] += 1
    return dict(sorted(counts.items()))


def initializer_bytes(model: ir.Model) -> int:
    """Bytes of all initializers, as stored (packed int4 counts half a byte per element)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)


def consumers(value: ir.Value) -> list[ir.Node]:
    return [use.node for use in value.uses()]


def weight_input(node: ir.Node) -> ir.Value | None:
    """The constant (weight) input of a MatMul/Gemm, if any: input 1 for MatMul/Gemm."""
    if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1:
        return node.inputs[1]
    return None


def iter_nodes(model: ir.Model, op_types: Iterable[str]) -> list[ir.Node]:
    ops = set(op_types)
    return [n for n in model.graph if n.op_type in ops and n.domain in ("", "ai.onnx")]


@contextlib.contextmanager
def extra_graph_io(io: list[ir.Value], values: Iterable[ir.Value]) -> Iterator[None]:
    """``values`` appended to a graph's inputs or outputs for the duration of the block.

    Removed one by one with ``pop``: onnx_ir's slice ``del`` drops them from the list but leaves
    each value flagged as a graph input / output, which later passes read (a tensor observed
    during calibration would look like a model output to them)."""
    n = len(io)
    io.extend(values)
    try:
        yield
    finally:
        while len(io) > n:
            io.pop()
