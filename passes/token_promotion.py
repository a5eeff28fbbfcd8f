"""Per-token int8 for float-fallback layers, chosen by their measured effect on the output.

``select-precision``'s tiers judge a layer by its own output SQNR: static per-tensor uint8 at
``min_sqnr_db``, per-token int8 at ``min_token_sqnr_db``, else ``token_fallback`` (float). A
layer's SQNR does not say what its error does to the model's predictions: the ``lm_head``'s error
is the logits' error and goes through nothing else, while an early layer's error passes through
every later one. With ``activations.promote_max_ppl_increase = x`` set, the layers the tiers left
in float are measured instead: for each candidate i alone (every other layer float), its input
quantized to symmetric int8 per token and its weight to int8 per output channel (what the
``dynamic-token`` lowering runs),

    KL_i = mean over calibration tokens of KL(p_float || p_i),   p = softmax(logits),

then candidates are promoted in order of KL per weight (per multiply-add moved to int8: the
cheapest accuracy for the most speed first) while the summed KL of the promoted stays
``<= log(1 + x)``: KL approximates the increase of the mean negative log-likelihood, so
``exp(sum KL) - 1`` estimates the perplexity increase of the promotions (treating layers as
additive, as ``mixed-precision`` does). A model that does not end in logits uses the relative
squared error of its output instead of KL.

One ONNX Runtime session serves every measurement: each candidate's input and weight pass through
``Where(switch_i, quantized, float)`` with ``switch_i`` an overridable boolean input (default
false), so run ``i`` flips one switch. The graph is restored afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import onnx_ir as ir

from lbcc.irutils import add_initializer
from lbcc.numerics import quantize_weight

SWITCH_PREFIX = "lbcc_promote_switch_"


def _per_token_fake_quant(x: ir.Value) -> list[ir.Node]:
    """Nodes computing ``s_t round(x_t / s_t)``, ``s_t = max(max_k |x_tk| / 127, 1e-30)``."""
    def const(array: np.ndarray) -> ir.Node:
        return ir.node("Constant", [], attributes={"value": ir.tensor(array)})

    c127, tiny = const(np.array(127, np.float32)), const(np.array(1e-30, np.float32))
    axes = const(np.array([-1], np.int64))
    absx = ir.node("Abs", [x])
    amax = ir.node("ReduceMax", [absx.outputs[0], axes.outputs[0]], attributes={"keepdims": 1})
    div = ir.node("Div", [amax.outputs[0], c127.outputs[0]])
    scale = ir.node("Max", [div.outputs[0], tiny.outputs[0]])
    xdiv = ir.node("Div", [x, scale.outputs[0]])
    q = ir.node("Round", [xdiv.outputs[0]])
    deq = ir.node("Mul", [q.outputs[0], scale.outputs[0]])
    return [c127, tiny, axes, absx, amax, div, scale, xdiv, q, deq]


def _quantized_weight(node: ir.Node, site_kind: str, weight: np.ndarray) -> np.ndarray:
    """The MatMul's B operand [K, N] with int8 symmetric per-output-channel rounding."""
    out_major = weight.T if site_kind == "matmul" else weight  # [N, K]
    q = quantize_weight(out_major, bits=8, symmetric=True, clip="none").dequantize()
    return np.ascontiguousarray(q.T, np.float32)


def _switch_names(n: int) -> list[str]:
    return [f"{SWITCH_PREFIX}{i}" for i in range(n)]


@contextlib.contextmanager
def _switched(model: ir.Model, sites: list[Any]) -> Iterator[list[str]]:
    """The graph with a switchable quantized path per site (see the module docstring), switch
    ``i`` named ``_switch_names(...)[i]``; yields the names, restores the graph on exit."""
    graph = model.graph
    added_nodes: list[ir.Node] = []
    added_inputs: list[ir.Value] = []
    rewired: list[tuple[ir.Node, int, ir.Value]] = []
    names = _switch_names(len(sites))
    try:
        for name, site in zip(names, sites):
            node = site.node
            switch = ir.Value(name=name, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.BOOL),
                              const_value=ir.tensor(np.array(False), name=name))
            graph.inputs.append(switch)
            graph.register_initializer(switch)
            added_inputs.append(switch)
            x, b = node.inputs[0], node.inputs[1]
            fq = _per_token_fake_quant(x)
            x_sel = ir.node("Where", [switch, fq[-1].outputs[0], x])
            bq = add_initializer(graph, f"{name}_weight",
                                 _quantized_weight(node, site.kind,
                                                   site.weight.const_value.numpy()))
            b_sel = ir.node("Where", [switch, bq, b])
            new = [*fq, x_sel, b_sel]
            graph.insert_before(node, new)
            added_nodes += new
            rewired += [(node, 0, x), (node, 1, b)]
            node.replace_input_with(0, x_sel.outputs[0])
            node.replace_input_with(1, b_sel.outputs[0])
        yield names
    finally:
        for node, index, value in reversed(rewired):
            node.replace_input_with(index, value)
        graph.remove(added_nodes, safe=True)  # also detaches them from their inputs
        for v in added_inputs:
            graph.inputs.pop(graph.inputs.index(v))
            graph.initializers.pop(v.name, None)
        for name in [n for n in graph.initializers if n.startswith(SWITCH_PREFIX)]:
            graph.initializers.pop(name)


def measure_promotion_kl(model: ir.Model, sites: list[Any], feed: Any, samples: int = 2,
                         tokens: int = 512, progress: bool = False) -> list[float]:
    """KL_i of each site in ``sites`` (see the module docstring), in order."""
    from lbcc.passes.sensitivity import calibration_inputs, measure_divergences

    on = np.array(True)
    return measure_divergences(model, calibration_inputs(feed, model, samples, tokens),
                               _switched(model, sites), _switch_names(len(sites)),
                               lambda name: {name: on}, "per-token KL", progress)


def choose_promotions(kls: list[float], weights: list[int], max_ppl_increase: float
                      ) -> list[bool]:
    """Greedy by KL per weight (ascending): promote while the summed KL <= log(1 + budget)."""
    budget = float(np.log1p(max_ppl_increase))
    order = sorted(range(len(kls)), key=lambda i: max(kls[i], 0.0) / max(weights[i], 1))
    chosen = [False] * len(kls)
    used = 0.0
    for i in order:
        if used + max(kls[i], 0.0) <= budget:
            chosen[i] = True
            used += max(kls[i], 0.0)
    return chosen
