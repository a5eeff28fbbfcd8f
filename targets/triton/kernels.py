"""Triton kernels of the ``triton`` target: low-bit linear layers for LLM inference.

All weight-only kernels read the one packed layout of :mod:`packing` (``qweight`` int32
``[N, Kp/E]`` in chunks of 16 words per row, bit field ``j`` of word ``i`` of a chunk = k
``16 j + i`` of that chunk: the chunk's *planes*; float16 ``scales`` and, when asymmetric, uint8
``zeros`` per ``[N, group]``) and compute ``y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n])`` with
``W[n, k] = (u[n, k] - z[n, g(k)]) * s[n, g(k)]``, ``g(k) = k // group``.

* :func:`_wq_gemv_kernel` (decode, M = 1 .. a few): CUDA-core FMAs in float32,
  ``y += s * sum_k (u - z) * x`` per group; a code becomes a float by one AND-OR
  (:func:`_plane_f32`), a plane of a thread's words meets consecutive activations; one program
  per (row of x, block of N, K split); the rows of x are the fastest grid axis, so the programs
  that read the same weights run together and the later ones hit L2. Epilogues: bias, the
  residual stream (``y = r + x W^T``) and the gated MLP activation (``silu(x G^T) * (x U^T)``
  from the concatenated ``[G; U]`` weight); programmatic dependent launch on sm_90+.
* :func:`_wq_matmul_kernel` (M > 1): tensor-core tiles; the weight tile is dequantized to
  float16 inside the main loop (``(u - z)`` exact, one rounding for ``* s``: the same float16
  weights as :func:`packing.dequantize`), one K=16 product per plane (or, CAT, the planes joined
  back into k order for one K=C product), ``tl.dot`` accumulates in float32; optional split-K
  (float16 atomic adds into a zeroed output) and SWAP (``y^T = W x^T``).
* :func:`_wq_mm_nat_kernel` (M ~ 64 and up): one chunk a step in natural k order (each element
  takes its own word and field, so no join / permute), optionally dequantized as float16 pairs
  (:func:`_deq_pair_h2`, ``lop3`` + ``sub.f16x2`` + ``mul.f16x2``: the same weights bit for
  bit), one K = C ``tl.dot`` a step; split-K, grouped tile order, a register cap for two
  programs an SM.
* :func:`_dequant_nat_kernel`: float16 ``W`` in natural k order (the dequantize + cuBLAS path
  for large M), vector loads and 16-byte stores, no shuffles.
* :func:`_quant_rows_kernel` (W8A8): per-token dynamic int8 activations, optionally fused with
  RMSNorm: ``h = x * rsqrt(mean(x^2) + eps) * gamma``; ``s_m = max_k |h| / 127``,
  ``q = rint(h * (127 / max_k |h|))`` (round half to even), int8; with FP8, E4M3 codes
  ``q = e4m3(h * (448 / max_k |h|))`` (nearest even, :func:`_e4m3_rint`), ``s_m = max_k |h| / 448``.
* :func:`_w8a8_matmul_kernel`: int8 x int8 tensor-core tiles with int32 accumulation (exact),
  or E4M3 x E4M3 with float32 accumulation (FP8 tensor cores, sm_89+); epilogue
  ``y = acc * s_a[m] * s_w[n] (+ bias)`` in float32, stored as float16;
  :func:`_w8a8_gemv_kernel` the same for decode (M <= 4) on the CUDA cores.

Every kernel also runs under ``TRITON_INTERPRET=1`` on the CPU (the CI tests do that).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rint(v):
    """Round half to even for |v| < 2**22: adding and removing 1.5 * 2**23 leaves no fraction bits
    (float32 addition rounds to nearest even); the interpreter has no libdevice.rint."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _plane_f32(words, words_hi, j: tl.constexpr, BITS: tl.constexpr, magic0):
    """float32 ``2**(23 - p) + u`` of bit field ``j`` of ``words``, by one AND-OR (no shift, no
    int->float conversion): the field is masked in place (bits p .. p+BITS-1) and the exponent
    150 - p is OR-ed above it, so its unit is 1. Fields that would touch bit 23 (the exponent's
    lowest bit) come from ``words_hi = words >> 16`` instead (p - 16)."""
    P0: tl.constexpr = j * BITS
    HI: tl.constexpr = P0 + BITS > 23
    P: tl.constexpr = P0 - 16 if HI else P0
    FIELD: tl.constexpr = ((1 << BITS) - 1) << P
    if HI:
        v = words_hi & FIELD
    else:
        v = words & FIELD
    # magic0 = 150 << 23 arrives as a run-time argument: the exponents stay in registers
    # (loop invariants) and the field masks become the instruction's immediates.
    return (v | (magic0 - (P << 23))).to(tl.float32, bitcast=True)


@triton.jit
def _plane_base(j: tl.constexpr, BITS: tl.constexpr):
    """The ``2**(23 - p)`` that :func:`_plane_f32` adds to bit field ``j``."""
    P0: tl.constexpr = j * BITS
    P: tl.constexpr = P0 - 16 if P0 + BITS > 23 else P0
    return (1 << (23 - P)) * 1.0


@triton.jit
def _pack_h2(lo, hi, ASM: tl.constexpr):
    """Two float16 tensors -> int32 tensor of float16 pairs (lo in bits 0..15)."""
    if ASM:
        return tl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h", [lo, hi],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        return ((hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)
                | (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF))


def _h2_dot_asm(pack: int) -> str:
    """PTX of :func:`_dot_h2_acc` for ``pack`` words (operands numbered as Triton packs them:
    the ``pack`` outputs, then each input's ``pack`` elements in turn)."""
    words, zz0, zz1, s16, acc = pack, 6 * pack, 7 * pack, 8 * pack, 9 * pack
    body = []
    for e in range(pack):
        xp = [(2 + q) * pack + e for q in range(4)]
        w = f"${words + e}"
        for q, (src, mask, c, zz, dst) in enumerate((
                (w, "0x000F000F", "c0", zz0, "a"), (w, "0x00F000F0", "c1", zz1, "a"),
                ("w8", "0x000F000F", "c0", zz0, "b"), ("w8", "0x00F000F0", "c1", zz1, "b"))):
            dst = "a" if pack == 1 else dst  # (one word: one chain, as many products a half)
            if q == 2:
                body.append(f"shr.u32 w8, {w}, 8;")
            body.append(f"lop3.b32 h, {src}, {mask}, 0x64006400, 0xEA;")
            body.append(f"fma.rn.f16x2 h, h, {c}, ${zz};")
            first = q == 0 if pack == 1 else e == 0 and q % 2 == 0
            body.append(f"mul.rn.f16x2 {dst}, h, ${xp[q]};" if first
                        else f"fma.rn.f16x2 {dst}, h, ${xp[q]}, {dst};")
    body += [] if pack == 1 else ["add.rn.f16x2 a, a, b;"]
    body += ["mov.b32 {lo, hi}, a;", "cvt.f32.f16 flo, lo;",
             "cvt.f32.f16 fhi, hi;", "add.f32 flo, flo, fhi;", f"fma.rn.f32 $0, flo, ${s16}, ${acc};"]
    body += [f"mov.b32 ${e}, ${acc + e};" for e in range(1, pack)]
    return ("{ .reg .b32 h, a, b, w8, c0, c1; .reg .f16 lo, hi; .reg .f32 flo, fhi; "
            "mov.b32 c0, 0x2C002C00; mov.b32 c1, 0x1C001C00; " + " ".join(body) + " }")


