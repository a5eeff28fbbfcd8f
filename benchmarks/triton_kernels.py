"""Kernel benchmark of the ``triton`` target on a CUDA GPU (run on demand, never in CI).

    python benchmarks/triton_kernels.py [--write-md BENCHMARKS-triton.md] [--quick]

Method: every timed call is one of ``calls`` launches captured in one CUDA graph; the weights are
rotated among enough copies that they never sit in L2 between uses (copies x bytes > 4 x L2);
the median over replays of (graph time / calls) is reported, with the same ``calls`` for every
column of a row (:func:`same_calls`). The activations are one tensor.
Peers at the same bits and group size: ``torch.nn.functional.linear`` in float16 (cuBLAS),
``torch.ops.aten._weight_int4pack_mm`` (bfloat16 activations, as the op requires) and GemLite's
``A16Wn`` (if ``gemlite`` imports; its H100 tuning table is loaded when no table for the GPU
exists). Bandwidth: bytes that must move (packed weights + scales + x + y) / time, as a fraction
of the measured device-to-device copy bandwidth (bytes read + written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from lbcc.targets.triton import ops
except ImportError:  # run from a bare copy on the GPU machine
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lbcc_triton import ops  # type: ignore

SHAPES = [(4096, 4096), (8192, 8192), (14336, 4096), (4096, 14336)]  # (N, K)
MS = [1, 16, 128, 2048]
GROUP = 128
DEV = "cuda"


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# timing


def graph_time_us(fns, calls: int | None = None, replays: int = 20) -> float:
    """Median µs per call of ``fns`` (cycled) captured ``calls`` times in one CUDA graph."""
    for f in fns:  # compile, tune, allocate outside the capture
        f()
    torch.cuda.synchronize()
    calls = calls or max(2 * len(fns), 8)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = ops.capture_graph(fns, calls)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = ops.replay_times_us(g, calls, replays)
    del g
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write counted)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=DEV).random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(200):  # let the clocks ramp up first (the card idles at a low clock)
        dst.copy_(src)
    t = graph_time_us([lambda: dst.copy_(src)], calls=8, replays=20)
    # the same copy timed with events outside a graph, and a read-mostly pass (a sum): the
    # largest of the three is the ceiling used (the graph figure alone came out low)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(20):
        dst.copy_(src)
    b.record()
    b.synchronize()
    t_ev = a.elapsed_time(b) * 1e3 / 20
    h = src.view(torch.float16)
    for _ in range(3):
        h.sum(dtype=torch.float32)
    a.record()
    for _ in range(20):
        h.sum(dtype=torch.float32)
    b.record()
    b.synchronize()
    t_rd = a.elapsed_time(b) * 1e3 / 20
    log(f"copy: graph {2 * n / t / 1e6:.2f} TB/s, events {2 * n / t_ev / 1e6:.2f} TB/s; "
        f"read (sum) {n / t_rd / 1e6:.2f} TB/s")
    del src, dst, h
    return max(2 * n / (t * 1e-6), 2 * n / (t_ev * 1e-6), n / (t_rd * 1e-6))


def same_calls(*rotations: int) -> int:
    """Calls a replay for every column of a row: twice the longest rotation, at least 16. The
    same count for all, because at large M the GPU runs at its power limit and a longer replay
    runs at a lower clock (H200, M = 2048, 8192 x 8192: fp16 392 µs a call in 8-call replays,
    419 in 16-call and 429 in 64-call replays), so unequal counts favour the shorter."""
    return max(16, 2 * max(rotations))


def copies_for(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, min(48, math.ceil(4 * l2 / nbytes) + 1))


# ---------------------------------------------------------------------------------------------
# weights


def quantize_gpu(w: torch.Tensor, bits: int, group: int, symmetric: bool):
    """(codes uint8 [N,Kp], scales f16 [N,Kp/g], zeros u8 [N,Kp/g] or None); RTN, see packing.py."""
    n, k = w.shape
    step = max(group, 16 * 32 // bits)  # K padded as packing.padded_k (the padding -> code z)
    kp = -(-k // step) * step
    g = F.pad(w.float(), (0, kp - k)).reshape(n, kp // group, group)
    qmax = (1 << bits) - 1
    if symmetric:
        s = g.abs().amax(-1) / ((1 << (bits - 1)) - 1)
        z = torch.full_like(s, 1 << (bits - 1))
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        s = (hi - lo) / qmax
    s = torch.where(s == 0, torch.ones_like(s), s).half()
    if not symmetric:
        z = (-lo / s.float()).round().clamp(0, qmax)
    u = (g / s.float()[..., None]).round().add(z[..., None]).clamp(0, qmax)
    return u.reshape(n, kp).to(torch.uint8), s, (None if symmetric else z.to(torch.uint8))


def pack_gpu(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """torch twin of ``packing.pack`` (K already padded): chunks of 16 words, bit field j of
    word i of chunk c = the code of k = c * 16E + 16 j + i."""
    e = 32 // bits
    n, k = codes.shape
    c = codes.to(torch.int32).reshape(n, k // (16 * e), e, 16)
    words = torch.zeros((n, k // (16 * e), 16), dtype=torch.int32, device=codes.device)
    for j in range(e):
        words |= c[:, :, j, :] << (j * bits)
    return words.reshape(n, k // e)


def dequant_ref(codes, s, z, bits, group):
    n, k = codes.shape
    zz = (torch.full_like(s, 1 << (bits - 1)) if z is None else z.half())
    return ((codes.half().reshape(n, k // group, group) - zz[..., None]) * s[..., None]
            ).reshape(n, k)


def rotated_w4_weights(n: int, k: int, bits: int = 4, group: int = GROUP) -> dict:
    """Random float16 ``[n, k]`` weights (seed 0), RTN-quantized symmetric and packed, each in
    enough copies to rotate beyond L2: ``w``, ``codes``, ``s``, ``qw``, the copies ``ws`` (fp16),
    ``qws`` / ``ss`` (packed / scales), and ``wref`` (the dequantized float16 weights)."""
    torch.manual_seed(0)
    w = torch.randn(n, k, device=DEV, dtype=torch.float16) * 0.02
    codes, s, _ = quantize_gpu(w, bits, group, symmetric=True)
    qw = pack_gpu(codes, bits)
    r4 = copies_for(qw.numel() * 4 + s.numel() * 2)
    r16 = copies_for(n * k * 2)
    return {"w": w, "codes": codes, "s": s, "qw": qw,
            "qws": [qw] + [qw.clone() for _ in range(r4 - 1)],
            "ss": [s] + [s.clone() for _ in range(r4 - 1)],
            "ws": [w] + [w.clone() for _ in range(r16 - 1)],
            "wref": dequant_ref(codes, s, None, bits, group)}


def explore_main(explore, default_ms: str, description: str) -> None:
    """The command line of the exploration scripts: ``--shapes NxK,...``, ``--ms M,...``,
    ``--json FILE``; calls ``explore(n, k, ms, out)`` per shape and writes ``out`` as JSON."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--shapes", default="8192x8192,4096x4096,14336x4096,4096x14336")
    ap.add_argument("--ms", default=default_ms)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    t0 = time.time()
    import triton

    log(torch.cuda.get_device_name(0), torch.__version__, triton.__version__)
    out: list = []
    for sh in a.shapes.split(","):
        n, k = map(int, sh.split("x"))
        explore(n, k, [int(v) for v in a.ms.split(",")], out)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    log(f"done in {time.time() - t0:.0f} s")


