"""Exploration: Gluon (Hopper wgmma) W4A16 kernels for M >= 16 (run by hand, never in CI).

    python benchmarks/triton_explore_gluon.py [--shapes 8192x8192,...] [--ms 16,128,2048]
    python benchmarks/triton_explore_gluon.py --compile-only     # no GPU: compile for sm_90
    ncu ... python benchmarks/triton_explore_gluon.py --profile gluon   # one M = 128 config

Needs triton >= 3.6 (Gluon); compiles with 3.6 and 3.9 (aliases for the renamed calls). Gluon
kernels do not run under ``TRITON_INTERPRET``, which is why none of this is in the ``triton``
target (its kernels are tested on the CPU in CI).

Why: plain Triton cannot keep a register-operand ``wgmma`` in flight while the next weights are
dequantized (it waits for each product; BENCHMARKS-triton.md, ninth session), which caps the
target's tiled W4A16 path at 0.69-0.77x float16 at M = 128. Gluon exposes the asynchronous
``warpgroup_mma`` / ``warpgroup_mma_wait(num_outstanding)`` and explicit layouts.

The kernel computes ``y = x Wᵀ`` as ``yᵀ = W xᵀ``: the weights are the register operand A
(rows of W = the MMA's M, 64 a warpgroup), the activations the shared-memory operand B (tokens =
the MMA's N), brought in by TMA through a ring of ``STAGES`` buffers. It reads the ``triton``
target's packed layout unchanged (``packing.py``: chunks of 16 int32 words a row; bit field j of
word i of chunk c holds the code of k = 128 c + 16 j + i). Plane j of a chunk is therefore a
K = 16 slice, and the words a thread holds in the wgmma A-operand register layout (rows r, r + 8;
words 2t, 2t + 1, 2t + 8, 2t + 9 for t = lane % 4) are exactly the words whose plane j gives its
A fragment for slice j: 8 words a thread a chunk feed 8 products, with no data exchanged.
Dequantization: ``(code | 0x6400)`` read as float16 is 1024 + code, so ``w = (that - 1032) * s``
for symmetric 4-bit codes (zero point 8), in float16 as the target's kernels do. ``FAST``: one
``prmt`` a chunk puts words 2t and 2t + 1 (the fragment's k and k + 1) side by side, then each
plane is a float16 pair in four instructions (``shr``, ``lop3``, ``sub.f16x2``, ``mul.f16x2``).

Variants (:data:`VARIANTS`):

* ``gluon``: one warpgroup a tile, dequantizing each plane right before its product with one
  product in flight (``warpgroup_mma_wait(1)``), words by cp.async, activations by TMA;
* ``gluon-dual``: two such warpgroups a tile over alternate chunks (warp-specialized), sums
  added through shared memory;
* ``gluon-ws``: warp-specialized producer / consumer: 4 warps dequantize into shared memory, one
  warp loads the activations by TMA, one warpgroup issues shared-memory products.

What limits them (ncu, M = 128, 8192 x 8192): one warp a scheduler issuing the dequantization's
dependent instructions (the tensor pipe about 41 % busy, stalls mostly fixed-latency waits), not
memory. Measurements: BENCHMARKS-triton.md, thirteenth session.

Limits of this exploration: symmetric codes, groups of 128, K a multiple of 128.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

#: triton 3.6 names the TMA load async_copy_global_to_shared; 3.9 async_load (the old name raises)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
#: cp.async into shared memory: async_copy_global_to_shared in 3.6, async_load in 3.9
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
#: a CTA-wide barrier: thread_barrier in 3.6, barrier in 3.9
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
GROUP = 128


@gluon.jit
def _plane(w, sc, J: gl.constexpr):
    """The float16 weights of plane J (k = 16 J .. 16 J + 15 of the chunk) of the words ``w``."""
    code = ((w >> (4 * J)) & 15) | 0x6400
    return (code.to(gl.int16).to(gl.float16, bitcast=True) - 1032.0) * sc


@gluon.constexpr_function
def _plane_asm_src(j):
    """PTX for plane ``j`` of a word pair prepared by :func:`_pair_words`: field ``j % 4`` of the
    low (j < 4) or high half-words, ``(1024 + u) - 1032`` exact, then times the scale pair."""
    src = "$1" if j < 4 else "$2"
    shift = 4 * (j % 4)
    take = f"shr.u32 t, {src}, {shift};" if shift else f"mov.b32 t, {src};"
    return ("{ .reg .b32 t, c; mov.b32 c, 0x64086408; " + take +
            " lop3.b32 t, t, 0x000F000F, 0x64006400, 0xEA; sub.f16x2 t, t, c;"
            " mul.rn.f16x2 $0, t, $3; }")


@gluon.jit
def _pair_words(w):
    """Words 2t and 2t + 1 of a thread (k and k + 1 of the A fragment) -> their low half-words
    side by side (fields 0-3 of each: planes 0-3) and their high half-words (planes 4-7)."""
    return gl.inline_asm_elementwise(
        "prmt.b32 $0, $2, $3, 0x5410; prmt.b32 $1, $2, $3, 0x7632;", "=r,=r,r,r", [w],
        dtype=gl.int32, is_pure=True, pack=2)


@gluon.jit
def _plane_fast(p, sc, J: gl.constexpr):
    """Plane J as float16 pairs from :func:`_pair_words`' output (4 instructions a pair)."""
    return gl.inline_asm_elementwise(_plane_asm_src(J), "=r,r,r,r", [p, sc],
                                     dtype=gl.float16, is_pure=True, pack=2)


