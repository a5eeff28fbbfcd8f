"""Exploration of the tiled W4A16 paths at M = 128 and M = 2048 on a CUDA GPU (run by hand).

    python benchmarks/triton_explore_tiled.py [--shapes 8192x8192,...] [--ms 128,2048]

Times, with the method of ``triton_kernels.py`` (CUDA-graph replays, weights rotated beyond L2):
float16 ``F.linear``; the plane-by-plane tiled kernel (SWAP: the weights are the register operand)
and the natural-order kernel over a set of tiles; at large M also the dequantize kernel alone,
cuBLAS alone on its output, the two together, and cuBLAS on W^T. Run once as is and once with
``DISABLE_MMA_V3=1`` (Triton then emits Ampere-style mma.sync instead of Hopper's wgmma; the
variable is part of Triton's cache key). Prints one line per candidate and a JSON summary.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_kernels as TK  # noqa: E402

ops = TK.ops
K = ops.K
GROUP = 128
BITS = 4


V2 = os.environ.get("DISABLE_MMA_V3") == "1"


def cands(m: int) -> list[dict]:
    """Tiles to time at this M: the plane-by-plane kernel (kind mm) under SWAP in both runs, and
    the natural-order kernel (kind nat) in the run with Hopper's wgmma (not DISABLE_MMA_V3)."""
    mm = ops._mm
    if m <= 32:
        out = [mm(16, bn, sk, nw, ns, swap=True) for bn, sk, nw, ns in (
            (64, 4, 4, 3), (128, 4, 4, 3), (128, 2, 4, 3), (64, 8, 4, 3), (256, 4, 8, 3),
            (128, 8, 4, 3), (64, 2, 4, 3))]
    elif m <= 256:
        out = [mm(bm, bn, sk, nw, ns, swap=True) for bm, bn, sk, nw, ns in (
            (128, 128, 4, 8, 3), (128, 128, 2, 8, 3), (128, 128, 8, 8, 3), (128, 64, 4, 4, 3),
            (128, 64, 8, 4, 3), (64, 128, 4, 4, 3), (128, 256, 4, 8, 3), (128, 128, 4, 4, 3),
            (64, 64, 8, 4, 3), (128, 128, 4, 8, 4), (128, 128, 1, 8, 3), (128, 256, 2, 8, 3),
            (64, 128, 8, 4, 3), (128, 64, 4, 8, 3))]
        if not V2:
            out += [ops._nat(128, 128, sk, 8, 2, h2=True, maxnreg=128) for sk in (4, 8)]
            out += [ops._nat(128, 128, 4, 8, ns, h2=True) for ns in (3, 4)]
    else:
        out = [mm(bm, bn, 1, nw, ns, swap=True) for bm, bn, nw, ns in (
            (128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 4, 3),
            (64, 128, 4, 3), (128, 128, 8, 4), (256, 128, 8, 2), (128, 256, 8, 2))]
    return out


# OVERLAP="parts:carveout:cat:seq,..." (environment): dequantize + cuBLAS in row parts of W,
# part i + 1 dequantized on a side stream while cuBLAS multiplies part i (carveout: SMs left out
# of cuBLAS's grid for the dequantization; cat: each part's product into its own buffer, then
# one concatenation, instead of cuBLAS writing the column slice of y; seq: one stream, each
# part multiplied right after its dequantization, while it is still in L2).
OVERLAP = [tuple(int(v) for v in (item + ":0:0:0").split(":")[:4])
           for item in os.environ.get("OVERLAP", "").split(",") if item]
_SIDE: list = []