# ---------------------------------------------------------------------------------------------
# peers


def torch_int4_factory(codes, s, group):
    """tinygemm: bf16 x, weights packed by _convert_weight_to_int4pack; None if unavailable."""
    try:
        n, k = codes.shape
        packed_u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
        wp = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
        sf = s.float()  # tinygemm: w = (q - 8) * scale + zero; symmetric -> zero = 0
        sz = torch.stack([sf, torch.zeros_like(sf)], -1).transpose(0, 1).contiguous().to(
            torch.bfloat16)
        def mm(x, wp=wp, sz=sz):
            return torch.ops.aten._weight_int4pack_mm(x, wp, group, sz)
        mm(torch.randn(1, k, device=DEV, dtype=torch.bfloat16))
        return mm
    except Exception as e:  # noqa: BLE001
        log(f"  torch int4 unavailable: {type(e).__name__}: {str(e)[:200]}")
        return None


def gemlite_factory():
    try:
        import gemlite  # noqa: F401
        from gemlite.core import GemLiteLinear
        from gemlite.helper import A16Wn
    except Exception as e:  # noqa: BLE001
        log(f"gemlite unavailable: {type(e).__name__}: {e}")
        return None, "unavailable"
    name = torch.cuda.get_device_name(0).lower().replace(" ", "_")
    cfg_dir = Path(gemlite.__file__).parent / "configs"
    note = "own table"
    if not any(t.stem in name for t in cfg_dir.glob("*.json")) and (cfg_dir / "h100.json").exists():
        GemLiteLinear.load_config(str(cfg_dir / "h100.json"))
        note = "H100 tuning table"

    def make(codes, s, z, bits, group):
        zz = (torch.full_like(s, 1 << (bits - 1)) if z is None else z.half())
        return A16Wn(device=DEV, dtype=torch.float16).from_weights(
            codes, s, zz, W_nbits=bits, group_size=group)
    return make, f"gemlite {getattr(gemlite, '__version__', '?')} ({note})"


