"""Small models built inside the tests (helpers, not tests).

ONNX graphs are made with ``onnx.helper`` at opset 18 (``capture-normalize`` upgrades them to 21);
weights come from a seeded generator so every build is identical. The torch Llama is a 2-layer
decoder (RMSNorm, q/k/v/o, SiLU-gated MLP, causal attention, tied embedding / lm_head) small
enough to export in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _weight(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int | None = None
            ) -> np.ndarray:
    fan_in = fan_in or shape[0]
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def _model(graph: onnx.GraphProto, opset: int = OPSET) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="lbcc-tests")
    model.ir_version = 8 if opset <= 18 else 10
    onnx.checker.check_model(model)
    return model


def mlp_model(k: int = 64, hidden: int = 96, n: int = 48, seq: int = 8, seed: int = 0,
              opset: int = OPSET, input_bias: bool = True) -> onnx.ModelProto:
    """x[1, S, K] float -> (Add(b0) ->) MatMul(W1[K, H]) -> Relu -> MatMul(W2[H, N]) -> y[1, S, N].

    ``input_bias=False`` feeds the graph input straight into the first MatMul.
    """
    rng = _rng(seed)
    w1 = _weight(rng, (k, hidden))
    w2 = _weight(rng, (hidden, n))
    b0 = (0.1 * rng.standard_normal(k)).astype(np.float32)
    first = "x0" if input_bias else "x"
    nodes = [
        *([helper.make_node("Add", ["x", "b0"], ["x0"], name="in_bias")] if input_bias else []),
        helper.make_node("MatMul", [first, "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, n])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                     *([numpy_helper.from_array(b0, "b0")] if input_bias else [])])
    return _model(graph, opset)


def gemm_model(k: int = 64, n: int = 48, out: int = 32, seq: int = 8, alpha: float = 0.5,
               beta: float = 2.0, seed: int = 1) -> onnx.ModelProto:
    """x[S, K] -> Add(b0) -> Gemm(W1[N, K], C1; transB=1, alpha, beta) -> Relu
    -> Gemm(W2[N, OUT], C2) -> y[S, OUT]."""
    rng = _rng(seed)
    w1 = _weight(rng, (n, k), fan_in=k)
    c1 = (0.1 * rng.standard_normal(n)).astype(np.float32)
    w2 = _weight(rng, (n, out))
    c2 = (0.1 * rng.standard_normal(out)).astype(np.float32)
    b0 = (0.1 * rng.standard_normal(k)).astype(np.float32)
    nodes = [
        helper.make_node("Add", ["x", "b0"], ["x0"], name="in_bias"),
        helper.make_node("Gemm", ["x0", "w1", "c1"], ["h"], name="gemm1", transB=1, alpha=alpha,
                         beta=beta),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "c2"], ["y"], name="gemm2"),
    ]
    graph = helper.make_graph(
        nodes, "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [seq, out])],
        initializer=[numpy_helper.from_array(a, name) for a, name in
                     ((w1, "w1"), (c1, "c1"), (w2, "w2"), (c2, "c2"), (b0, "b0"))])
    return _model(graph)


def tied_lm_model(vocab: int = 256, dim: int = 48, hidden: int = 80, seq: int = 16,
                  seed: int = 2, dynamic_seq: bool = False) -> onnx.ModelProto:
    """ids[1, S] int64 -> Gather(E[V, D]) -> MatMul(W1) -> Relu -> MatMul(W2) -> + residual
    -> MatMul(h, Transpose(E)) -> logits[1, S, V]  (a tied embedding / lm_head).

    Keep ``vocab * dim`` above 8192 elements so the constant folder leaves ``Transpose(E)`` alone.
    """
    rng = _rng(seed)
    emb = rng.standard_normal((vocab, dim)).astype(np.float32)
    w1 = _weight(rng, (dim, hidden))
    w2 = _weight(rng, (hidden, dim))
    s = "seq" if dynamic_seq else seq
    nodes = [
        helper.make_node("Gather", ["embed_tokens", "input_ids"], ["e"], name="embed", axis=0),
        helper.make_node("MatMul", ["e", "w1"], ["h1"], name="up_proj"),
        helper.make_node("Relu", ["h1"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["h2"], name="down_proj"),
        helper.make_node("Add", ["e", "h2"], ["h"], name="residual"),
        helper.make_node("Transpose", ["embed_tokens"], ["emb_t"], name="lm_head_t", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "emb_t"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes, "tied_lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, s])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, s, vocab])],
        initializer=[numpy_helper.from_array(emb, "embed_tokens"),
                     numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return _model(graph)


def relu_add_model() -> onnx.ModelProto:
    """Nothing to quantize: x -> Relu -> Add(b) -> y."""
    b = np.linspace(-1, 1, 16, dtype=np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "b"], ["y"])]
    graph = helper.make_graph(
        nodes, "relu_add", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        initializer=[numpy_helper.from_array(b, "b")])
    return _model(graph)


def masked_model(k: int = 64, n: int = 48, seq: int = 8, seed: int = 3) -> onnx.ModelProto:
    """x -> MatMul(W) -> Where(mask, -inf, .) -> Softmax: a legitimate -inf constant, the fill
    value of an attention mask (half of the columns are masked; the output is finite)."""
    rng = _rng(seed)
    w = _weight(rng, (k, n))
    mask = np.arange(n) % 2 == 1
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="proj"),
        helper.make_node("Where", ["mask", "neg_inf", "y"], ["masked"], name="fill"),
        helper.make_node("Softmax", ["masked"], ["out"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, k])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, seq, n])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(mask, "mask"),
                     numpy_helper.from_array(np.array(-np.inf, np.float32), "neg_inf")])
    return _model(graph)


def with_nonfinite(model: onnx.ModelProto, name: str = "w1", value: float = float("nan")
                   ) -> onnx.ModelProto:
    """A copy of ``model`` whose initializer ``name`` holds one NaN/inf."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            arr = numpy_helper.to_array(init).copy()
            arr.flat[3] = value
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, name))
            return model
    raise KeyError(name)


