"""End-to-end decode / prefill benchmark of the ``triton`` target's runtime on a CUDA GPU.

    python benchmarks/triton_e2e.py [--write-md FILE] [--models smollm2,llama1b] [--compile]
                                    [--fp8 | --only-fp8]

Models with random weights, built here: the sample model's shape (SmolLM2-135M: 30 layers,
576 wide, 9/3 heads, vocab 49152) and a 1B-parameter Llama shape (Llama-3.2-1B: 16 layers,
2048 wide, 32/8 heads, MLP 8192, vocab 128256, tied embedding). The W4A16 model is what
``lbcc compile --target triton --preset w4a16`` stores (4-bit asymmetric groups of 128, lm_head
8-bit groups of 64, qkv and gate/up fused); the float16 baseline runs the same runtime code with
float16 weights equal to the dequantized W4A16 ones (so the two compute the same function up
to rounding: the logits are compared) through cuBLAS, eagerly, with its decode step in a CUDA
graph, and (``--compile``) under ``torch.compile(mode="reduce-overhead")``.
Decode: batch 1, tokens/s over 128 steps after a 16-token prompt. Prefill: one 512-token prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from lbcc.targets.triton import ops, runtime
except ImportError:  # a bare copy on the GPU machine
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lbcc_triton import ops, runtime  # type: ignore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_kernels import pack_gpu, quantize_gpu  # noqa: E402

MODELS = {
    "smollm2": dict(layers=30, hidden=576, inter=1536, heads=9, kv_heads=3, head_dim=64,
                    vocab=49152, theta=100000.0),
    "llama1b": dict(layers=16, hidden=2048, inter=8192, heads=32, kv_heads=8, head_dim=64,
                    vocab=128256, theta=500000.0),
}
DEV = "cuda"


def log(*a):
    print(*a, flush=True)


def build(cfg: dict, seed: int = 0):
    """(w4 manifest, w4 tensors, fp16 manifest, fp16 tensors) with the same effective weights."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    h, hd = cfg["hidden"], cfg["head_dim"]
    shapes = {"qkv": ((cfg["heads"] + 2 * cfg["kv_heads"]) * hd, h), "o_proj": (h, cfg["heads"] * hd),
              "gate_up": (2 * cfg["inter"], h), "down_proj": (h, cfg["inter"])}
    splits = {"qkv": [cfg["heads"] * hd, cfg["kv_heads"] * hd, cfg["kv_heads"] * hd],
              "gate_up": [cfg["inter"], cfg["inter"]]}
    m4 = {"linears": {}, "fusion_groups": []}
    m16 = {"linears": {}, "fusion_groups": []}
    t4, t16 = {}, {}

    def add(name, n, k, bits, group):
        w = torch.randn(n, k, device=DEV, generator=g, dtype=torch.float16) * (k ** -0.5)
        codes, s, z = quantize_gpu(w, bits, group, symmetric=False)
        t4[name + ".qweight"] = pack_gpu(codes, bits)
        t4[name + ".scales"] = s
        t4[name + ".zeros"] = z
        m4["linears"][name] = {"kind": "wq", "bits": bits, "group": group, "out": n, "in": k,
                               "zeros": True}
        zz = z.half()
        kp = codes.shape[1]
        t16[name + ".weight"] = ((codes.half().reshape(n, kp // group, group) - zz[..., None])
                                 * s[..., None]).reshape(n, kp)[:, :k].contiguous()
        m16["linears"][name] = {"kind": "fp16", "out": n, "in": k}
        for m in (m4, m16):
            if name.split(".")[-1] in splits:
                m["linears"][name]["splits"] = splits[name.split(".")[-1]]
        del w, codes

    for i in range(cfg["layers"]):
        for key, (n, k) in shapes.items():
            add(f"layers.{i}.{key}", n, k, 4, 128)
        for nm in ("input_layernorm", "post_attention_layernorm"):
            gamma = 1 + 0.1 * torch.randn(h, device=DEV, generator=g, dtype=torch.float16)
            t4[f"layers.{i}.{nm}"] = t16[f"layers.{i}.{nm}"] = gamma
    add("lm_head", cfg["vocab"], h, 8, 64)
    t4["norm"] = t16["norm"] = torch.ones(h, device=DEV, dtype=torch.float16)
    inv = 1.0 / (cfg["theta"] ** (torch.arange(0, hd, 2, device=DEV, dtype=torch.float64) / hd))
    f = torch.arange(4096, device=DEV, dtype=torch.float64)[:, None] * inv[None, :]
    for t in (t4, t16):
        t["rope.cos"], t["rope.sin"] = torch.cos(f).float(), torch.sin(f).float()
    conf = {"layers": cfg["layers"], "hidden": h, "heads": cfg["heads"],
            "kv_heads": cfg["kv_heads"], "head_dim": hd, "eps": 1e-5, "vocab": cfg["vocab"],
            "rope": True, "max_positions": 4096}
    m4["config"] = m16["config"] = conf
    m4["embedding"] = {"kind": "wq", "name": "lm_head", "bits": 8, "group": 64, "tied": True}
    m16["embedding"] = {"kind": "fp16", "tied": False}
    # the fp16 baseline embeds with the same table as the W4 model: dequantized lm_head rows
    t16["embed.weight"] = t16["lm_head.weight"]
    return m4, t4, m16, t16


def fp8_from(m16: dict, t16: dict) -> tuple[dict, dict]:
    """The float16 model's linears as ``w8a8-fp8`` stores them (E4M3 per channel, s = max|w| /
    448; the runtime quantizes activations to E4M3 per token); embedding, norms, rotary shared."""
    m8 = {**m16, "linears": {}}
    t8 = {k: v for k, v in t16.items() if not k.endswith(".weight") or k == "embed.weight"}
    for name, meta in m16["linears"].items():
        w = t16[name + ".weight"].float()
        s = w.abs().amax(1).clamp_min(1e-12) / 448
        t8[name + ".weight"] = (w / s[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
        t8[name + ".wscale"] = s
        m8["linears"][name] = {**meta, "kind": "fp8"}
    return m8, t8


def decode_tps(model, prompt, steps: int, graph: bool, compiled=None) -> float:
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + steps + 8)
    nxt = model.forward(prompt, cache)[:, -1:].argmax(-1)
    if graph:
        step = model._decode_graph(cache, nxt)
    elif compiled is not None:
        step = compiled(cache)
    else:
        def step(ids):
            return model.forward(ids, cache)[:, -1].argmax(-1, keepdim=True)
    for _ in range(3):  # warm (the graph's replays also advance the cache)
        nxt = step(nxt)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        nxt = step(nxt)
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - t)


def prefill_ms(model, prompt) -> float:
    times = []
    for _ in range(5):
        cache = model.new_cache(prompt.shape[0], prompt.shape[1])
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.forward(prompt, cache)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[1:])


def compiled_step(model):
    """torch.compile(mode="reduce-overhead") of one float16 decode step (CUDA graphs inside)."""
    def make(cache):
        fn = torch.compile(lambda ids: model.forward(ids, cache)[:, -1].argmax(-1, keepdim=True),
                           mode="reduce-overhead", fullgraph=False)
        return fn
    return make


def run_fp8(m16: dict, t16: dict, f16, prompt, long_prompt, steps: int, res: dict) -> None:
    """FP8 E4M3 W8A8 (``w8a8-fp8``) on the same weights: decode, prefill, and its distance from
    the float16 model (FP8 numerics: expected a few percent)."""
    m8, t8 = fp8_from(m16, t16)
    f8 = runtime.Model(m8, t8, torch.device(DEV))
    a = f8.forward(long_prompt[:, :64]).float()
    b = f16.forward(long_prompt[:, :64]).float()
    res["fp8_logits_rel_err"] = ((a - b).norm() / b.norm()).item()
    res["fp8_argmax_agree"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    res["fp8_prefill_ms"] = prefill_ms(f8, long_prompt)
    res["fp8_graph_tps"] = decode_tps(f8, prompt, steps, graph=True)
    del f8, t8


def run_model(name: str, cfg: dict, steps: int, do_compile: bool,
              fp8: bool | str = False) -> dict:
    t0 = time.time()
    tuned_before = set(ops.TUNER.seconds)
    m4, t4, m16, t16 = build(cfg)
    w4 = runtime.Model(m4, t4, torch.device(DEV))
    f16 = runtime.Model(m16, t16, torch.device(DEV))
    params = sum(v["out"] * v["in"] for v in m16["linears"].values())
    g = torch.Generator(device=DEV).manual_seed(1)
    prompt = torch.randint(0, cfg["vocab"], (1, 16), device=DEV, generator=g)
    long_prompt = torch.randint(0, cfg["vocab"], (1, 512), device=DEV, generator=g)
    res = {"model": name, "params_M": round(params / 1e6), "build_s": round(time.time() - t0, 1)}
    if fp8 == "only":  # the float16 reference and FP8, not the W4A16 model
        with torch.no_grad():
            res["fp16_prefill_ms"] = prefill_ms(f16, long_prompt)
            res["fp16_graph_tps"] = decode_tps(f16, prompt, steps, graph=True)
            run_fp8(m16, t16, f16, prompt, long_prompt, steps, res)
        log(json.dumps(res))
        del w4, f16, t4, t16
        torch.cuda.empty_cache()
        return res
    with torch.no_grad():
        a = w4.forward(long_prompt[:, :64]).float()
        b = f16.forward(long_prompt[:, :64]).float()
        res["logits_rel_err"] = ((a - b).norm() / b.norm()).item()
        res["argmax_agree"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        ga = w4.generate(prompt, max_new_tokens=32)
        gb = f16.generate(prompt, max_new_tokens=32, cuda_graph=False)
        res["greedy_identical_tokens"] = int((ga[0, 16:] == gb[0, 16:]).int().cumprod(0).sum())
        res["w4_prefill_ms"] = prefill_ms(w4, long_prompt)
        res["fp16_prefill_ms"] = prefill_ms(f16, long_prompt)
        res["fp16_eager_tps"] = decode_tps(f16, prompt, steps, graph=False)
        res["fp16_graph_tps"] = decode_tps(f16, prompt, steps, graph=True)
        res["w4_eager_tps"] = decode_tps(w4, prompt, steps, graph=False)
        res["w4_graph_tps"] = decode_tps(w4, prompt, steps, graph=True)
        if fp8:
            run_fp8(m16, t16, f16, prompt, long_prompt, steps, res)
        log(json.dumps(res))
        if do_compile:
            try:
                t = time.time()
                res["fp16_compile_tps"] = decode_tps(f16, prompt, steps, graph=False,
                                                     compiled=compiled_step(f16))
                res["compile_s"] = round(time.time() - t, 1)
            except Exception as e:  # noqa: BLE001
                res["fp16_compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    tuned = [v for k, v in ops.TUNER.seconds.items() if k not in tuned_before]
    res["tuning"] = {"keys": len(tuned), "compile_s": round(sum(v["compile"] for v in tuned), 1),
                     "time_s": round(sum(v["time"] for v in tuned), 1),
                     "threads": ops.COMPILE_THREADS}
    log(json.dumps(res))
    del w4, f16, t4, t16
    torch.cuda.empty_cache()
    return res


def markdown(rows, env) -> str:
    out = ["## Triton target: end to end", "",
           f"Machine: {env}. Command: `python benchmarks/triton_e2e.py "
           f"{' '.join(sys.argv[1:])}`. Random "
           "weights (see the script's docstring); batch 1; decode tokens/s over 128 greedy "
           "steps after a 16-token prompt; prefill = one 512-token prompt (eager, median of 4). "
           "The float16 model holds the dequantized W4A16 weights: same function.", "",
           "| model | params (linear) | fp16 eager tok/s | fp16 CUDA graph tok/s | fp16 "
           "torch.compile tok/s | ours W4A16 eager tok/s | ours W4A16 CUDA graph tok/s "
           "(× fp16 eager, × fp16 graph) | prefill 512 fp16 / ours ms | logits rel. err, "
           "greedy tokens identical |", "|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if "w4_graph_tps" in r):
        comp = r.get("fp16_compile_tps")
        comp = f"{comp:.0f}" if comp else r.get("fp16_compile_error", "not run")[:60]
        out.append(
            f"| {r['model']} | {r['params_M']} M | {r['fp16_eager_tps']:.0f} | "
            f"{r['fp16_graph_tps']:.0f} | {comp} | {r['w4_eager_tps']:.0f} | "
            f"{r['w4_graph_tps']:.0f} ({r['w4_graph_tps'] / r['fp16_eager_tps']:.2f}×, "
            f"{r['w4_graph_tps'] / r['fp16_graph_tps']:.2f}×) | {r['fp16_prefill_ms']:.1f} / "
            f"{r['w4_prefill_ms']:.1f} | {r['logits_rel_err']:.1e}, "
            f"{r['greedy_identical_tokens']}/32 |")
    fp8 = [r for r in rows if "fp8_graph_tps" in r]
    if fp8:
        out += ["", "FP8 E4M3 W8A8 (`--fp8`; the `w8a8-fp8` storage of the float16 model's "
                "weights, activations E4M3 per token), decode with CUDA graphs:", "",
                "| model | fp16 CUDA graph tok/s | FP8 CUDA graph tok/s (× fp16 graph) | prefill "
                "512 fp16 / FP8 ms | logits rel. err vs fp16, argmax agreement |",
                "|---|---|---|---|---|"]
        for r in fp8:
            out.append(f"| {r['model']} | {r['fp16_graph_tps']:.0f} | {r['fp8_graph_tps']:.0f} "
                       f"({r['fp8_graph_tps'] / r['fp16_graph_tps']:.2f}×) | "
                       f"{r['fp16_prefill_ms']:.1f} / {r['fp8_prefill_ms']:.1f} | "
                       f"{r['fp8_logits_rel_err']:.1e}, {r['fp8_argmax_agree']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,llama1b")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--write-md", type=Path)
    ap.add_argument("--fp8", action="store_true", help="also FP8 E4M3 W8A8 (w8a8-fp8)")
    ap.add_argument("--only-fp8", action="store_true", help="float16 and FP8 only (no W4A16)")
    a = ap.parse_args(argv)
    import triton
    env = (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
           f"triton {triton.__version__}")
    rows = []
    for name in a.models.split(","):
        rows.append(run_model(name, MODELS[name], a.steps, a.compile,
                              "only" if a.only_fp8 else a.fp8))
        md = markdown(rows, env)
        if a.write_md:
            a.write_md.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