# ---------------------------------------------------------------------------------------------
# the benchmark


def bench_wq(n, k, ms, bits, copy_bw, gl_make, rows, checks, peers=True):
    torch.manual_seed(0)
    w = torch.randn(n, k, device=DEV, dtype=torch.float16) * 0.02
    codes, s, z = quantize_gpu(w, bits, GROUP, symmetric=True)
    qw = pack_gpu(codes, bits)
    wq_bytes = qw.numel() * 4 + s.numel() * 2
    r4 = copies_for(wq_bytes)
    qws = [qw] + [qw.clone() for _ in range(r4 - 1)]
    ss = [s] + [s.clone() for _ in range(r4 - 1)]
    r16 = copies_for(n * k * 2)
    ws = [w] + [w.clone() for _ in range(r16 - 1)]
    wref = dequant_ref(codes, s, z, bits, GROUP).float()
    calls = same_calls(r4, r16)
    ti4 = [torch_int4_factory(codes, s, GROUP)] if peers and bits == 4 else []
    if ti4 and ti4[0] is not None:
        ti4 += [torch_int4_factory(codes, s, GROUP) for _ in range(min(r4, 8) - 1)]
    gls = []
    if peers and gl_make is not None:
        try:
            gls = [gl_make(codes, s, z, bits, GROUP) for _ in range(min(r4, 8))]
        except Exception as e:  # noqa: BLE001
            log(f"  gemlite failed to pack: {type(e).__name__}: {str(e)[:200]}")
    for m in ms:
        x = torch.randn(m, k, device=DEV, dtype=torch.float16)
        xb = x.to(torch.bfloat16)
        y = ops.wq_linear(x, qw, s, None, bits, GROUP)
        ref = x.float() @ wref.t()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        checks.append((f"w{bits}a16 {n}x{k} M={m}", err))
        res = {"N": n, "K": k, "M": m, "bits": bits, "calls": calls}
        res["fp16_us"] = graph_time_us([lambda w_=w_: F.linear(x, w_) for w_ in ws], calls)
        res["ours_us"] = graph_time_us(
            [lambda q_=q_, s_=s_: ops.wq_linear(x, q_, s_, None, bits, GROUP)
             for q_, s_ in zip(qws, ss)], calls)
        key = "|".join([torch.cuda.get_device_name(0), "wq", str(ops.m_bucket(m)), str(n), str(k),
                        str(bits), str(GROUP), "False", f"v{ops.TUNE_VERSION}"])
        res["ours_cfg"] = ops.TUNER._load().get(key, {})
        if ti4 and ti4[0] is not None:
            try:
                res["tinygemm_us"] = graph_time_us([lambda f=f: f(xb) for f in ti4], calls)
            except Exception as e:  # noqa: BLE001
                log(f"  torch int4 M={m}: {type(e).__name__}: {str(e)[:200]}")
        if gls:
            try:
                res["gemlite_us"] = graph_time_us([lambda f=f: f(x) for f in gls], calls)
            except Exception as e:  # noqa: BLE001
                log(f"  gemlite M={m}: {type(e).__name__}: {str(e)[:200]}")
        moved = wq_bytes + 2 * m * (k + n)
        res["bytes"] = moved
        res["bw_frac"] = moved / (res["ours_us"] * 1e-6) / copy_bw
        res["ideal_us"] = moved / copy_bw * 1e6
        rows.append(res)
        log(json.dumps({k_: (round(v, 2) if isinstance(v, float) else v)
                        for k_, v in res.items() if k_ != "ours_cfg"}))
    del qws, ss, ws, gls, ti4
    torch.cuda.empty_cache()


