"""Exploration of the M = 1 W4A16 GEMV on a CUDA GPU (run by hand, never in CI).

    python benchmarks/triton_explore_gemv.py [--shapes 8192x8192,...] [--ms 1] [--json out.json]

Times, with the method of ``triton_kernels.py`` (CUDA-graph replays, weights rotated beyond L2),
float16 ``F.linear`` and every float16-pair GEMV tile of the tuning space (``ops.GEMV_CONFIGS``),
each launched with programmatic dependent launch where the GPU has it (as in a decode step).
Each candidate's relative error against float math on the same weights is printed beside its
time; the tiles are sorted by time in the JSON summary. ``STREAM=...`` also times a loads-only
kernel with the GEMV's access pattern (what streaming the packed words alone costs).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_kernels as TK  # noqa: E402

ops = TK.ops
GROUP = 128
BITS = 4


def tag(c):
    keys = ("BLOCK_N", "CHUNKS", "SPLIT_K", "num_warps", "PREFETCH", "PDL", "ACC", "KMAJOR")
    return "gemv " + " ".join(f"{k}={c[k]}" for k in keys if k in c)


# GEMV_VARIANTS="rm,..." (environment): each tile also timed row-major (rm: the float16-pair
# tile before chunk-major tiles) or chunk-major without float16 accumulation over 4 words
# (km-acc1); GEMV_EXTRA="bn:ch:sk:nw:pf,..." adds chunk-major float16-pair tiles.
VARIANTS = {"rm": {"KMAJOR": False, "ACC": 1}, "km-acc1": {"ACC": 1}}


def extra_tiles() -> list[dict]:
    out = []
    for item in filter(None, os.environ.get("GEMV_EXTRA", "").split(",")):
        bn, ch, sk, nw, pf = map(int, item.split(":"))
        out.append(ops._gemv(bn, ch, sk, nw, pf=pf, h2=True, km=True))
    return out


def cands(kw: int) -> list[dict]:
    pdl = ops.pdl_supported(torch.device("cuda"))
    out = [c for c in ops.GEMV_CONFIGS if c.get("HALF2") and ops._fits(c, kw, BITS, GROUP)]
    names = [v for v in os.environ.get("GEMV_VARIANTS", "").split(",") if v]
    out = out + [dict(c, **VARIANTS[v]) for c in out for v in names] + extra_tiles()
    return [dict(c, PDL=True) for c in out] if pdl else out


@triton.jit
def _stream_kernel(qw_ptr, out_ptr, KW, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
                   PF: tl.constexpr, CONTIG: tl.constexpr):
    """XOR of a program's words, loaded with the GEMV's chunk-major tile and prefetch."""
    pid = tl.program_id(0)
    offs_c = tl.arange(0, CHUNKS)
    offs_r = tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, 16)
    if CONTIG:  # the program's step: BLOCK_N * CHUNKS * 16 consecutive words
        off = (offs_c[:, None, None] * 16 + offs_r[None, :, None] * (CHUNKS * 16)
               + offs_i[None, None, :])
        base = qw_ptr + pid * BLOCK_N * KW + off
        stride = BLOCK_N * CHUNKS * 16
    else:
        off = (offs_c[:, None, None] * 16 + (pid * BLOCK_N + offs_r)[None, :, None] * KW
               + offs_i[None, None, :])
        base = qw_ptr + off
        stride = CHUNKS * 16
    steps = KW // (CHUNKS * 16)
    acc = tl.zeros(off.shape, dtype=tl.int32)
    nxt = tl.load(base, eviction_policy="evict_first")
    nxt2 = tl.load(base + tl.minimum(1, steps - 1) * stride, eviction_policy="evict_first")
    for st in range(steps):
        words = nxt
        if PF >= 2:
            nxt = nxt2
            nxt2 = tl.load(base + tl.minimum(st + 2, steps - 1) * stride,
                           eviction_policy="evict_first")
        else:
            nxt = tl.load(base + tl.minimum(st + 1, steps - 1) * stride,
                          eviction_policy="evict_first")
        acc ^= words
    r = tl.xor_sum(tl.xor_sum(acc, 2), 0)
    tl.store(out_ptr + pid * BLOCK_N + offs_r, r)


def stream_words(qw, bn, ch, nw, pf, contig):
    out = torch.empty(qw.shape[0], dtype=torch.int32, device=qw.device)
    _stream_kernel[(qw.shape[0] // bn,)](qw, out, qw.shape[1], BLOCK_N=bn, CHUNKS=ch, PF=pf,
                                         CONTIG=contig, num_warps=nw)
    return out


def explore(n, k, ms, out):
    wt = TK.rotated_w4_weights(n, k, BITS, GROUP)
    qw, s, qws, ss, ws, wref = (wt[key] for key in ("qw", "s", "qws", "ss", "ws", "wref"))
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = F.linear(x.float(), wref.float())
        fp16 = TK.graph_time_us([lambda w_=w_: F.linear(x, w_) for w_ in ws])
        rows = {"N": n, "K": k, "M": m, "fp16_us": fp16, "cands": []}
        TK.log(f"{n}x{k} M={m}: fp16 {fp16:.1f} us")
        # the GEMV's loads without its arithmetic (STREAM="bn:ch:nw:pf:contig,..."): what
        # streaming the packed words alone costs in the GEMV's access pattern (contig 0: a
        # program reads BLOCK_N rows, 64 * CHUNKS bytes of each a step, as the GEMV does) or
        # with each program's step one contiguous block (contig 1: a layout that does not exist)
        for item in filter(None, os.environ.get("STREAM", "").split(",")):
            bn, ch, nw, pf, contig = map(int, item.split(":"))
            t = TK.graph_time_us([lambda q_=q_: stream_words(q_, bn, ch, nw, pf, contig)
                                  for q_ in qws])
            rows.setdefault("stream", []).append({"tile": item, "us": t})
            TK.log(f"  loads only bn={bn} ch={ch} nw={nw} pf={pf} contig={contig}: {t:.2f} us "
                   f"({qw.numel() * 4 / t / 1e6:.2f} TB/s)")
        for c in cands(qw.shape[1]):
            try:
                yo = ops._launch_wq(c, x, qw, s, None, None, BITS, GROUP)
                err = ((yo.float() - ref).norm() / ref.norm()).item()
                t = TK.graph_time_us([lambda q_=q_, s_=s_: ops._launch_wq(
                    c, x, q_, s_, None, None, BITS, GROUP) for q_, s_ in zip(qws, ss)])
            except Exception as e:  # noqa: BLE001
                TK.log(f"  {tag(c)}: {type(e).__name__}: {str(e)[:160]}")
                continue
            rows["cands"].append({"cfg": c, "us": t, "x_fp16": fp16 / t, "err": err})
            TK.log(f"  {tag(c):80s} {t:7.2f} us  {fp16 / t:5.2f}x  err {err:.1e}")
        rows["cands"].sort(key=lambda r: r["us"])
        if rows["cands"]:
            b = rows["cands"][0]
            TK.log(f"  BEST {tag(b['cfg'])}: {b['us']:.2f} us = {b['x_fp16']:.2f}x fp16")
        out.append(rows)
    del wt, qws, ss, ws
    torch.cuda.empty_cache()


if __name__ == "__main__":
    TK.explore_main(explore, "1", __doc__)
