"""How much faster ONNX Runtime's int8 products are than float ones on this CPU, for LLM shapes.

A chain of ``--layers`` products ``x[M, K] @ W`` alternating ``K -> N -> K`` (a Tanh between, so
nothing folds), in four forms, built here with random weights, timed round-robin at ``--threads``
intra-op threads (median of ``--rounds`` after 3 warm-up runs):

  float   MatMul in float32
  u8u8    QuantizeLinear(x) uint8 -> DequantizeLinear -> MatMul with a DequantizeLinear weight
          stored uint8 + 128 (what lbcc's ort-int8 target emits, saturation-safe): ONNX Runtime
          fuses it into MatMulIntegerToFloat with its u8 x u8 kernel
  u8s8    the same with int8 weights (ONNX Runtime's u8 x s8 kernel; on x86 without VNNI it adds
          pairs of products in 16 bits and can saturate)
  u8s7    int8 weights on a 7-bit grid (ORT's ``reduce_range``), the u8 x s8 kernel without
          saturation

This bounds what W8A8 can gain on a machine: the ratio of a form to float is the best a model
whose every product runs in that form can reach on its product time. On x86 with VNNI or AMX,
u8s8 is exact and the fast form (preset ``auto-vnni``); without VNNI it can saturate and u8u8 is
what the presets emit.

    python benchmarks/int8_gemm_cpu.py --m 128 --k 576 --n 1536
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

FORMS = ("float", "u8u8", "u8s8", "u8s7")


def chain_model(form: str, m: int, k: int, n: int, layers: int, seed: int = 0) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        rows, cols = (k, n) if i % 2 == 0 else (n, k)
        w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        if form == "float":
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        else:
            qmax = 63 if form == "u8s7" else 127
            scale = (np.abs(w).max(axis=0) / qmax).astype(np.float32)
            q = np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8)
            if form == "u8u8":
                q = (q.astype(np.int16) + 128).astype(np.uint8)
                zero = np.full(cols, 128, np.uint8)
            else:
                zero = np.zeros(cols, np.int8)
            inits += [numpy_helper.from_array(q, f"q{i}"),
                      numpy_helper.from_array(scale, f"s{i}"),
                      numpy_helper.from_array(zero, f"z{i}"),
                      numpy_helper.from_array(np.array(0.02, np.float32), f"xs{i}"),
                      numpy_helper.from_array(np.array(128, np.uint8), f"xz{i}")]
            nodes += [helper.make_node("QuantizeLinear", [x, f"xs{i}", f"xz{i}"], [f"xq{i}"]),
                      helper.make_node("DequantizeLinear", [f"xq{i}", f"xs{i}", f"xz{i}"],
                                       [f"xd{i}"]),
                      helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"],
                                       [f"wd{i}"], axis=1),
                      helper.make_node("MatMul", [f"xd{i}", f"wd{i}"], [f"y{i}"])]
        nodes.append(helper.make_node("Tanh", [f"y{i}"], [f"t{i}"]))
        x = f"t{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, m, k])], [helper.make_tensor_value_info(
            x, TensorProto.FLOAT, None)], inits)
    # IR version 10: what ONNX Runtime 1.20 and newer load, whatever onnx writes by default
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10
                             ).SerializeToString()


def main() -> None:
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, default=128, help="rows (tokens), 128")
    p.add_argument("--k", type=int, default=576, help="hidden size, 576 (SmolLM2-135M)")
    p.add_argument("--n", type=int, default=1536, help="MLP size, 1536 (SmolLM2-135M)")
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = a.threads, 1
    sessions = {f: ort.InferenceSession(chain_model(f, a.m, a.k, a.n, a.layers), options,
                                        providers=["CPUExecutionProvider"]) for f in FORMS}
    x = np.random.default_rng(1).standard_normal((1, a.m, a.k)).astype(np.float32)
    times: dict[str, list[float]] = {f: [] for f in FORMS}
    for r in range(a.rounds + 3):
        for f in FORMS[r % len(FORMS):] + FORMS[:r % len(FORMS)]:
            start = time.perf_counter()
            sessions[f].run(None, {"x": x})
            if r >= 3:
                times[f].append(time.perf_counter() - start)
    ref = float(np.median(times["float"]))
    print(f"{a.layers} products [{a.m}x{a.k}] @ [{a.k}x{a.n}] / [{a.n}x{a.k}], {a.threads} "
          f"threads, onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}")
    print("| form | ms | x float |\n| --- | ---: | ---: |")
    for f in FORMS:
        t = float(np.median(times[f]))
        print(f"| {f} | {1e3 * t:.2f} | {t / ref:.3f} |")


if __name__ == "__main__":
    main()