@gluon.jit
def _x_slice(x_s0, x_s1, st, J: gl.constexpr):
    """The activations of plane J as the wgmma B operand ``[16, BM]``."""
    if J < 4:
        return x_s0.index(st).slice(16 * J, 16, dim=1).permute((1, 0))
    else:
        return x_s1.index(st).slice(16 * (J - 4), 16, dim=1).permute((1, 0))


@gluon.jit
def _mainloop(x_desc, qw_ptr, st_ptr, x_s0, x_s1, w_s, s_s, bars, off_n, off_m, c0, c_step,
              n_chunks, N, KW, BN: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr,
              WST: gl.constexpr, FAST: gl.constexpr, NW: gl.constexpr):
    """One warpgroup over chunks ``c0, c0 + c_step, ...`` (``n_chunks`` of them): words and
    scales by cp.async through a ring of WST chunks, activations by TMA through a ring of
    STAGES; each plane dequantized in registers right before its product, one product in
    flight while the next plane is dequantized. Returns the ``[BN, BM]`` float32 sums."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                  instr_shape=[16, BM, 16])
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    # cp.async sources: 16 bytes (4 words) a thread, 4 threads a row; scales 16 bytes a thread
    cp_w: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [NW, 1], [1, 0])
    cp_s: gl.constexpr = gl.BlockedLayout([8], [32], [NW], [0])
    w_src = (qw_ptr + gl.expand_dims(off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, cp_w)), 1)
             * KW + gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(0, cp_w)), 0))
    s_src = st_ptr + off_n + gl.arange(0, BN, layout=cp_s)   # scales stored [K / 128, N]
    nbytes: gl.constexpr = 2 * x_desc.block_type.nbytes
    for i in gl.static_range(STAGES - 1):
        p = i < n_chunks
        c = c0 + i * c_step
        mbarrier.expect(bars.index(i), nbytes, pred=p)
        _tma_load(x_desc, [off_m, c * 128], bars.index(i), x_s0.index(i), pred=p)
        _tma_load(x_desc, [off_m, c * 128 + 64], bars.index(i), x_s1.index(i), pred=p)
    for i in gl.static_range(WST - 1):
        p = i < n_chunks
        c = c0 + i * c_step
        _cp_async(w_s.index(i), w_src + c * 16, mask=p)
        _cp_async(s_s.index(i), s_src + c * N, mask=p)
        async_copy.commit_group()

    acc = gl.zeros([BN, BM], gl.float32, layout=mma)
    a_prev = gl.zeros([BN, 16], gl.float16, layout=a_op)
    for kt in range(n_chunks):
        st = kt % STAGES
        sw = kt % WST
        async_copy.wait_group(WST - 2)      # this chunk's words and scales have landed
        _cta_barrier()
        w = w_s.index(sw).load(a_op)
        sc = gl.expand_dims(s_s.index(sw).load(gl.SliceLayout(1, a_op)), 1)
        if FAST:
            w = _pair_words(w)
        mbarrier.wait(bars.index(st), (kt // STAGES) & 1)
        for j in gl.static_range(8):
            if FAST:
                a = _plane_fast(w, sc, j)
            else:
                a = _plane(w, sc, j)
            acc = warpgroup_mma(a, _x_slice(x_s0, x_s1, st, j), acc, is_async=True)
            # the previous product is done: its register operand may go
            acc, a_prev = warpgroup_mma_wait(num_outstanding=1, deps=[acc, a_prev])
            a_prev = a
        # every product of chunk kt - 1 is done: its activation buffer takes chunk
        # kt + STAGES - 1; its words buffer (read before this chunk's barrier) chunk kt + WST - 1
        nk = kt + STAGES - 1
        ns = nk % STAGES
        p = nk < n_chunks
        c = c0 + nk * c_step
        mbarrier.expect(bars.index(ns), nbytes, pred=p)
        _tma_load(x_desc, [off_m, c * 128], bars.index(ns), x_s0.index(ns), pred=p)
        _tma_load(x_desc, [off_m, c * 128 + 64], bars.index(ns), x_s1.index(ns), pred=p)
        nw = kt + WST - 1
        p = nw < n_chunks
        c = c0 + nw * c_step
        _cp_async(w_s.index(nw % WST), w_src + c * 16, mask=p)
        _cp_async(s_s.index(nw % WST), s_src + c * N, mask=p)
        async_copy.commit_group()
    acc, a_prev = warpgroup_mma_wait(num_outstanding=0, deps=[acc, a_prev])
    async_copy.wait_group(0)
    return acc


@gluon.jit
def _rings(x_desc, BN: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr,
           WST: gl.constexpr):
    """The shared buffers of one :func:`_mainloop`: words, scales, activations, barriers."""
    w_lay: gl.constexpr = gl.SwizzledSharedLayout(vec=2, per_phase=1, max_phase=8, order=[1, 0])
    s_lay: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    w_s = gl.allocate_shared_memory(gl.int32, [WST, BN, 16], w_lay)
    s_s = gl.allocate_shared_memory(gl.float16, [WST, BN], s_lay)
    x_s0 = gl.allocate_shared_memory(gl.float16, [STAGES, BM, 64], x_desc.layout)
    x_s1 = gl.allocate_shared_memory(gl.float16, [STAGES, BM, 64], x_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    return x_s0, x_s1, w_s, s_s, bars


@gluon.jit
def _store_out(acc, y_ptr, off_n, off_m, M, N, BN: gl.constexpr, BM: gl.constexpr,
               SPLIT_K: gl.constexpr, num_warps: gl.constexpr):
    """``y[m, n] = acc[n, m]``: float16, or float32 added atomically when K is split."""
    out: gl.constexpr = gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[8, 4],
                                         warps_per_cta=[1, num_warps], order=[0, 1])
    yt = gl.convert_layout(acc, out)
    on = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, out))
    om = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, out))
    ptrs = y_ptr + gl.expand_dims(om, 0) * N + gl.expand_dims(on, 1)
    mask = gl.expand_dims(om, 0) < M
    if SPLIT_K == 1:
        gl.store(ptrs, yt.to(gl.float16), mask=mask)
    else:
        gl.atomic_add(ptrs, yt, mask=mask)


@gluon.jit
def w4a16_wgmma_kernel(x_desc, qw_ptr, st_ptr, y_ptr, M, N, K,
                       BN: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr,
                       WST: gl.constexpr, SPLIT_K: gl.constexpr, FAST: gl.constexpr,
                       num_warps: gl.constexpr):
    """One warpgroup a tile (:func:`_mainloop`); SPLIT_K programs over K add atomically."""
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    pid_k = gl.program_id(2)
    off_n = pid_n * BN
    off_m = pid_m * BM
    chunks = K // 128
    per_split = gl.cdiv(chunks, SPLIT_K)
    c0 = pid_k * per_split
    n_chunks = gl.minimum(chunks - c0, per_split)
    x_s0, x_s1, w_s, s_s, bars = _rings(x_desc, BN, BM, STAGES, WST)
    acc = _mainloop(x_desc, qw_ptr, st_ptr, x_s0, x_s1, w_s, s_s, bars, off_n, off_m, c0, 1,
                    n_chunks, N, K // 8, BN, BM, STAGES, WST, FAST, num_warps)
    _store_out(acc, y_ptr, off_n, off_m, M, N, BN, BM, SPLIT_K, num_warps)


@gluon.jit
def _dual_first(x_desc, qw_ptr, st_ptr, x_s0, x_s1, w_s, s_s, bars, red_s, red_bar, off_n,
                off_m, chunks, N, KW, BN: gl.constexpr, BM: gl.constexpr,
                STAGES: gl.constexpr, WST: gl.constexpr, FAST: gl.constexpr,
                num_warps: gl.constexpr):
    """Default partition: the even chunks, plus the other warpgroup's sums once they land."""
    acc = _mainloop(x_desc, qw_ptr, st_ptr, x_s0, x_s1, w_s, s_s, bars, off_n, off_m, 0, 2,
                    (chunks + 1) // 2, N, KW, BN, BM, STAGES, WST, FAST, num_warps)
    mbarrier.wait(red_bar.index(0), 0)
    return (acc + red_s.load(acc.type.layout),)


@gluon.jit
def _dual_second(x_desc, qw_ptr, st_ptr, x_s0, x_s1, w_s, s_s, bars, red_s, red_bar, off_n,
                 off_m, chunks, N, KW, BN: gl.constexpr, BM: gl.constexpr,
                 STAGES: gl.constexpr, WST: gl.constexpr, FAST: gl.constexpr):
    """Worker partition (4 warps): the odd chunks; its sums go through shared memory."""
    acc = _mainloop(x_desc, qw_ptr, st_ptr, x_s0, x_s1, w_s, s_s, bars, off_n, off_m, 1, 2,
                    chunks // 2, N, KW, BN, BM, STAGES, WST, FAST, 4)
    red_s.store(acc)
    mbarrier.arrive(red_bar.index(0))


@gluon.jit
def w4a16_dual_kernel(x_desc, qw_ptr, st_ptr, y_ptr, M, N, K,
                      BN: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr,
                      WST: gl.constexpr, FAST: gl.constexpr, REGS: gl.constexpr,
                      num_warps: gl.constexpr):
    """Two warpgroups a tile, each :func:`_mainloop` over every other chunk with its own rings
    (two instruction streams a scheduler to hide the dequantization's latency); the second's
    float32 sums are added through shared memory, no atomics."""
    off_n = gl.program_id(0) * BN
    off_m = gl.program_id(1) * BM
    chunks = K // 128
    a0, a1, aw, asc, abar = _rings(x_desc, BN, BM, STAGES, WST)
    b0, b1, bw, bsc, bbar = _rings(x_desc, BN, BM, STAGES, WST)
    red_lay: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    red_s = gl.allocate_shared_memory(gl.float32, [BN, BM], red_lay)
    red_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    mbarrier.init(red_bar.index(0), count=1)
    res = gl.warp_specialize([
        (_dual_first, (x_desc, qw_ptr, st_ptr, a0, a1, aw, asc, abar, red_s, red_bar, off_n,
                       off_m, chunks, N, K // 8, BN, BM, STAGES, WST, FAST, num_warps)),
        (_dual_second, (x_desc, qw_ptr, st_ptr, b0, b1, bw, bsc, bbar, red_s, red_bar, off_n,
                        off_m, chunks, N, K // 8, BN, BM, STAGES, WST, FAST)),
    ], [4], [REGS])
    _store_out(res[0], y_ptr, off_n, off_m, M, N, BN, BM, 1, num_warps)


@gluon.jit
def _ws_mma(a_s0, a_s1, x_s0, x_s1, a_ready, x_ready, a_empty, x_empty, n_chunks,
            BN: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """Default partition: the products, both operands from shared memory; a chunk's buffers go
    back to their producers once its products are done."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BM, 16])
    acc = gl.zeros([BN, BM], gl.float32, layout=mma)
    for kt in range(n_chunks):
        st = kt % STAGES
        ph = (kt // STAGES) & 1
        mbarrier.wait(a_ready.index(st), ph)
        mbarrier.wait(x_ready.index(st), ph)
        for j in gl.static_range(8):
            if j < 4:
                a = a_s0.index(st).slice(16 * j, 16, dim=1)
            else:
                a = a_s1.index(st).slice(16 * (j - 4), 16, dim=1)
            acc = warpgroup_mma(a, _x_slice(x_s0, x_s1, st, j), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        mbarrier.arrive(a_empty.index(st))
        mbarrier.arrive(x_empty.index(st))
    return (acc,)


@gluon.jit
def _ws_xload(x_desc, x_s0, x_s1, x_ready, x_empty, off_m, c0, n_chunks,
              STAGES: gl.constexpr):
    """One warp: the activations of each chunk by TMA, as buffers come back."""
    for kt in range(n_chunks):
        st = kt % STAGES
        mbarrier.wait(x_empty.index(st), ((kt // STAGES) & 1) ^ 1)
        mbarrier.expect(x_ready.index(st), 2 * x_desc.block_type.nbytes)
        _tma_load(x_desc, [off_m, (c0 + kt) * 128], x_ready.index(st), x_s0.index(st))
        _tma_load(x_desc, [off_m, (c0 + kt) * 128 + 64], x_ready.index(st), x_s1.index(st))


@gluon.jit
def _ws_dequant(qw_ptr, st_ptr, w_s, s_s, a_s0, a_s1, a_ready, a_empty, off_n, c0, n_chunks,
                N, KW, BN: gl.constexpr, STAGES: gl.constexpr, WSTAGES: gl.constexpr,
                DQ_WARPS: gl.constexpr):
    """DQ_WARPS warps: words and scales by cp.async into their own ring, then each chunk's
    float16 weights into the A buffers (k = 16 j + i from bit field j of word i)."""
    blk: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [DQ_WARPS, 1], [1, 0])
    cp_s: gl.constexpr = gl.BlockedLayout([8], [32], [DQ_WARPS], [0])
    w_src = (qw_ptr + gl.expand_dims(off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, blk)), 1)
             * KW + gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(0, blk)), 0))
    s_src = st_ptr + off_n + gl.arange(0, BN, layout=cp_s)
    for i in gl.static_range(WSTAGES - 1):
        p = i < n_chunks
        _cp_async(w_s.index(i), w_src + (c0 + i) * 16, mask=p)
        _cp_async(s_s.index(i), s_src + (c0 + i) * N, mask=p)
        async_copy.commit_group()
    for kt in range(n_chunks):
        sw = kt % WSTAGES
        async_copy.wait_group(WSTAGES - 2)
        _cta_barrier()
        w = w_s.index(sw).load(blk)
        sc = gl.expand_dims(s_s.index(sw).load(gl.SliceLayout(1, blk)), 1)
        _cta_barrier()
        nk = kt + WSTAGES - 1
        p = nk < n_chunks
        _cp_async(w_s.index(nk % WSTAGES), w_src + (c0 + nk) * 16,
                                               mask=p)
        _cp_async(s_s.index(nk % WSTAGES), s_src + (c0 + nk) * N,
                                               mask=p)
        async_copy.commit_group()
        st = kt % STAGES
        mbarrier.wait(a_empty.index(st), ((kt // STAGES) & 1) ^ 1)
        for j in gl.static_range(8):
            if j < 4:
                a_s0.index(st).slice(16 * j, 16, dim=1).store(_plane(w, sc, j))
            else:
                a_s1.index(st).slice(16 * (j - 4), 16, dim=1).store(_plane(w, sc, j))
        fence_async_shared()
        mbarrier.arrive(a_ready.index(st))


@gluon.jit
def w4a16_ws_kernel(x_desc, qw_ptr, st_ptr, y_ptr, M, N, K,
                    BN: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr,
                    WSTAGES: gl.constexpr, DQ_WARPS: gl.constexpr, DQ_REGS: gl.constexpr,
                    num_warps: gl.constexpr):
    """Warp-specialized: DQ_WARPS warps dequantize into shared memory, one warp brings the
    activations by TMA, the kernel's warpgroup issues the products (both operands in shared
    memory), each stage handed over by a ready / empty barrier pair."""
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    off_n = pid_n * BN
    off_m = pid_m * BM
    n_chunks = K // 128
    a_lay: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, 64], gl.float16)
    a_s0 = gl.allocate_shared_memory(gl.float16, [STAGES, BN, 64], a_lay)
    a_s1 = gl.allocate_shared_memory(gl.float16, [STAGES, BN, 64], a_lay)
    x_s0 = gl.allocate_shared_memory(gl.float16, [STAGES, BM, 64], x_desc.layout)
    x_s1 = gl.allocate_shared_memory(gl.float16, [STAGES, BM, 64], x_desc.layout)
    w_lay: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    s_lay: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    w_s = gl.allocate_shared_memory(gl.int32, [WSTAGES, BN, 16], w_lay)
    s_s = gl.allocate_shared_memory(gl.float16, [WSTAGES, BN], s_lay)
    bar_lay: gl.constexpr = mbarrier.MBarrierLayout()
    a_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_lay)
    a_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_lay)
    x_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_lay)
    x_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_lay)
    for i in gl.static_range(STAGES):
        mbarrier.init(a_ready.index(i), count=1)
        mbarrier.init(a_empty.index(i), count=1)
        mbarrier.init(x_ready.index(i), count=1)
        mbarrier.init(x_empty.index(i), count=1)
    res = gl.warp_specialize([
        (_ws_mma, (a_s0, a_s1, x_s0, x_s1, a_ready, x_ready, a_empty, x_empty, n_chunks, BN, BM,
                   STAGES, num_warps)),
        (_ws_xload, (x_desc, x_s0, x_s1, x_ready, x_empty, off_m, 0, n_chunks, STAGES)),
        (_ws_dequant, (qw_ptr, st_ptr, w_s, s_s, a_s0, a_s1, a_ready, a_empty, off_n, 0,
                       n_chunks, N, K // 8, BN, STAGES, WSTAGES, DQ_WARPS)),
    ], [1, DQ_WARPS], [24, DQ_REGS])
    _store_out(res[0], y_ptr, off_n, off_m, M, N, BN, BM, 1, num_warps)


# ---------------------------------------------------------------------------------------------
# host side: one table of variants, each (kernel, its tile parameters, extra launch options)

#: kernel -> (names of its tile parameters in config order, launch options that are not
#: constexprs of the kernel signature); every config is a tuple in that order
VARIANTS = {
    "gluon": (w4a16_wgmma_kernel, ("BN", "BM", "STAGES", "WST", "SPLIT_K", "num_warps", "FAST")),
    "gluon-dual": (w4a16_dual_kernel, ("BN", "BM", "STAGES", "WST", "FAST", "REGS")),
    "gluon-ws": (w4a16_ws_kernel, ("BN", "BM", "STAGES", "WSTAGES", "DQ_WARPS", "DQ_REGS")),
}
#: the configs timed by default (the best of each kind in this session's runs, and the
#: plain-dequantization baseline); BENCHMARKS-triton.md has the rest
CONFIGS = {
    "gluon": [(64, 16, 6, 6, 4, 4, True), (64, 64, 4, 4, 1, 4, True),
              (64, 128, 4, 4, 1, 4, False), (64, 128, 4, 4, 1, 4, True),
              (64, 128, 3, 4, 1, 4, True), (128, 256, 3, 3, 1, 8, True)],
    "gluon-dual": [(64, 16, 4, 6, True, 240), (64, 64, 3, 4, True, 240)],
    "gluon-ws": [(64, 128, 4, 4, 4, 128)],
}


def x_layout(bm: int):
    return gl.NVMMASharedLayout.get_default_for([bm, 64], gl.float16)


def _params(variant: str, cfg: tuple) -> dict:
    params = dict(zip(VARIANTS[variant][1], cfg))
    params.setdefault("num_warps", 4)
    return params


def launch(variant: str, cfg: tuple, x, qw, st):
    """``y = x Wᵀ`` with one variant; ``st`` = the scales transposed, ``[K / 128, N]``
    contiguous (16-byte copies of 8 rows). A split K adds float32 partial sums atomically into a
    zeroed buffer, then casts: both counted."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    kernel = VARIANTS[variant][0]
    params = _params(variant, cfg)
    m, k = x.shape
    n = qw.shape[0]
    bn, bm, split = params["BN"], params["BM"], params.get("SPLIT_K", 1)
    desc = TensorDescriptor.from_tensor(x, [bm, 64], x_layout(bm))
    y = (torch.empty(m, n, device=x.device, dtype=torch.float16) if split == 1 else
         torch.zeros(m, n, device=x.device, dtype=torch.float32))
    kernel[(n // bn, triton.cdiv(m, bm), split)](desc, qw, st, y, m, n, k, **params)
    return y if split == 1 else y.half()


def compile_only(variant: str, cfg: tuple):
    """Compile one variant for sm_90 without a GPU (what the launcher specializes: 16-byte
    aligned pointers, N and K multiples of 16)."""
    from triton.backends.compiler import GPUTarget
    try:
        from triton.experimental.gluon._runtime import GluonASTSource
    except ImportError:  # pragma: no cover - triton >= 3.7
        from triton.experimental.gluon import GluonASTSource

    kernel = VARIANTS[variant][0]
    params = _params(variant, cfg)
    bm = params["BM"]
    sig = {"x_desc": f"tensordesc<fp16[{bm},64],{x_layout(bm)!r}>", "qw_ptr": "*i32",
           "st_ptr": "*fp16", "y_ptr": "*fp16" if params.get("SPLIT_K", 1) == 1 else "*fp32",
           "M": "i32", "N": "i32", "K": "i32", **{name: "constexpr" for name in params}}
    div16 = [["tt.divisibility", 16]]
    src = GluonASTSource(kernel, sig, constexprs=params,
                         attrs={(i,): div16 for i in (1, 2, 3, 5, 6)})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": params["num_warps"]})


def _fits(m: int, bm: int) -> bool:
    """Token tiles worth timing at M tokens."""
    return not (bm > 2 * max(m, 16) or (m >= 512 and bm < 128) or (m <= 32 and bm > 32))


def explore(n, k, ms, out):
    """float16 ``F.linear``, the target's autotuned kernel (``ops.wq_linear``; skipped with
    ``SKIP_TARGET_KERNEL=1``) and every config of :data:`CONFIGS` that fits each M, on the same
    rotated weights; relative error against float math on the dequantized weights."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import triton_kernels as TK

    wt = TK.rotated_w4_weights(n, k, 4, GROUP)
    qw, qws, ss, ws, wref = (wt[key] for key in ("qw", "qws", "ss", "ws", "wref"))
    sts = [s_.t().contiguous() for s_ in ss]
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = F.linear(x.float(), wref.float())
        fp16 = TK.graph_time_us([lambda w_=w_, x_=x: F.linear(x_, w_) for w_ in ws])
        ours = float("nan") if os.environ.get("SKIP_TARGET_KERNEL") else TK.graph_time_us(
            [lambda q_=q_, s_=s_, x_=x: TK.ops.wq_linear(x_, q_, s_, None, 4, GROUP)
             for q_, s_ in zip(qws, ss)])
        row = {"N": n, "K": k, "M": m, "fp16_us": fp16, "triton_us": ours, "gluon": []}
        TK.log(f"{n}x{k} M={m}: fp16 {fp16:.1f} us, target's triton kernel {ours:.1f} us "
               f"({fp16 / ours:.2f}x)")
        for variant, cfgs in CONFIGS.items():
            for cfg in cfgs:
                if not _fits(m, cfg[1]):
                    continue
                try:
                    y = launch(variant, cfg, x, qw, sts[0])
                    torch.cuda.synchronize()
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    t = TK.graph_time_us([lambda q_=q_, s_=s_, x_=x, v_=variant, c_=cfg:
                                          launch(v_, c_, x_, q_, s_) for q_, s_ in zip(qws, sts)])
                except Exception as e:  # noqa: BLE001
                    TK.log(f"  {variant} {cfg}: {type(e).__name__}: {str(e)[:300]}")
                    continue
                row["gluon"].append({"variant": variant, "cfg": _params(variant, cfg),
                                     "us": t, "x_fp16": fp16 / t, "err": err})
                TK.log(f"  {variant} {_params(variant, cfg)}: {t:7.2f} us {fp16 / t:5.2f}x fp16"
                       f"  err {err:.1e}")
        out.append(row)
        del x
    del qws, ss, ws, sts
    torch.cuda.empty_cache()


def profile_once(variant: str, cfg: tuple, n=8192, k=8192, m=128):
    """Three launches of one config on random weights, for a profiler (``--profile VARIANT``)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import triton_kernels as TK

    wt = TK.rotated_w4_weights(n, k, 4, GROUP)
    st = wt["s"].t().contiguous()
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    for _ in range(3):
        launch(variant, cfg, x, wt["qw"], st)
    torch.cuda.synchronize()


if __name__ == "__main__":
    if "--profile" in sys.argv:  # e.g. ncu ... python ... --profile gluon
        variant = sys.argv[sys.argv.index("--profile") + 1]
        profile_once(variant, next(c for c in CONFIGS[variant] if c[1] == 128))
    elif "--compile-only" in sys.argv:
        for variant, cfgs in CONFIGS.items():
            for cfg in cfgs:
                ck = compile_only(variant, cfg)
                print(variant, _params(variant, cfg), "shared", ck.metadata.shared)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import triton_kernels as TK

        TK.explore_main(explore, "16,128,2048", __doc__.splitlines()[0])