def bench_w8a8(n, k, ms, rows, checks):
    torch.manual_seed(1)
    wf = torch.randn(n, k, device=DEV, dtype=torch.float16) * 0.02
    sw = (wf.float().abs().amax(1) / 127)
    w8 = (wf.float() / sw[:, None]).round().clamp(-127, 127).to(torch.int8)
    r8 = copies_for(n * k)
    w8s = [w8] + [w8.clone() for _ in range(r8 - 1)]
    r16 = copies_for(n * k * 2)
    ws = [wf] + [wf.clone() for _ in range(r16 - 1)]
    calls = same_calls(r8, r16)
    swf = wf.float().abs().amax(1) / 448  # FP8 E4M3 per channel (the w8a8-fp8 preset)
    w8f = (wf.float() / swf[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    w8fs = [w8f] + [w8f.clone() for _ in range(r8 - 1)]
    for m in ms:
        x = torch.randn(m, k, device=DEV, dtype=torch.float16)
        y = ops.w8a8_linear_fp(x, w8, sw)
        q, sa = ops.quant_rows(x)
        ref = (q.float() @ w8.float().t()) * sa[:, None] * sw[None, :]
        checks.append((f"w8a8 {n}x{k} M={m}", ((y.float() - ref).norm() / ref.norm()).item()))
        res = {"N": n, "K": k, "M": m, "kind": "w8a8", "calls": calls}
        res["fp16_us"] = graph_time_us([lambda w_=w_: F.linear(x, w_) for w_ in ws], calls)
        res["ours_us"] = graph_time_us([lambda w_=w_: ops.w8a8_linear_fp(x, w_, sw) for w_ in w8s],
                                       calls)
        res["gemm_only_us"] = graph_time_us([lambda w_=w_: ops.w8a8_linear(q, sa, w_, sw)
                                             for w_ in w8s], calls)
        try:
            res["torch_int_mm_us"] = graph_time_us(
                [lambda w_=w_: torch._int_mm(q, w_.t()) for w_ in w8s], calls) if m > 16 else None
        except Exception as e:  # noqa: BLE001
            log(f"  torch._int_mm: {type(e).__name__}: {str(e)[:200]}")
        try:
            bench_fp8(x, w8f, w8fs, swf, calls, res, checks)
        except Exception as e:  # noqa: BLE001
            log(f"  fp8: {type(e).__name__}: {str(e)[:300]}")
        rows.append(res)
        log(json.dumps({k_: (round(v, 2) if isinstance(v, float) else v) for k_, v in res.items()}))
    del w8s, ws
    torch.cuda.empty_cache()


def bench_fp8(x, w8f, w8fs, swf, calls, res, checks):
    """FP8 E4M3 (w8a8-fp8): our per-token quantization + FP8 GEMM, the GEMM alone, and
    ``torch._scaled_mm`` (cuBLASLt FP8, row-wise scales) on the same codes for reference."""
    n, k = w8f.shape
    m = x.shape[0]
    y = ops.w8a8_linear_fp(x, w8f, swf)
    q, sa = ops.quant_rows(x, fp8=True)
    ref = (q.float() @ w8f.float().t()) * sa[:, None] * swf[None, :]
    checks.append((f"fp8 {n}x{k} M={m}", ((y.float() - ref).norm() / ref.norm()).item()))
    res["fp8_us"] = graph_time_us([lambda w_=w_: ops.w8a8_linear_fp(x, w_, swf) for w_ in w8fs],
                                  calls)
    res["fp8_gemm_us"] = graph_time_us([lambda w_=w_: ops.w8a8_linear(q, sa, w_, swf)
                                        for w_ in w8fs], calls)
    key = "|".join([torch.cuda.get_device_name(0), "fp8", str(ops.m_bucket(m)), str(n), str(k),
                    f"v{ops.TUNE_VERSION}"])
    res["fp8_cfg"] = ops.TUNER._load().get(key, {})
    yf = ops.w8a8_linear(q, sa, w8f, swf, fast_accum=True)
    checks.append((f"fp8 fast-accum {n}x{k} M={m}",
                   ((yf.float() - ref).norm() / ref.norm()).item()))
    res["fp8_fast_gemm_us"] = graph_time_us(
        [lambda w_=w_: ops.w8a8_linear(q, sa, w_, swf, fast_accum=True) for w_ in w8fs], calls)
    sa2, sw2 = sa[:, None].contiguous(), swf[None, :].contiguous()
    try:
        res["scaled_mm_us"] = graph_time_us(
            [lambda w_=w_: torch._scaled_mm(q, w_.t(), scale_a=sa2, scale_b=sw2,
                                            out_dtype=torch.float16) for w_ in w8fs], calls)
    except Exception as e:  # noqa: BLE001
        log(f"  torch._scaled_mm: {type(e).__name__}: {str(e)[:200]}")


def fmt(v, digits=1):
    return "–" if v is None else f"{v:,.{digits}f}"


def markdown(env, rows, w8rows, checks, copy_bw, gl_note, seconds):
    out = ["## Triton target: kernels", "",
           f"Machine: {env['gpu']} ({env['sms']} SMs, L2 {env['l2_mb']} MB), driver "
           f"{env['driver']}; torch {env['torch']}, triton {env['triton']}, {gl_note}; "
           f"python {env['python']}. Measured memory bandwidth {copy_bw / 1e12:.2f} TB/s "
           "(the largest of: a 1 GiB device-to-device copy, read + write counted, in a CUDA "
           "graph and timed with events; a read-only sum over 1 GiB).", "",
           "Method: CUDA-graph replay (many calls in one graph, median over replays; the same "
           "number of calls a replay for every column of a row: twice the longest rotation, "
           "at least 16), weights rotated among copies totalling > 4x L2; activations float16 "
           "(bfloat16 for torch int4, which needs it). W4A16 symmetric, group 128. "
           "Speed-up = fp16 time / time. "
           f"Command: `python benchmarks/triton_kernels.py`; run took {seconds:.0f} s.", "",
           "| N×K | M | fp16 F.linear µs | ours W4A16 µs (×fp16) | torch int4 µs (×fp16) | "
           "GemLite A16W4 µs (×fp16) | ours: bandwidth fraction | ours: config |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f16 = r["fp16_us"]
        def cell(key):
            v = r.get(key)
            return "–" if v is None else f"{v:,.1f} ({f16 / v:.2f}×)"
        c = r.get("ours_cfg", {})
        cfg = c.get("kind", "?") + "".join(
            f" {'pdl' if k_ == 'PDL' else k_[0].lower() + k_.split('_')[-1][0].lower()}={v}"
            for k_, v in c.items() if k_ not in ("kind", "us"))
        out.append(f"| {r['N']}×{r['K']} | {r['M']} | {fmt(f16)} | {cell('ours_us')} | "
                   f"{cell('tinygemm_us')} | {cell('gemlite_us')} | "
                   f"{r['bw_frac'] * 100:.0f} % | {cfg} |")
    if w8rows:
        out += ["", "W8A8 (int8 per-token dynamic activations, int8 per-channel weights): "
                "ours = activation quantization kernel + int8 GEMM (both timed); GEMM alone; "
                "`torch._int_mm` (int32 out, no scaling) for reference.", "",
                "| N×K | M | fp16 µs | ours W8A8 µs (×fp16) | int8 GEMM only µs (×fp16) | "
                "torch._int_mm µs |", "|---|---|---|---|---|---|"]
        for r in w8rows:
            f16 = r["fp16_us"]
            out.append(f"| {r['N']}×{r['K']} | {r['M']} | {fmt(f16)} | {fmt(r['ours_us'])} "
                       f"({f16 / r['ours_us']:.2f}×) | {fmt(r['gemm_only_us'])} "
                       f"({f16 / r['gemm_only_us']:.2f}×) | {fmt(r.get('torch_int_mm_us'))} |")
    fp8 = [r for r in w8rows if r.get("fp8_us")]
    if fp8:
        out += ["", "FP8 E4M3 (`w8a8-fp8`: E4M3 per-token dynamic activations, E4M3 per-channel "
                "weights): ours = activation quantization kernel + FP8 GEMM (both timed, float32 "
                "accumulation promoted every BLOCK_K); GEMM alone; the GEMM with the tensor "
                "cores' own accumulation (`LBCC_TRITON_FP8_FAST_ACCUM=1`); `torch._scaled_mm` "
                "(cuBLASLt FP8, row-wise scales, float16 out) on the "
                "same codes.", "",
                "| N×K | M | fp16 µs | ours FP8 µs (×fp16) | FP8 GEMM only µs (×fp16) | "
                "GEMM, fast accumulation µs (×fp16) | torch._scaled_mm µs (×fp16) | "
                "ours: config |", "|---|---|---|---|---|---|---|---|"]
        for r in fp8:
            f16 = r["fp16_us"]
            sm = r.get("scaled_mm_us")
            c = r.get("fp8_cfg", {})
            cfg = " ".join([c.get("kind", "")] + [f"{k_}={v}" for k_, v in c.items()
                                                  if k_ not in ("kind", "us", "GROUP_M")])
            out.append(f"| {r['N']}×{r['K']} | {r['M']} | {fmt(f16)} | {fmt(r['fp8_us'])} "
                       f"({f16 / r['fp8_us']:.2f}×) | {fmt(r['fp8_gemm_us'])} "
                       f"({f16 / r['fp8_gemm_us']:.2f}×) | {fmt(r['fp8_fast_gemm_us'])} "
                       f"({f16 / r['fp8_fast_gemm_us']:.2f}×) | "
                       + (f"{fmt(sm)} ({f16 / sm:.2f}×)" if sm else "–") + f" | {cfg} |")
    out += ["", "Correctness on the GPU (relative Frobenius error against float32 math on the "
            "same dequantized weights / int8 codes): " + ", ".join(
                f"{name}: {e:.1e}" for name, e in checks), ""]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-md", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="one shape, M in {1, 16}")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--skip-w4", action="store_true", help="only the W8A8 / FP8 rows")
    ap.add_argument("--shapes", default=None, help="e.g. 8192x8192,4096x4096")
    ap.add_argument("--ms", default=None, help="e.g. 1,16")
    a = ap.parse_args(argv)
    t0 = time.time()
    import triton
    p = torch.cuda.get_device_properties(0)
    env = {"gpu": p.name, "sms": p.multi_processor_count,
           "l2_mb": round(p.L2_cache_size / 2**20), "torch": torch.__version__,
           "triton": triton.__version__, "python": platform.python_version(),
           "driver": os.popen("nvidia-smi --query-gpu=driver_version --format=csv,noheader")
           .read().strip() or "?"}
    log(json.dumps(env))
    copy_bw = copy_bandwidth()
    log(f"copy bandwidth {copy_bw / 1e12:.3f} TB/s")
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] \
        if a.shapes else SHAPES
    ms = [int(v) for v in a.ms.split(",")] if a.ms else MS
    if a.quick:
        shapes, ms = [(8192, 8192)], [1, 16]
    gl_make, gl_note = (None, "GemLite not run") if a.no_peers else gemlite_factory()
    rows, w8rows, checks = [], [], []
    for n, k in shapes if not a.skip_w4 else []:
        bench_wq(n, k, ms, 4, copy_bw, gl_make, rows, checks, peers=not a.no_peers)
    for n, k in shapes:
        bench_w8a8(n, k, ms, w8rows, checks)
    copy_bw = max(copy_bw, copy_bandwidth())  # again, warm: the larger of the two is used
    log(f"copy bandwidth (max of two) {copy_bw / 1e12:.3f} TB/s")
    for r in rows:  # against the final bandwidth figure
        r["bw_frac"] = r["bytes"] / (r["ours_us"] * 1e-6) / copy_bw
        r["ideal_us"] = r["bytes"] / copy_bw * 1e6
    md = markdown(env, rows, w8rows, checks, copy_bw, gl_note, time.time() - t0)
    print(md)
    if a.write_md:
        a.write_md.write_text(md)
    if a.json:
        a.json.write_text(json.dumps({"env": env, "copy_bw": copy_bw, "w4a16": rows,
                                      "w8a8": w8rows, "checks": checks,
                                      "tuner": ops.TUNER._load(),
                                      "trials": ops.TUNER.trials}, indent=1, default=str))


if __name__ == "__main__":
    main()