def overlapped_dequant_linear(x, qw, s, k, parts, carve, cat, bufs, seq=0):
    """y = x W^T with W dequantized part by part (rows) on a side stream, overlapping cuBLAS."""
    n = qw.shape[0]
    if not _SIDE:
        _SIDE.append(torch.cuda.Stream())
    main = torch.cuda.current_stream()
    side = main if seq else _SIDE[0]
    step = n // parts
    y = torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype)
    outs, ready, done = [], [], []
    side.wait_stream(main)

    def dequant(i):  # on the side stream; the buffer of part i was last read by product i - 2
        with torch.cuda.stream(side):
            if i >= 2 and not seq:
                side.wait_event(done[i - 2])
            ops.dequantize(qw[i * step:(i + 1) * step], s[i * step:(i + 1) * step], None,
                           BITS, GROUP, k, out=bufs[i % 2][:step])
            ready.append(torch.cuda.Event())
            ready[-1].record(side)

    dequant(0)
    for i in range(parts):
        if i + 1 < parts and not seq:
            dequant(i + 1)
        elif seq and i > 0:
            dequant(i)
        main.wait_event(ready[i])
        w = bufs[i % 2][:step]
        torch._C._set_sm_carveout_experimental(carve or None)
        try:
            if cat:
                outs.append(F.linear(x, w))
            else:
                torch.mm(x, w.t(), out=y[:, i * step:(i + 1) * step])
        finally:
            torch._C._set_sm_carveout_experimental(None)
        done.append(torch.cuda.Event())
        done[-1].record(main)
    main.wait_stream(side)
    return torch.cat(outs, 1) if cat else y


def tag(c):
    keys = ("BLOCK_M", "BLOCK_N", "SPLIT_K", "num_warps", "num_stages", "SWAP", "H2", "maxnreg")
    return (("v2 " if V2 else "v3 ") + c["kind"] + " "
            + " ".join(f"{k}={c[k]}" for k in keys if k in c))


