"""``pack-nbits``: sibling MatMulNBits -> one MatMulNBits + a Slice each, bit-identical outputs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401 - registers ir.passes.common
import pytest

from lbcc.irutils import add_initializer, layer_name
from lbcc.targets.ort_int8.packing import PackNBits

ort = pytest.importorskip("onnxruntime")
MS = "com.microsoft"
K = 96


def _nbits(graph: ir.Graph, x: ir.Value, n: int, block: int, zp: bool, rng, name: str,
           accuracy_level: int = 4) -> ir.Node:
    nb = K // block
    inputs = [x, add_initializer(graph, f"{name}_B",
                                 rng.integers(0, 256, (n, nb, block // 2), dtype=np.uint8)),
              add_initializer(graph, f"{name}_s", (rng.random(n * nb) * 0.1).astype(np.float32))]
    if zp:
        inputs.append(add_initializer(graph, f"{name}_zp", rng.integers(
            0, 256, n * ((nb + 1) // 2), dtype=np.uint8)))
    node = ir.node("MatMulNBits", inputs, domain=MS, name=name,
                   attributes={"K": K, "N": n, "bits": 4, "block_size": block,
                               "accuracy_level": accuracy_level})
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    node.outputs[0].shape = ir.Shape(["s", n])
    graph.append(node)
    return node


def _model(zp: bool) -> ir.Model:
    """gate / up / odd siblings of one input (odd: another block size); the SwiGLU-like tail
    reads gate and up, and odd is a graph output of its own."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", shape=ir.Shape(["s", K]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21, MS: 1}, name="g")
    gate = _nbits(graph, x, 40, 32, zp, rng, "gate")
    up = _nbits(graph, x, 40, 32, zp, rng, "up")
    odd = _nbits(graph, x, 16, 16, zp, rng, "odd")
    sig = ir.node("Sigmoid", [gate.outputs[0]])
    mul = ir.node("Mul", [gate.outputs[0], sig.outputs[0]])
    prod = ir.node("Mul", [mul.outputs[0], up.outputs[0]])
    for n in (sig, mul, prod):
        graph.append(n)
    prod.outputs[0].name, odd.outputs[0].name = "y", "z"
    for v in (prod.outputs[0], odd.outputs[0]):
        v.type = ir.TensorType(ir.DataType.FLOAT)
    prod.outputs[0].shape = ir.Shape(["s", 40])
    graph.outputs.extend([prod.outputs[0], odd.outputs[0]])
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


@pytest.mark.parametrize("zp", [False, True])
def test_pack_nbits_packs_siblings_and_is_bit_identical(zp):
    model = _model(zp)
    x = np.random.default_rng(1).standard_normal((5, K)).astype(np.float32)
    before = _run(model, x)
    p = PackNBits()
    result = p(model)
    ir.passes.common.RemoveUnusedNodesPass()(result.model)
    assert result.modified and p.context.notes["pack-nbits"]["packed"] == 1
    nbits = [n for n in result.model.graph if n.op_type == "MatMulNBits"]
    assert sorted(n.attributes.get_int("N") for n in nbits) == [16, 80]  # gate|up, odd alone
    packed = next(n for n in nbits if n.attributes.get_int("N") == 80)
    assert len(packed.inputs) == (4 if zp else 3)
    slices = [u.node for u in packed.outputs[0].uses()]
    assert [n.op_type for n in slices] == ["Slice", "Slice"]
    # each sibling keeps an output of its own layer (what per-layer debugging compares by name)
    from lbcc.debug import layer_outputs

    outs = layer_outputs(result.model)
    assert [outs[layer_name(n)].producer() for n in slices] == slices
    assert len({layer_name(n) for n in slices}) == 2
    after = _run(result.model, x)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_pack_nbits_leaves_shared_weights_and_lone_nodes():
    """A weight another node reads (a tied embedding) is not repacked; one consumer: no change."""
    model = _model(zp=False)
    graph = model.graph
    up = next(n for n in graph if n.name == "up")
    ident = ir.node("Identity", [up.inputs[1]])
    graph.append(ident)
    ident.outputs[0].name = "w"
    graph.outputs.append(ident.outputs[0])
    p = PackNBits()
    assert not p(model).modified
    assert p.context.notes["pack-nbits"]["packed"] == 0


@pytest.mark.parametrize("zp", [False, True])
def test_fold_nbits_bias_is_bit_identical(zp):
    """``Add(MatMulNBits(x), b)`` -> MatMulNBits with its bias input: one node fewer, the same
    bits, and the output keeps the Add's name; an Add of a non-constant or of another width is
    left alone."""
    from lbcc.targets.ort_int8.packing import FoldNBitsBias

    rng = np.random.default_rng(0)
    x = ir.Value(name="x", shape=ir.Shape(["s", K]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21, MS: 1}, name="g")
    biased = _nbits(graph, x, 40, 32, zp, rng, "biased")
    add = ir.node("Add", [biased.outputs[0], add_initializer(
        graph, "b", rng.standard_normal(40).astype(np.float32))])
    other = _nbits(graph, x, 40, 32, zp, rng, "other")
    add_x = ir.node("Add", [other.outputs[0], add.outputs[0]])  # not a constant bias
    for n in (add, add_x):
        graph.append(n)
        n.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    add.outputs[0].name, add_x.outputs[0].name = "y", "z"
    graph.outputs.extend([add.outputs[0], add_x.outputs[0]])
    model = ir.Model(graph, ir_version=10)
    xs = rng.standard_normal((5, K)).astype(np.float32)
    before = _run(model, xs)
    p = FoldNBitsBias()
    result = p(model)
    assert p.context.notes["fold-nbits-bias"]["folded"] == 1
    assert [n.op_type for n in result.model.graph] == ["MatMulNBits", "MatMulNBits", "Add"]
    folded = next(n for n in result.model.graph if n.name == "biased")
    assert folded.inputs[5].name == "b" and folded.outputs[0].name == "y"
    after = _run(result.model, xs)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