def with_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """A copy of ``model`` that claims another default-domain opset (not converted)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    return model


def save(model: onnx.ModelProto, path: Path, external_data: bool = False) -> Path:
    path = Path(path)
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


# ----------------------------------------------------------------------------- running

def run_ort(model: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run an ONNX model (path, ``onnx.ModelProto`` or ``onnx_ir.Model``) on ONNX Runtime's CPU."""
    import onnx_ir as ir
    import onnxruntime as ort

    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    return float(np.linalg.norm(ref - got) / max(np.linalg.norm(ref), 1e-12))


def mlp_inputs(k: int = 64, seq: int = 8, samples: int = 4, seed: int = 10) -> np.ndarray:
    """Inputs ``[samples, S, K]`` for :func:`mlp_model` (``x[i:i+1]`` is one model input, as an
    ``NpzFeed`` slices it)."""
    return _rng(seed).standard_normal((samples, seq, k)).astype(np.float32)


def op_counts(model: Any) -> dict[str, int]:
    """``domain::op`` (or ``op``) histogram of an ``onnx_ir.Model`` or a path / proto."""
    import onnx_ir as ir

    from lbcc.irutils import op_histogram

    if isinstance(model, (str, Path)):
        model = ir.load(model)
    elif isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    return op_histogram(model)


# ----------------------------------------------------------------------------- torch Llama

def tiny_llama(vocab: int = 256, dim: int = 64, layers: int = 2, heads: int = 4,
               hidden: int = 128, seed: int = 0) -> Any:
    """A 2-layer Llama-style decoder: ids[B, S] -> logits[B, S, V], tied embedding / lm_head."""
    import torch
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, d: int, eps: float = 1e-6):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))
            self.eps = eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            var = x.pow(2).mean(-1, keepdim=True)
            return x * torch.rsqrt(var + self.eps) * self.weight

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(dim, dim, bias=False)
            self.k_proj = nn.Linear(dim, dim, bias=False)
            self.v_proj = nn.Linear(dim, dim, bias=False)
            self.o_proj = nn.Linear(dim, dim, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            hd = dim // heads

            def split(t: torch.Tensor) -> torch.Tensor:
                return t.view(b, s, heads, hd).transpose(1, 2)

            q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
            scores = (q @ k.transpose(-1, -2)) / (hd ** 0.5)
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            # HF Llama fills with the dtype minimum, not -inf
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            out = torch.softmax(scores, dim=-1) @ v
            return self.o_proj(out.transpose(1, 2).reshape(b, s, dim))

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj = nn.Linear(dim, hidden, bias=False)
            self.up_proj = nn.Linear(dim, hidden, bias=False)
            self.down_proj = nn.Linear(hidden, dim, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_layernorm = RMSNorm(dim)
            self.self_attn = Attention()
            self.post_attention_layernorm = RMSNorm(dim)
            self.mlp = MLP()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.self_attn(self.input_layernorm(x))
            return x + self.mlp(self.post_attention_layernorm(x))

    class Llama(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(vocab, dim)
            self.layers = nn.ModuleList([Block() for _ in range(layers)])
            self.norm = RMSNorm(dim)
            self.lm_head = nn.Linear(dim, vocab, bias=False)
            self.lm_head.weight = self.embed_tokens.weight  # tied

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            x = self.embed_tokens(input_ids)
            for layer in self.layers:
                x = layer(x)
            return self.lm_head(self.norm(x))

    torch.manual_seed(seed)
    model = Llama().eval()
    with torch.no_grad():  # a less uniform embedding than N(0, 1) init, like a trained one
        model.embed_tokens.weight.mul_(0.5)
    return model