def large_m_studies(n, k, x, ref, qws, ss, ws, rec, rows):
    """At large M: the dequantization alone (per tile with DEQUANT, beside a plain fill of its
    output), cuBLAS alone, the two together, the calls sweep (CALLS_SWEEP), the interference
    checks (INTERFERENCE=1), the overlapped forms (OVERLAP) and cuBLAS on W^T."""
    wbuf = torch.empty(n, k, device="cuda", dtype=torch.float16)

    def dequant(**tile):  # one call per rotated copy, into wbuf
        return [lambda q_=q_, s_=s_: ops.dequantize(q_, s_, None, BITS, GROUP, k, out=wbuf,
                                                    **tile) for q_, s_ in zip(qws, ss)]

    def dequant_linear():
        return [lambda f=f: F.linear(x, f()) for f in dequant()]

    t = TK.graph_time_us(dequant())
    rec(f"dequant only ({n * k * 2.5 / t / 1e6:.2f} TB/s)", t, part=True)
    rec("cuBLAS only on one W buffer", TK.graph_time_us([lambda: F.linear(x, wbuf)]))
    rec("dequant+cublas", TK.graph_time_us(dequant_linear()))
    # DEQUANT="bn:bk:nw,..." (environment): the dequantization alone per tile, beside a plain
    # fill of the same float16 buffer (the write-only ceiling)
    for item in filter(None, os.environ.get("DEQUANT", "").split(",")):
        bn, bk, nw = map(int, item.split(":"))
        t = TK.graph_time_us(dequant(block_n=bn, block_k=bk, num_warps=nw))
        rec(f"dequant only bn={bn} bk={bk} nw={nw} ({n * k * 2.5 / t / 1e6:.2f} TB/s)", t,
            part=True)
    if os.environ.get("DEQUANT"):
        t = TK.graph_time_us([lambda: wbuf.fill_(1.0)])
        rec(f"fill of the float16 buffer ({n * k * 2 / t / 1e6:.2f} TB/s written)", t, part=True)
    for calls in [int(v) for v in os.environ.get("CALLS_SWEEP", "").split(",") if v]:
        # the same two timed with a given number of calls a replay (a longer replay runs longer
        # at the power limit)
        f16 = TK.graph_time_us([lambda w_=w_: F.linear(x, w_) for w_ in ws], calls=calls)
        dq = TK.graph_time_us(dequant_linear(), calls=calls)
        TK.log(f"  calls={calls:3d}: fp16 {f16:7.1f} us, dequant+cublas {dq:7.1f} us "
               f"= {f16 / dq:.2f}x")
        rows.setdefault("calls_sweep", []).append(
            {"calls": calls, "fp16_us": f16, "dequant_cublas_us": dq})
    if os.environ.get("INTERFERENCE") == "1":
        # is the time over dequant + cuBLAS from the data (cuBLAS reading what was just
        # written) or from running after a memory-bound kernel at all?
        wb2 = torch.empty_like(wbuf).copy_(wbuf)
        rec("dequant into A, then cuBLAS on B", TK.graph_time_us(
            [lambda f=f: (f(), F.linear(x, wb2)) for f in dequant()]))
        rec("cuBLAS on B, then dequant into A", TK.graph_time_us(
            [lambda f=f: (F.linear(x, wb2), f()) for f in dequant()]))
        src = torch.empty(n * k // 4, device="cuda", dtype=torch.float16)

        def copy_then_linear():  # the dequantization's bytes: a quarter read, all of W written
            for quarter in wbuf.view(4, -1):
                quarter.copy_(src)
            return F.linear(x, wbuf)

        rec("copy (same bytes as dequant) into A, then cuBLAS on A",
            TK.graph_time_us([copy_then_linear]))
        rec("two cuBLAS on B", TK.graph_time_us([lambda: (F.linear(x, wb2), F.linear(x, wb2))]))
        del wb2, src
    for parts, carve, cat, seq in OVERLAP:
        try:
            bufs = [torch.empty(n, k, device="cuda", dtype=torch.float16) for _ in range(2)]
            y = overlapped_dequant_linear(x, qws[0], ss[0], k, parts, carve, cat, bufs, seq)
            err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
            t = TK.graph_time_us([lambda q_=q_, s_=s_: overlapped_dequant_linear(
                x, q_, s_, k, parts, carve, cat, bufs, seq) for q_, s_ in zip(qws, ss)])
            rec(f"overlap parts={parts} carveout={carve} cat={cat} seq={seq}", t, err)
        except Exception as e:  # noqa: BLE001
            TK.log(f"  overlap {parts}:{carve}:{cat}:{seq}: {type(e).__name__}: {str(e)[:200]}")
    wts = [w_.t().contiguous() for w_ in ws]
    rec("fp16 rotated, W^T [K, N] contiguous: mm(x, W^T)",
        TK.graph_time_us([lambda w_=w_: torch.mm(x, w_) for w_ in wts]))


def explore(n, k, ms, out):
    wt = TK.rotated_w4_weights(n, k, BITS, GROUP)
    qw, s, qws, ss, ws, wref = (wt[key] for key in ("qw", "s", "qws", "ss", "ws", "wref"))
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = F.linear(x, wref)
        fp16 = TK.graph_time_us([lambda w_=w_: F.linear(x, w_) for w_ in ws])
        rows = {"N": n, "K": k, "M": m, "fp16_us": fp16, "cands": []}
        TK.log(f"{n}x{k} M={m}: fp16 {fp16:.1f} us")

        def rec(name, t, err=None, part=False):  # part: not a whole product (no BEST)
            rows["cands"].append({"name": name, "us": t, "x_fp16": fp16 / t, "err": err,
                                  "part": part})
            e = "" if err is None else f" err {err:.1e}"
            TK.log(f"  {name:60s} {t:8.1f} us  {fp16 / t:5.2f}x{e}")

        for c in ([] if os.environ.get("NO_TILES") == "1" else cands(m)):
            try:
                yo = ops._launch_wq(c, x, qw, s, None, None, BITS, GROUP)
                err = ((yo.float() - ref.float()).norm() / ref.float().norm()).item()
                t = TK.graph_time_us([lambda q_=q_, s_=s_: ops._launch_wq(
                    c, x, q_, s_, None, None, BITS, GROUP) for q_, s_ in zip(qws, ss)])
                rec(tag(c), t, err)
            except Exception as e:  # noqa: BLE001
                TK.log(f"  {tag(c)}: {type(e).__name__}: {str(e)[:160]}")
        if m >= 1024 and not V2:
            large_m_studies(n, k, x, ref, qws, ss, ws, rec, rows)
        best = min((r for r in rows["cands"] if not r["part"]), key=lambda r: r["us"])
        TK.log(f"  BEST {best['name']}: {best['us']:.1f} us = {best['x_fp16']:.2f}x fp16")
        out.append(rows)


if __name__ == "__main__":
    TK.explore_main(explore, "128,2048", __doc__)