def _h2_dot_constraints(pack: int) -> str:
    return ",".join(["=f"] * pack + ["r"] * (7 * pack) + ["f"] * (2 * pack))


_H2_DOT1 = tl.constexpr(_h2_dot_asm(1))
_H2_DOT4 = tl.constexpr(_h2_dot_asm(4))
_H2_CONS1 = tl.constexpr(_h2_dot_constraints(1))
_H2_CONS4 = tl.constexpr(_h2_dot_constraints(4))


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _dot_h2_acc(acc, words, xp0, xp1, xp2, xp3, zz0, zz1, s16, PACK: tl.constexpr,
                ASM: tl.constexpr):
    """``acc + s16 * sum_j (u_j - z) / 16 * x_j`` over the 8 codes of each 4-bit word, in
    float16 pairs (Marlin-style): ``(w & 0x000F000F) | 0x64006400`` is the pair 1024 + u for
    bit fields 0 and 4, ``(w & 0x00F000F0) | 0x64006400`` is 1024 + 16 u for fields 1 and 5
    (then 2, 6 and 3, 7 from ``w >> 8``); one FMA each makes them ``(u - z) / 16`` exactly
    (``zz0`` = pair of -(64 + z/16), ``zz1`` = pair of -(4 + z/16)); ``xp_j`` = pair
    (x_j, x_{j+4}). The products of a word accumulate in one float16 pair (4 products a half);
    with PACK > 1, those of PACK consecutive words of a thread (one row's chunk: one scale
    group) in two (fields 0 / 4 and 1 / 5 in one, 2 / 6 and 3 / 7 in the other: 2 PACK products
    a half each; |sum| <= PACK max|x|, no overflow below |x| = 16384 / PACK), which are added;
    the sum is converted to float32 once and scaled into the first word's ``acc``; the other
    PACK - 1 keep theirs (``sum(acc)`` is the product). PACK > 1 needs each thread to hold PACK
    consecutive words (word loads of at least PACK x 4 bytes: the 16-byte loads of whole-chunk
    rows give that)."""
    if ASM:
        if PACK == 4:
            return tl.inline_asm_elementwise(_H2_DOT4, _H2_CONS4,
                                             [words, xp0, xp1, xp2, xp3, zz0, zz1, s16, acc],
                                             dtype=tl.float32, is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(_H2_DOT1, _H2_CONS1,
                                             [words, xp0, xp1, xp2, xp3, zz0, zz1, s16, acc],
                                             dtype=tl.float32, is_pure=True, pack=1)
    else:  # the same float16 arithmetic in the same order, for the interpreter (the CI tests)
        R: tl.constexpr = words.shape[0]
        C: tl.constexpr = words.shape[1]
        W: tl.constexpr = words.shape[2]
        zoff = (zz0 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) + 64.0
        wq = tl.reshape(words, [R, C, W // PACK, PACK])
        zq = tl.reshape(tl.broadcast_to(zoff, [R, C, W]), [R, C, W // PACK, PACK])
        xq = [tl.reshape(tl.broadcast_to(xp, [R, C, W]), [R, C, W // PACK, PACK])
              for xp in (xp0, xp1, xp2, xp3)]
        e_ix = tl.arange(0, PACK)[None, None, None, :]
        al = tl.zeros([R, C, W // PACK], dtype=tl.float16)
        ah = tl.zeros([R, C, W // PACK], dtype=tl.float16)
        bl = tl.zeros([R, C, W // PACK], dtype=tl.float16)
        bh = tl.zeros([R, C, W // PACK], dtype=tl.float16)
        for e in tl.static_range(PACK):  # word e of each group (an OR of it and zeros: exact)
            w = tl.reduce(tl.where(e_ix == e, wq, 0), 3, _bit_or)
            zo = tl.sum(tl.where(e_ix == e, zq, 0.0), axis=3)
            for q in tl.static_range(4):
                xp = tl.reduce(tl.where(e_ix == e, xq[q], 0), 3, _bit_or)
                xl = (xp & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                xh = ((xp >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                dl = ((w >> (4 * q)) & 15).to(tl.float32) * 0.0625 + zo
                dh = ((w >> (16 + 4 * q)) & 15).to(tl.float32) * 0.0625 + zo
                if q < 2 or PACK == 1:
                    al = (dl * xl + al.to(tl.float32)).to(tl.float16)
                    ah = (dh * xh + ah.to(tl.float32)).to(tl.float16)
                else:
                    bl = (dl * xl + bl.to(tl.float32)).to(tl.float16)
                    bh = (dh * xh + bh.to(tl.float32)).to(tl.float16)
        if PACK == 1:
            lo = al.to(tl.float32)
            hi = ah.to(tl.float32)
        else:
            lo = (al.to(tl.float32) + bl.to(tl.float32)).to(tl.float16).to(tl.float32)
            hi = (ah.to(tl.float32) + bh.to(tl.float32)).to(tl.float16).to(tl.float32)
        sg = tl.max(tl.reshape(tl.broadcast_to(s16, [R, C, W]), [R, C, W // PACK, PACK]), axis=3)
        grp = tl.reshape(tl.broadcast_to(((lo + hi) * sg)[:, :, :, None],
                                         [R, C, W // PACK, PACK]), [R, C, W])
        first = (tl.arange(0, W) % PACK == 0)[None, None, :]
        return acc + tl.where(first, grp, 0.0)


@triton.jit
def _load_x(x_row, kk, K, EVEN_K: tl.constexpr):
    """Activations at ``x_row + kk``; 0 where ``kk >= K`` (no mask when EVEN_K: K is a whole
    number of chunks)."""
    if EVEN_K:
        return tl.load(x_row + kk)
    else:
        return tl.load(x_row + kk, mask=kk < K, other=0.0)


@triton.jit
def _row_rms_inv(x_row, K, eps, BLOCK: tl.constexpr):
    """``1 / sqrt(mean(x^2) + eps)`` of one row, float32 inside, K in masked steps of BLOCK."""
    offs = tl.arange(0, BLOCK)
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        ss += x * x
    return 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)


@triton.jit
def _load_xn(x_row, g_ptr, kk, K, r, EVEN_K: tl.constexpr, HAS_NORM: tl.constexpr):
    """:func:`_load_x`; with HAS_NORM the RMSNorm's output ``x * r * gamma`` rounded to x's
    type, as :func:`_rmsnorm_kernel` stores it."""
    x = _load_x(x_row, kk, K, EVEN_K)
    if HAS_NORM:
        x = (x.to(tl.float32) * r * _load_x(g_ptr, kk, K, EVEN_K).to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _split_k_range(steps, pid_k, SPLIT_K: tl.constexpr):
    """The K steps ``[st0, st1)`` of split ``pid_k`` of SPLIT_K: ``ceil(steps / SPLIT_K)`` each,
    the last split the rest (possibly none)."""
    per_split = tl.cdiv(steps, SPLIT_K)
    st0 = pid_k * per_split
    return st0, tl.minimum(st0 + per_split, steps)


@triton.jit
def _bcast_rows(v, KMAJOR: tl.constexpr):
    """A [CHUNKS, 16] tensor (activations) as the GEMV tile's [1, CHUNKS, 16], or
    [CHUNKS, 1, 16] for the chunk-major tile."""
    if KMAJOR:
        return v[:, None, :]
    else:
        return v[None, :, :]


@triton.jit
def _row_group(base, rn, g, G, KMAJOR: tl.constexpr):
    """The per-group value (scale or zero point) of each tile row and chunk, ``[ROWS, CHUNKS,
    1]`` (or ``[CHUNKS, ROWS, 1]`` chunk-major), as float32."""
    if KMAJOR:
        return tl.load(base + rn[None, :] * G + g[:, None]).to(tl.float32)[:, :, None]
    else:
        return tl.load(base + rn[:, None] * G + g[None, :]).to(tl.float32)[:, :, None]


@triton.jit
def _wq_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, res_ptr, y_ptr, g_ptr,
                    M, N, K, KW, G, stride_xm, stride_rm, stride_ym, magic0, eps,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
                    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr,
                    HALF2: tl.constexpr = False, ASM: tl.constexpr = False,
                    PDL: tl.constexpr = False, HAS_RES: tl.constexpr = False,
                    GLU: tl.constexpr = False, ACC: tl.constexpr = 1,
                    KMAJOR: tl.constexpr = False, HAS_NORM: tl.constexpr = False):
    # One program: BLOCK_N rows x (its share of) K, CHUNKS chunks of 16 words a step; the word
    # tile is [BLOCK_N, CHUNKS, 16] (rows of 64 * CHUNKS contiguous bytes, 16-byte loads), or
    # [CHUNKS, BLOCK_N, 16] with KMAJOR (Triton then spreads threads over the chunks, and a
    # thread holds several rows of one chunk; ACC = 4 needs its 4 consecutive words).
    # Plane j of a chunk meets the 16 consecutive activations c*C + 16 j + (0..15): a thread's
    # 4 words meet 4 consecutive x (one 8-byte load), shared by all the rows it holds.
    # A code costs one AND-OR (to the float 2**(23-p) + u, :func:`_plane_f32`), one FADD (minus
    # 2**(23-p) + z: exact) and one FFMA; the scale multiplies each group's partial sums once
    # (a group is some planes of a chunk or whole chunks). PREFETCH loads the next step's words
    # before this step's arithmetic (two steps of loads in flight). No atomics unless
    # SPLIT_K > 1. PREFETCH = 2 keeps two steps in flight. PDL (programmatic dependent launch,
    # sm_90+): the next kernel may be scheduled once every program has started, and this one
    # issues its first weight loads (which no earlier kernel writes) before it waits for the
    # previous kernel's results (x, the residual, a zeroed y).
    # Epilogues: + bias[n]; + res[m, n] (HAS_RES: the residual stream); GLU: the weight is
    # [gate; up] (2N rows) and y[m, n] = silu(g) * u with g, u rows n and N + n (held by the
    # same program, interleaved: tile row r is weight row n0 + r // 2 + (r % 2) * N).
    # HAS_NORM: the input is RMSNorm(x) * gamma, computed here (no separate launch): each
    # program first reads the row for its 1 / rms, then rounds x * r * gamma to float16 as it
    # loads the activations (what the norm kernel would have stored; r may differ in its last
    # bit, the squares being added in another order).
    E: tl.constexpr = 32 // BITS
    C: tl.constexpr = 16 * E
    PG: tl.constexpr = GROUP // 16 if GROUP // 16 < E else E  # planes per scale
    ROWS: tl.constexpr = 2 * BLOCK_N if GLU else BLOCK_N
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    if GLU:
        tile_row = tl.arange(0, ROWS)
        on = pid_n * BLOCK_N + tile_row // 2
        rn = tl.where(on < N, on + (tile_row % 2) * N, 0)
    else:
        rn = tl.where(nmask, offs_n, 0)
    offs_c = tl.arange(0, CHUNKS)
    offs_i = tl.arange(0, 16)
    steps = KW // (16 * CHUNKS)
    st0, st1 = _split_k_range(steps, pid_k, SPLIT_K)
    if KMAJOR:  # tile [CHUNKS, ROWS, 16]: threads spread over chunks first, so each holds
        # more rows of the same chunks (and reads each activation pair for all of them)
        w_off = offs_c[:, None, None] * 16 + rn[None, :, None] * KW + offs_i[None, None, :]
    else:
        w_off = rn[:, None, None] * KW + (offs_c[:, None] * 16 + offs_i[None, :])[None, :, :]
    acc = tl.zeros(w_off.shape, dtype=tl.float32)
    x_row = x_ptr + pid_m * stride_xm
    w_tile = qw_ptr + w_off
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if PREFETCH:  # (the last steps re-read their own words instead of reading past the part)
        nxt = tl.load(w_tile + tl.minimum(st0, steps - 1) * (16 * CHUNKS),
                      eviction_policy="evict_first")
        if PREFETCH >= 2:
            nxt2 = tl.load(w_tile + tl.minimum(st0 + 1, steps - 1) * (16 * CHUNKS),
                           eviction_policy="evict_first")
    if PDL:
        tl.extra.cuda.gdc_wait()
    r = 1.0
    if HAS_NORM:
        r = _row_rms_inv(x_row, K, eps, 256)
    for st in range(st0, st1):
        if PREFETCH >= 2:
            words = nxt
            nxt = nxt2
            nxt2 = tl.load(w_tile + tl.minimum(st + 2, st1 - 1) * (16 * CHUNKS),
                           eviction_policy="evict_first")
        elif PREFETCH:
            words = nxt
            nxt = tl.load(w_tile + tl.minimum(st + 1, st1 - 1) * (16 * CHUNKS),
                          eviction_policy="evict_first")
        else:
            words = tl.load(w_tile + st * (16 * CHUNKS), eviction_policy="evict_first")
        words_hi = words >> 16
        c = st * CHUNKS + offs_c                               # chunk indices [CHUNKS]
        kb = c[:, None] * C + offs_i[None, :]                  # k of plane 0 [CHUNKS, 16]
        if HALF2:  # 4-bit, a group of whole chunks: float16 pairs (:func:`_dot_h2_acc`)
            xs0 = _load_xn(x_row, g_ptr, kb, K, r, EVEN_K, HAS_NORM)
            xs1 = _load_xn(x_row, g_ptr, kb + 16, K, r, EVEN_K, HAS_NORM)
            xs2 = _load_xn(x_row, g_ptr, kb + 32, K, r, EVEN_K, HAS_NORM)
            xs3 = _load_xn(x_row, g_ptr, kb + 48, K, r, EVEN_K, HAS_NORM)
            xs4 = _load_xn(x_row, g_ptr, kb + 64, K, r, EVEN_K, HAS_NORM)
            xs5 = _load_xn(x_row, g_ptr, kb + 80, K, r, EVEN_K, HAS_NORM)
            xs6 = _load_xn(x_row, g_ptr, kb + 96, K, r, EVEN_K, HAS_NORM)
            xs7 = _load_xn(x_row, g_ptr, kb + 112, K, r, EVEN_K, HAS_NORM)
            xp0 = _bcast_rows(_pack_h2(xs0, xs4, ASM), KMAJOR)
            xp1 = _bcast_rows(_pack_h2(xs1, xs5, ASM), KMAJOR)
            xp2 = _bcast_rows(_pack_h2(xs2, xs6, ASM), KMAJOR)
            xp3 = _bcast_rows(_pack_h2(xs3, xs7, ASM), KMAJOR)
            g = (c * C) // GROUP
            s16 = _row_group(s_ptr, rn, g, G, KMAJOR) * 16.0
            if HAS_ZERO:
                z = _row_group(z_ptr, rn, g, G, KMAJOR)
            else:
                z = tl.full(s16.shape, 8.0, tl.float32)
            z16 = z * 0.0625
            zz0 = (-(z16 + 64.0)).to(tl.float16)
            zz1 = (-(z16 + 4.0)).to(tl.float16)
            acc = _dot_h2_acc(acc, words, xp0, xp1, xp2, xp3, _pack_h2(zz0, zz0, ASM),
                              _pack_h2(zz1, zz1, ASM), s16, ACC, ASM)
        for j in tl.static_range(E if not HALF2 else 0):
            if j % PG == 0:
                g = (c * C + j * 16) // GROUP
                s = _row_group(s_ptr, rn, g, G, KMAJOR)
                if HAS_ZERO:
                    z = _row_group(z_ptr, rn, g, G, KMAJOR)
                else:
                    z = (1 << (BITS - 1)) * 1.0
                part = tl.zeros(w_off.shape, dtype=tl.float32)
            xj = _load_xn(x_row, g_ptr, kb + j * 16, K, r, EVEN_K, HAS_NORM).to(tl.float32)
            f = _plane_f32(words, words_hi, j, BITS, magic0)
            part += (f - (z + _plane_base(j, BITS))) * _bcast_rows(xj, KMAJOR)
            if j % PG == PG - 1:
                acc += part * s
    out = tl.sum(tl.sum(acc, axis=2), axis=0 if KMAJOR else 1)
    if HAS_BIAS:
        if pid_k == 0:
            out += tl.load(bias_ptr + rn).to(tl.float32)
    if GLU:  # (SPLIT_K == 1: the activation needs whole sums)
        g, u = tl.split(tl.reshape(out, [BLOCK_N, 2]))
        out = g / (1.0 + tl.exp(-g)) * u
    if HAS_RES:
        if pid_k == 0:
            out += tl.load(res_ptr + pid_m * stride_rm + offs_n, mask=nmask,
                           other=0.0).to(tl.float32)
    out = out.to(y_ptr.dtype.element_ty)
    if SPLIT_K == 1:
        tl.store(y_ptr + pid_m * stride_ym + offs_n, out, mask=nmask)
    else:
        tl.atomic_add(y_ptr + pid_m * stride_ym + offs_n, out, mask=nmask)


@triton.jit
def _plane_half(words, j: tl.constexpr, z_ptrs, BITS: tl.constexpr, HAS_ZERO: tl.constexpr):
    """float16 ``u - z`` of bit field ``j`` of ``words [R, 16]`` (exact) without an int->float
    conversion: the bits 0x6400 | u are the float16 1024 + u (u < 1024), and
    (1024 + u) - (1024 + z) is exact."""
    MASK: tl.constexpr = (1 << BITS) - 1
    HALF: tl.constexpr = 1 << (BITS - 1)
    u = (words >> (j * BITS)) & MASK
    h = (u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    if HAS_ZERO:
        z = tl.load(z_ptrs).to(tl.float16)
        return h - (z + 1024.0)[:, None]
    else:
        return h - (1024.0 + HALF)


@triton.jit
def _scaled_plane(words, j: tl.constexpr, st, s_ptr, z_ptr, rn, G, BITS: tl.constexpr,
                  GROUP: tl.constexpr, HAS_ZERO: tl.constexpr):
    """float16 weights of plane ``j`` of chunk ``st`` (``[R, 16]``): ``(u - z) * s``."""
    g = (st * (16 * (32 // BITS)) + j * 16) // GROUP
    s = tl.load(s_ptr + rn * G + g)
    return _plane_half(words, j, z_ptr + rn * G + g, BITS, HAS_ZERO) * s[:, None]


@triton.jit
def _chunk_half(words, st, s_ptr, z_ptr, rn, G, BITS: tl.constexpr, GROUP: tl.constexpr,
                HAS_ZERO: tl.constexpr):
    """float16 weights of chunk ``st`` in natural k order, ``[R, C]``: the planes side by side
    (column 16 j + i = plane j, word i), by joins and one permutation."""
    p0 = _scaled_plane(words, 0, st, s_ptr, z_ptr, rn, G, BITS, GROUP, HAS_ZERO)
    p1 = _scaled_plane(words, 1, st, s_ptr, z_ptr, rn, G, BITS, GROUP, HAS_ZERO)
    p2 = _scaled_plane(words, 2, st, s_ptr, z_ptr, rn, G, BITS, GROUP, HAS_ZERO)
    p3 = _scaled_plane(words, 3, st, s_ptr, z_ptr, rn, G, BITS, GROUP, HAS_ZERO)
    t = tl.join(tl.join(p0, p1), tl.join(p2, p3))  # [R, 16, 2 (j bit 0), 2 (j bit 1)]
    if BITS == 4:
        p4 = _scaled_plane(words, 4, st, s_ptr, z_ptr, rn, G, BITS, GROUP, HAS_ZERO)
        p5 = _scaled_plane(words, 5, st, s_ptr, z_ptr, rn, G, BITS, GROUP, HAS_ZERO)
        p6 = _scaled_plane(words, 6, st, s_ptr, z_ptr, rn, G, BITS, GROUP, HAS_ZERO)
        p7 = _scaled_plane(words, 7, st, s_ptr, z_ptr, rn, G, BITS, GROUP, HAS_ZERO)
        t = tl.join(t, tl.join(tl.join(p4, p5), tl.join(p6, p7)))  # [R, 16, 2, 2, 2]
        t = tl.permute(t, (0, 4, 3, 2, 1))
        return tl.reshape(t, (t.shape[0], 128))
    else:
        t = tl.permute(t, (0, 3, 2, 1))
        return tl.reshape(t, (t.shape[0], 64))


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering of output tiles: GROUP_M row-tiles share each column-tile in L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output rows ``offs_m`` and columns ``offs_n`` (tile order of
    :func:`_tile_ids`), and the same clamped into range (``rm``, ``rn``: a row or column past
    the end reads row 0, and its result is masked off at the store)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, tl.where(offs_m < M, offs_m, 0), tl.where(offs_n < N, offs_n, 0)


@triton.jit
def _tile_acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    """The float32 accumulator of a ``[BLOCK_M, BLOCK_N]`` output tile, zeroed; transposed
    (``[BLOCK_N, BLOCK_M]``) under SWAP."""
    if SWAP:
        return tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        return tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)


@triton.jit
def _mma(a, w, acc, SWAP: tl.constexpr):
    """One tensor-core step: ``acc + a w^T`` (``a [BM, k]``, ``w [BN, k]``); under SWAP
    ``acc + w a^T``, the transposed product (the weights are then the register operand A)."""
    if SWAP:
        return tl.dot(w, tl.trans(a), acc)
    else:
        return tl.dot(a, tl.trans(w), acc)


@triton.jit
def _store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, rn, M, N, stride_ym, pid_k,
                HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr):
    """The epilogue of a ``[BM, BN]`` output tile: ``y = acc (+ bias[n])`` in float32 (from the
    transposed tile under SWAP), rounded once to y's dtype; bias by split 0 only; stored, or
    atomically added into a zeroed y when SPLIT_K > 1."""
    if SWAP:
        acc = tl.trans(acc)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    out = acc.to(y_ptr.dtype.element_ty)
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(ptrs, out, mask=mask)
    else:
        tl.atomic_add(ptrs, out, mask=mask)


@triton.jit
def _wq_matmul_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
                      M, N, K, KW, G, stride_xm, stride_ym,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr,
                      EVEN_K: tl.constexpr, CAT: tl.constexpr):
    # One chunk (16 words = C k) a step; plane j of the [BLOCK_N, 16] word tile is the weight
    # operand of a K=16 tensor-core product with the activations c*C + 16 j + (0..15): no
    # unpacking shuffle. CAT instead puts the planes side by side (the chunk in natural k order,
    # :func:`_chunk_half`) for one K=C product a step. SWAP computes y^T = W x^T (the
    # dequantized weights are the register operand A, the activations the shared-memory
    # operand B): the small-M form.
    E: tl.constexpr = 32 // BITS
    C: tl.constexpr = 16 * E
    PG: tl.constexpr = GROUP // 16 if GROUP // 16 < E else E
    offs_m, offs_n, rm, rn = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_i = tl.arange(0, 16)
    steps = KW // 16
    st0, st1 = _split_k_range(steps, pid_k, SPLIT_K)
    acc = _tile_acc(BLOCK_M, BLOCK_N, SWAP)
    x_rows = x_ptr + rm[:, None] * stride_xm
    offs_c = tl.arange(0, C)
    for st in range(st0, st1):
        words = tl.load(qw_ptr + rn[:, None] * KW + (st * 16 + offs_i)[None, :])
        if CAT:
            kc = st * C + offs_c
            a = _load_x(x_rows, kc[None, :], K, EVEN_K)
            w = _chunk_half(words, st, s_ptr, z_ptr, rn, G, BITS, GROUP, HAS_ZERO)
            acc = _mma(a, w, acc, SWAP)
        for j in tl.static_range(E if not CAT else 0):
            kk = st * C + j * 16 + offs_i
            a = _load_x(x_rows, kk[None, :], K, EVEN_K)
            if j % PG == 0:
                g = (st * C + j * 16) // GROUP
                s = tl.load(s_ptr + rn * G + g)
            w = _plane_half(words, j, z_ptr + rn * G + g, BITS, HAS_ZERO) * s[:, None]
            acc = _mma(a, w, acc, SWAP)
    _store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, rn, M, N, stride_ym, pid_k, HAS_BIAS,
                SPLIT_K, SWAP)


@triton.jit
def _deq_pair_h2(v, zz, s, ASM: tl.constexpr):
    """4-bit: the float16 weights of bit fields 0 and 4 of ``v`` (a word shifted right by
    4 jp), ``((1024 + u) - (1024 + z)) * s`` for each: one ``lop3`` makes the pair
    1024 + u (Marlin-style), one ``sub.f16x2`` the exact ``u - z``, one ``mul.f16x2`` the one
    rounding, so the weights are bit-identical to :func:`packing.dequantize`. ``zz`` = float16
    1024 + z, ``s`` = float16 scale. Returns (field 0, field 4)."""
    if ASM:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 t, zz2, ss2;
            mov.b32 zz2, {$3, $3};
            mov.b32 ss2, {$4, $4};
            lop3.b32 t, $2, 0x000F000F, 0x64006400, 0xEA;
            sub.f16x2 t, t, zz2;
            mul.rn.f16x2 t, t, ss2;
            mov.b32 {$0, $1}, t;
            }""",
            "=h,=h,r,h,h", [v, zz, s], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        lo = ((v & 15) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        hi = (((v >> 16) & 15) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        return (lo - zz) * s, (hi - zz) * s


@triton.jit
def _wq_mm_nat_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
                      M, N, K, KW, G, stride_xm, stride_ym,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr,
                      EVEN_K: tl.constexpr, H2: tl.constexpr = False, ASM: tl.constexpr = False):
    # The tiled form for M >= ~64: one chunk (C = 16 * 32 / BITS k) a step, its weights
    # dequantized in *natural* k order as a [BLOCK_N, E, 16] tile (plane j of the chunk's 16
    # words: each element takes its own word, so no join / permute / shuffle; the E threads that
    # share a word read it from L1) viewed as [BLOCK_N, C]: one K = C tensor-core product a step
    # with the [BLOCK_M, C] activation tile, which the pipeliner stages in shared memory
    # (num_stages). Scales and zero points are read once per group. Grouped tile order
    # (GROUP_M row tiles share a column tile in L2), optional split-K (float16 atomic adds into
    # a zeroed output) and SWAP (y^T = W x^T).
    E: tl.constexpr = 32 // BITS
    C: tl.constexpr = 16 * E
    MASK: tl.constexpr = (1 << BITS) - 1
    HALF: tl.constexpr = 1 << (BITS - 1)
    PG: tl.constexpr = GROUP // 16 if GROUP // 16 < E else E  # planes per scale
    offs_m, offs_n, rm, rn = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_i = tl.arange(0, 16)
    offs_j = tl.arange(0, E)
    offs_c = tl.arange(0, C)
    sh = (offs_j * BITS)[None, :, None]
    steps = KW // 16
    st0, st1 = _split_k_range(steps, pid_k, SPLIT_K)
    acc = _tile_acc(BLOCK_M, BLOCK_N, SWAP)
    x_rows = x_ptr + rm[:, None] * stride_xm
    w_rows = qw_ptr + rn[:, None, None] * KW + offs_i[None, None, :]
    for st in range(st0, st1):
        kc = st * C + offs_c
        a = _load_x(x_rows, kc[None, :], K, EVEN_K)
        words = tl.load(w_rows + st * 16)                                 # [BN, 1, 16]
        if H2:  # 4-bit, one group a chunk or more: fields jp and jp + 4 as float16 pairs
            g = (st * C) // GROUP
            s = tl.load(s_ptr + rn * G + g)[:, None, None]
            if HAS_ZERO:
                zz = tl.load(z_ptr + rn * G + g).to(tl.float16)[:, None, None] + 1024.0
            else:
                zz = tl.full([BLOCK_N, 1, 1], 1024.0 + HALF, tl.float16)
            v = words >> (tl.arange(0, 4) * 4)[None, :, None]              # [BN, 4, 16]
            lo, hi = _deq_pair_h2(v, zz.broadcast_to(v.shape), s.broadcast_to(v.shape), ASM)
            w = tl.permute(tl.join(lo, hi), (0, 3, 1, 2))                 # [BN, 2, 4, 16]
        else:
            u = (words >> sh) & MASK                                      # [BN, E, 16]
            h = (u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)    # 1024 + u, exact
            if PG == E:  # one group (or more) a chunk: one scale a row
                g = (st * C) // GROUP
                s = tl.load(s_ptr + rn * G + g)[:, None, None]
                if HAS_ZERO:
                    z = tl.load(z_ptr + rn * G + g).to(tl.float16)[:, None, None]
            else:  # PG planes a group
                gj = (st * C + offs_j * 16) // GROUP
                s = tl.load(s_ptr + rn[:, None] * G + gj[None, :])[:, :, None]
                if HAS_ZERO:
                    z = tl.load(z_ptr + rn[:, None] * G + gj[None, :]).to(tl.float16)[:, :, None]
            if HAS_ZERO:
                w = (h - (z + 1024.0)) * s
            else:
                w = (h - (1024.0 + HALF)) * s
        w = tl.reshape(w, (BLOCK_N, C))                                   # natural k order
        acc = _mma(a, w, acc, SWAP)
    _store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, rn, M, N, stride_ym, pid_k, HAS_BIAS,
                SPLIT_K, SWAP)


@triton.jit
def _e4m3_rint(v):
    """``v`` rounded to the nearest float8_e4m3fn value (ties to even), saturated at +-448,
    still as float32: the step is 2^(e - 3) in the binade [2^e, 2^(e+1)) (e >= -6; below,
    the subnormal step 2^-9). Converting the result to float8e4nv is then exact on the GPU and
    under the interpreter alike (whose own conversion rounds differently)."""
    e = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
    inv_step = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e): exact products
    return tl.minimum(tl.maximum(_rint(v * inv_step) * step, -448.0), 448.0)


@triton.jit
def _quant_code(x, m, FP8: tl.constexpr):
    """The code of x for row abs-max m: int8 ``rint(x * (127 / m))`` or E4M3
    ``e4m3(x * (448 / m))``, as float32; the divisions IEEE-rounded (``div_rn``: a plain ``/`` is
    approximate on NVIDIA GPUs) and the product rounded to float32 before the rounding to the
    grid (``fma(x, c, 0)``: a plain ``x * c`` is contracted with rint's ``+ 1.5 * 2^23`` into
    one fused multiply-add, which rounds the exact product and moved an int8 code by one where
    the float32 product is a tie: H200, two cases in the W8A8 sweep), so the codes equal
    numpy's and the interpreter's."""
    v = tl.fma(x, tl.math.div_rn(448.0 if FP8 else 127.0, m), 0.0)
    if FP8:
        q = _e4m3_rint(v)
    else:
        q = tl.minimum(tl.maximum(_rint(v), -127.0), 127.0)
    return q


@triton.jit
def _quant_rows_kernel(x_ptr, gamma_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, eps,
                       HAS_NORM: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr = False):
    """One program per row. BLOCK_K >= K: the row is read once and kept in registers;
    otherwise it is read in blocks, once per pass (sum of squares, max, codes). FP8: E4M3 codes
    with s = max|x| / 448 instead of int8 with s = max|x| / 127."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    if BLOCK_K >= K:
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_NORM:
            r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / K + eps)
            x = x * r * tl.load(gamma_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
        m = tl.max(tl.abs(x), axis=0)
        m = tl.where(m > 0, m, 1.0)
        q = _quant_code(x, m, FP8)
        tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)
    else:
        r = 1.0
        if HAS_NORM:
            ss = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                ss += x * x
            r = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            if HAS_NORM:
                x = x * r * tl.load(gamma_ptr + k0 + offs, mask=k0 + offs < K,
                                    other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        m = tl.max(amax, axis=0)
        m = tl.where(m > 0, m, 1.0)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            if HAS_NORM:
                x = x * r * tl.load(gamma_ptr + k0 + offs, mask=k0 + offs < K,
                                    other=0.0).to(tl.float32)
            q = _quant_code(x, m, FP8)
            tl.store(q_ptr + row * stride_qm + k0 + offs, q.to(q_ptr.dtype.element_ty),
                     mask=k0 + offs < K)
    tl.store(s_ptr + row, tl.math.div_rn(m, 448.0 if FP8 else 127.0))


@triton.jit
def _w8a8_matmul_kernel(a_ptr, sa_ptr, w_ptr, sw_ptr, bias_ptr, y_ptr, M, N, K,
                        stride_am, stride_ym, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, FP8: tl.constexpr = False,
                        EVEN_K: tl.constexpr = False, PROMOTE: tl.constexpr = True):
    # int8 x int8 -> int32 (exact), or FP8: E4M3 x E4M3 -> float32. EVEN_K: BLOCK_K divides K,
    # no masks (FP8 needs it: the interpreter cannot fill masked float8 lanes). PROMOTE (FP8):
    # each BLOCK_K product starts from zero and is added to the float32 accumulator on the CUDA
    # cores: Hopper's FP8 tensor cores accumulate with reduced precision (about 14 bits kept,
    # DeepSeek-V3 report), which over K = 4096..14336 gave 1.3e-3..2.9e-3 relative error
    offs_m, offs_n, rm, rn = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32 if FP8 else tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :])
            w = tl.load(w_ptr + rn[None, :] * K + kk[:, None])
        else:
            a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :], mask=kk[None, :] < K,
                        other=0)
            w = tl.load(w_ptr + rn[None, :] * K + kk[:, None], mask=kk[:, None] < K, other=0)
        if FP8 and PROMOTE:
            acc += tl.dot(a, w, out_dtype=tl.float32)
        else:
            acc = tl.dot(a, w, acc, out_dtype=tl.float32 if FP8 else tl.int32)
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if OUT_INT32:
        tl.store(ptrs, acc, mask=mask)
    else:
        sa = tl.load(sa_ptr + rm).to(tl.float32)
        sw = tl.load(sw_ptr + rn).to(tl.float32)
        y = acc.to(tl.float32) * sa[:, None] * sw[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w8a8_prod(w, a, FP8: tl.constexpr):
    """Products of codes: E4M3 in float32 (exact: 4-bit significands), int8 in int32."""
    if FP8:
        p = w.to(tl.float32) * a.to(tl.float32)[None, :]
    else:
        p = w.to(tl.int32) * a.to(tl.int32)[None, :]
    return p


@triton.jit
def _ld_codes(rows, k0, offs_k, K, EVEN_K: tl.constexpr, FP8: tl.constexpr):
    """A ``[BLOCK_N, BLOCK_K]`` block of code bytes at ``rows + k0`` (zeros past K unless
    EVEN_K), streamed past the caches; E4M3 bytes arrive as uint8 (the interpreter cannot mask
    float8 loads) and are reinterpreted here."""
    if EVEN_K:
        v = tl.load(rows + k0, eviction_policy="evict_first")
    else:
        v = tl.load(rows + k0, mask=(k0 + offs_k < K)[None, :], other=0,
                    eviction_policy="evict_first")
    if FP8:
        v = v.to(tl.float8e4nv, bitcast=True)
    return v


@triton.jit
def _row_scale_stats(x_row, gamma_ptr, K, eps, offs_k, HAS_NORM: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """``(r, m)`` of one float16 row x: ``r = 1 / sqrt(mean(x^2) + eps)`` (1 without the norm)
    and ``m = max |x r gamma|`` (1 for an all-zero row), K in BLOCK_K steps."""
    r = 1.0
    if HAS_NORM:
        r = _row_rms_inv(x_row, K, eps, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _load_x(x_row, k0 + offs_k, K, EVEN_K).to(tl.float32)
        if HAS_NORM:
            x = x * r * _load_x(gamma_ptr, k0 + offs_k, K, EVEN_K).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    m = tl.max(amax, axis=0)
    return r, tl.where(m > 0, m, 1.0)


@triton.jit
def _w8a8_gemv_kernel(a_ptr, sa_ptr, w_ptr, sw_ptr, bias_ptr, res_ptr, y_ptr, gamma_ptr, N, K,
                      stride_am, stride_rm, stride_ym, eps, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr,
                      HAS_RES: tl.constexpr = False, GLU: tl.constexpr = False,
                      PREFETCH: tl.constexpr = True, QUANT: tl.constexpr = False,
                      HAS_NORM: tl.constexpr = False, EVEN_K: tl.constexpr = True):
    """Decode (a few rows): ``y[m, n] = s_a[m] s_w[n] sum_k a[m, k] w[n, k] (+ bias[n])``, one
    program per row m and BLOCK_N outputs, K in BLOCK_K steps (EVEN_K: BLOCK_K divides K, no
    masks; otherwise the steps past K load zeros, so one step can cover a whole short row such
    as K = 576). Codes arrive as bytes (int8, or E4M3 as uint8). int8 products summed in int32
    (exact); E4M3 products summed in float32 (no reduced-precision tensor-core accumulator).
    Epilogues as the weight-only GEMV's: GLU (the weight is [G; U], 2N rows: ``y = silu(g) * u``
    from rows n and N + n), then ``+ res[m, n]``. PREFETCH: the next step's weights are loaded
    before this step's products (two steps of loads in flight; with EVEN_K the last step re-reads
    its own block instead of reading past the row, otherwise that load is masked off).

    QUANT: ``a`` is the float16 activation row, quantized here (no separate launch): each
    program reads the row once for its per-token scale (:func:`_row_scale_stats`, with the
    RMSNorm when HAS_NORM) and again for its codes, ``s_a = m / qmax`` as :func:`_quant_rows_kernel`.
    Without the norm the codes equal that kernel's; with it, r may differ in its last bit (the
    sum of squares is added in another order)."""
    pid_m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.where(offs_n < N, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32 if FP8 else tl.int32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32 if FP8 else tl.int32)
    w_rows = w_ptr + rn[:, None] * K + offs_k[None, :]
    if PREFETCH:
        nxt = _ld_codes(w_rows, 0, offs_k, K, EVEN_K, FP8)
        if GLU:
            nxt_u = _ld_codes(w_rows + N * K, 0, offs_k, K, EVEN_K, FP8)
    a_row = a_ptr + pid_m * stride_am
    if QUANT:
        r, mx = _row_scale_stats(a_row, gamma_ptr, K, eps, offs_k, HAS_NORM, BLOCK_K, EVEN_K)
        sa = tl.math.div_rn(mx, 448.0 if FP8 else 127.0)
    else:
        sa = tl.load(sa_ptr + pid_m)
    for k0 in range(0, K, BLOCK_K):
        if QUANT:
            x = _load_x(a_row, k0 + offs_k, K, EVEN_K).to(tl.float32)
            if HAS_NORM:
                x = x * r * _load_x(gamma_ptr, k0 + offs_k, K, EVEN_K).to(tl.float32)
            a = _quant_code(x, mx, FP8)
        else:
            a = _load_x(a_row, k0 + offs_k, K, EVEN_K)
            if FP8:
                a = a.to(tl.float8e4nv, bitcast=True)
        if PREFETCH:
            w = nxt
            if EVEN_K:
                k1 = tl.minimum(k0 + BLOCK_K, K - BLOCK_K)
            else:
                k1 = k0 + BLOCK_K
            nxt = _ld_codes(w_rows, k1, offs_k, K, EVEN_K, FP8)
            if GLU:
                w_u = nxt_u
                nxt_u = _ld_codes(w_rows + N * K, k1, offs_k, K, EVEN_K, FP8)
        else:
            w = _ld_codes(w_rows, k0, offs_k, K, EVEN_K, FP8)
            if GLU:
                w_u = _ld_codes(w_rows + N * K, k0, offs_k, K, EVEN_K, FP8)
        acc += _w8a8_prod(w, a, FP8)
        if GLU:
            acc_u += _w8a8_prod(w_u, a, FP8)
    y = tl.sum(acc, axis=1).to(tl.float32) * sa * tl.load(sw_ptr + rn).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn).to(tl.float32)
    if GLU:
        u = tl.sum(acc_u, axis=1).to(tl.float32) * sa * tl.load(sw_ptr + N + rn).to(tl.float32)
        if HAS_BIAS:
            u += tl.load(bias_ptr + N + rn).to(tl.float32)
        y = y / (1.0 + tl.exp(-y)) * u
    if HAS_RES:
        y += tl.load(res_ptr + pid_m * stride_rm + rn).to(tl.float32)
    tl.store(y_ptr + pid_m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _dequant_nat_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, KW, G, stride_wn,
                        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    """float16 ``W[n, k] = (u - z) * s`` in natural k order, a ``[BLOCK_N, BLOCK_K]`` tile a
    program (the large-M path: W, then cuBLAS), held as ``[BLOCK_N, groups, GROUP]``. Each
    element reads its own word (word ``16 (k // C) + k % 16``, field ``(k % C) // 16``): a
    thread's consecutive k are consecutive words (vector loads; the 32 // BITS threads that share
    a word read it from L1) and its outputs consecutive halves (16-byte stores): no shuffle.
    ``(u - z)`` exact, one rounding for ``* s``: bit-identical to :func:`packing.dequantize`."""
    E: tl.constexpr = 32 // BITS
    C: tl.constexpr = 16 * E
    MASK: tl.constexpr = (1 << BITS) - 1
    NG: tl.constexpr = BLOCK_K // GROUP
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1) * NG + tl.arange(0, NG)
    rn = tl.where(offs_n < N, offs_n, 0)[:, None, None]
    k = g[None, :, None] * GROUP + tl.arange(0, GROUP)[None, None, :]      # [1, NG, GROUP]
    widx = (k // C) * 16 + k % 16
    sh = ((k % C) // 16) * BITS
    sg = rn * G + g[None, :, None]                                          # [BN, NG, 1]
    if EVEN:
        words = tl.load(qw_ptr + rn * KW + widx)
        s = tl.load(s_ptr + sg)
    else:
        words = tl.load(qw_ptr + rn * KW + widx, mask=widx < KW, other=0)
        s = tl.load(s_ptr + sg, mask=g[None, :, None] < G, other=1.0)
    u = (words >> sh) & MASK
    h = (u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)             # 1024 + u, exact
    if HAS_ZERO:
        if EVEN:
            z = tl.load(z_ptr + sg).to(tl.float16)
        else:
            z = tl.load(z_ptr + sg, mask=g[None, :, None] < G, other=0).to(tl.float16)
        w = (h - (z + 1024.0)) * s
    else:
        w = (h - (1024.0 + (1 << (BITS - 1)))) * s
    on = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None, None]
    ptrs = w_ptr + on * stride_wn + k
    if EVEN:
        tl.store(ptrs, w)
    else:
        tl.store(ptrs, w, mask=(on < N) & (k < K))


@triton.jit
def _rmsnorm_kernel(x_ptr, g_ptr, y_ptr, K, stride_x, stride_y, eps, BLOCK_K: tl.constexpr,
                    PDL: tl.constexpr = False):
    """``y = x * rsqrt(mean(x^2) + eps) * gamma`` per row, float32 inside (one launch); PDL: see
    :func:`_wq_gemv_kernel` (gamma is read before the wait)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    m = offs < K
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / K + eps)
    tl.store(y_ptr + row * stride_y + offs, (x * r * g).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rope_cache_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, cache_ptr,
                       T, stride_qkv, s_kv, s_b, s_h, s_l,
                       NH: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr,
                       HAS_ROPE: tl.constexpr, PDL: tl.constexpr = False):
    """The epilogue of the fused qkv GEMM, one program per (token row, head): rotary on q and k
    (rotate-half: ``[x1*c - x2*s, x2*c + x1*s]``), q to ``q [R, NH, HD]``, k and v written into
    the cache ``[2, B, NKV, L, HD]`` at the token's position."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    HALF: tl.constexpr = HD // 2
    offs = tl.arange(0, HALF)
    if PDL:  # (see _wq_gemv_kernel)
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pos = tl.load(pos_ptr + r % T)
    base = qkv_ptr + r * stride_qkv + h * HD
    x1 = tl.load(base + offs).to(tl.float32)
    x2 = tl.load(base + HALF + offs).to(tl.float32)
    y1 = x1
    y2 = x2
    if HAS_ROPE:
        if h < NH + NKV:
            c = tl.load(cos_ptr + pos * HALF + offs)
            s = tl.load(sin_ptr + pos * HALF + offs)
            y1 = x1 * c - x2 * s
            y2 = x2 * c + x1 * s
    if h < NH:
        out = q_ptr + (r * NH + h) * HD
    else:
        kv = (h - NH) // NKV  # 0: k, 1: v
        out = cache_ptr + kv * s_kv + (r // T) * s_b + ((h - NH) % NKV) * s_h + pos * s_l
    tl.store(out + offs, y1.to(q_ptr.dtype.element_ty))
    tl.store(out + HALF + offs, y2.to(q_ptr.dtype.element_ty))
