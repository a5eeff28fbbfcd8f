"""Kernels of the ``triton`` target, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1).

Integer paths (unpacking, dequantization, int8 activation codes, int32 accumulation) are exact
against numpy; float paths are within the stated tolerance: relative Frobenius error
``|y - ref| / |ref| < 2e-3`` for float16 outputs of float32 accumulations (float16 output
rounding is 2**-11 ~ 4.9e-4 relative per element).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does too)

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from lbcc.targets.triton import ops, packing  # noqa: E402

FLOAT_TOL = 2e-3


def rel_err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def packed(rng, n, k, bits, group, symmetric):
    w = rng.standard_normal((n, k)).astype(np.float32)
    codes, s, z = packing.quantize_groupwise(w, bits, group, symmetric)
    zeros = None if symmetric else z
    pad = (1 << (bits - 1)) if symmetric else z[:, -1]
    qw = packing.pack(codes, bits, group, pad)
    t = (torch.from_numpy(qw), torch.from_numpy(s),
         None if zeros is None else torch.from_numpy(zeros))
    return codes, s, zeros, t


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_roundtrip_exact(bits):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1 << bits, (5, 40), dtype=np.uint8)
    words = packing.pack(codes, bits, 16, pad_code=3)
    kp = packing.padded_k(40, 16, bits)
    assert kp == 16 * 32 // bits  # one chunk of 16 words
    assert words.dtype == np.int32 and words.shape == (5, kp * bits // 32)
    out = packing.unpack(words, bits)
    np.testing.assert_array_equal(out[:, :40], codes)
    assert (out[:, 40:] == 3).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_layout_chunked_planes(bits):
    """Bit field j of word i of chunk c holds the code of k = c*C + 16 j + i (C = 16 * 32/bits)."""
    rng = np.random.default_rng(1)
    e, c = 32 // bits, 16 * 32 // bits
    codes = rng.integers(0, 1 << bits, (3, 2 * c), dtype=np.uint8)
    words = packing.pack(codes, bits, 16, pad_code=0).view(np.uint32)
    for n in range(3):
        for w in range(words.shape[1]):
            for j in range(e):
                k = (w // 16) * c + 16 * j + w % 16
                assert (int(words[n, w]) >> (j * bits)) & ((1 << bits) - 1) == codes[n, k]


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_dequant_kernel_exact(bits, symmetric):
    rng = np.random.default_rng(bits + symmetric)
    n, k, group = 24, 72, 32  # K not a multiple of the group: padded
    codes, s, z, (qw, st, zt) = packed(rng, n, k, bits, group, symmetric)
    w = ops.dequantize(qw, st, zt, bits, group, k, block_n=16).numpy()
    ref = packing.dequantize(codes, s, z, bits, group)
    np.testing.assert_array_equal(w.view(np.uint16), ref.view(np.uint16))


def _ref_linear(x, codes, s, z, bits, group, bias=None):
    w = packing.dequantize(codes, s, z, bits, group).astype(np.float64)
    y = x.astype(np.float64) @ w.T
    return y if bias is None else y + bias


def test_dequant_kernel_tiles():
    """The natural-order dequantization with other tiles (K a multiple of the tile: the
    unmasked form; a tile of 2 groups), and dequant + matmul through it."""
    rng = np.random.default_rng(5)
    n, k, group = 32, 256, 64
    codes, s, z, (qw, st, zt) = packed(rng, n, k, 4, group, False)
    ref = packing.dequantize(codes, s, z, 4, group)
    for bn, bk in ((16, 128), (32, 256), (8, 64)):
        w = ops.dequantize(qw, st, zt, 4, group, k, block_n=bn, block_k=bk).numpy()
        np.testing.assert_array_equal(w.view(np.uint16), ref.view(np.uint16))
    x = rng.standard_normal((3, k)).astype(np.float16)
    bias = rng.standard_normal(n).astype(np.float16)
    y = ops.wq_linear(torch.from_numpy(x), qw, st, zt, 4, group, bias=torch.from_numpy(bias),
                      config=ops._dqmm(8, 128, 4))
    assert rel_err(y.float().numpy(), _ref_linear(x, codes, s, z, 4, group, bias)) < FLOAT_TOL


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
@pytest.mark.parametrize("kind", ["gemv", "gemv-split", "gemv-km", "mm", "mm-split", "mm-swap",
                                  "mm-cat", "mm-cat-swap", "nat", "nat-split", "nat-swap",
                                  "nat-h2", "nat-h2-swap"])
def test_wq_linear(bits, symmetric, kind):
    if "h2" in kind and bits != 4:
        pytest.skip("float16-pair dequantization: 4-bit only")
    rng = np.random.default_rng(7 * bits + symmetric)
    m = 1 if kind.startswith("gemv") else 5
    n, k = 40, 200
    group = 128 if "h2" in kind else 64
    codes, s, z, (qw, st, zt) = packed(rng, n, k, bits, group, symmetric)
    x = rng.standard_normal((m, k)).astype(np.float16)
    bias = rng.standard_normal(n).astype(np.float16)
    split = 2 if kind.endswith("split") else 1
    if kind.startswith("gemv"):
        cfg = ops._gemv(16, 2 // split, split, 4, pf=split == 1, km=kind.endswith("km"))
    elif kind.startswith("nat"):
        cfg = ops._nat(16, 16, split, 4, 2, gm=2, swap=kind.endswith("swap"), h2="h2" in kind)
    else:
        cfg = ops._mm(16, 16, split, 4, 2, gm=2, swap=kind.endswith("swap"), cat="cat" in kind)
    y = ops.wq_linear(torch.from_numpy(x), qw, st, zt, bits, group,
                      bias=torch.from_numpy(bias), config=cfg)
    assert y.shape == (m, n) and y.dtype == torch.float16
    assert rel_err(y.numpy(), _ref_linear(x, codes, s, z, bits, group, bias)) < FLOAT_TOL


@pytest.mark.parametrize("group", [16, 32, 128, 256])
def test_wq_gemv_groups(group):
    """Groups shorter than a chunk (a scale per 1 or 2 planes), a chunk, and longer; K a
    multiple of the chunk (no activation masking) and M = 2 rows."""
    rng = np.random.default_rng(group)
    n, k = 24, 256
    codes, s, z, (qw, st, zt) = packed(rng, n, k, 4, group, False)
    x = rng.standard_normal((2, k)).astype(np.float16)
    for cfg in (ops._gemv(8, 2, 1, 4, pf=False), ops._gemv(4, 1, 2, 4),
                ops._gemv(8, 2, 1, 4, pf=2, km=True),
                ops._mm(16, 16, 1, 4, 2), ops._mm(16, 16, 1, 4, 2, cat=True),
                ops._nat(16, 16, 1, 4, 2)):
        y = ops.wq_linear(torch.from_numpy(x), qw, st, zt, 4, group, config=cfg)
        assert rel_err(y.numpy(), _ref_linear(x, codes, s, z, 4, group)) < FLOAT_TOL


@pytest.mark.parametrize("symmetric", [True, False])
def test_wq_gemv_half2(symmetric):
    """The float16-pair GEMV (interpreter twin of its PTX): float16 products, 4-term float16
    partial sums (8-term in the chunk-major tiles' 4-word accumulation), within the stated
    tolerance; groups of whole chunks; M = 2; row-major and chunk-major tiles."""
    rng = np.random.default_rng(21 + symmetric)
    n, k = 24, 384
    codes, s, z, (qw, st, zt) = packed(rng, n, k, 4, 128, symmetric)
    x = rng.standard_normal((2, k)).astype(np.float16)
    for cfg in (ops._gemv(8, 1, 1, 4, h2=True), ops._gemv(4, 1, 2, 4, pf=False, h2=True),
                ops._gemv(8, 1, 1, 4, h2=True, km=True),
                ops._gemv(16, 1, 1, 2, pf=2, h2=True, km=True),
                ops._gemv(4, 1, 3, 4, h2=True, km=True)):
        y = ops.wq_linear(torch.from_numpy(x), qw, st, zt, 4, 128, config=cfg)
        assert rel_err(y.numpy(), _ref_linear(x, codes, s, z, 4, 128)) < FLOAT_TOL


@pytest.mark.parametrize("symmetric", [True, False])
def test_wq_gemv_epilogues(symmetric):
    """The GEMV's epilogues against float64 math on the same weights: ``residual + x W^T``
    (whole rows and split-K, where the first split adds it) and, for W = [G; U],
    ``silu(x G^T) * (x U^T)`` (rows of G and U interleaved in one program; N not a multiple of
    the row block); the float32 and float16-pair forms, one and two steps of prefetch; and the
    tiled kernels, which apply the same epilogues in torch."""
    rng = np.random.default_rng(31 + symmetric)
    n, k, group = 40, 384, 128
    codes, s, z, (qw, st, zt) = packed(rng, n, k, 4, group, symmetric)
    x = rng.standard_normal((2, k)).astype(np.float16)
    res = rng.standard_normal((2, n)).astype(np.float16)
    ref = _ref_linear(x, codes, s, z, 4, group)
    g, u = ref[:, : n // 2], ref[:, n // 2:]
    ref_glu = g / (1 + np.exp(-g)) * u
    cfgs = (ops._gemv(8, 1, 1, 4), ops._gemv(4, 1, 3, 4), ops._gemv(8, 1, 1, 2, pf=2),
            ops._gemv(8, 1, 1, 4, h2=True), ops._gemv(4, 1, 1, 4, pf=2, h2=True),
            ops._gemv(8, 1, 1, 4, pf=2, h2=True, km=True), ops._gemv(8, 1, 3, 4, km=True),
            ops._nat(16, 16, 1, 4, 2), ops._dqmm(8, 128, 4))
    for cfg in cfgs:
        y = ops.wq_linear(torch.from_numpy(x), qw, st, zt, 4, group, config=cfg,
                          residual=torch.from_numpy(res))
        assert rel_err(y.numpy(), ref + res) < FLOAT_TOL, cfg
        y = ops.wq_linear(torch.from_numpy(x), qw, st, zt, 4, group, config=cfg, glu=True)
        assert y.shape == (2, n // 2)
        assert rel_err(y.numpy(), ref_glu) < FLOAT_TOL, cfg
    # without a config: the tuner's default (the CPU has no tuning) for GLU rows
    y = ops.wq_linear(torch.from_numpy(x[:1]), qw, st, zt, 4, group, glu=True)
    assert rel_err(y.numpy(), ref_glu[:1]) < FLOAT_TOL
    with pytest.raises(ValueError, match="glu and residual"):
        ops.wq_linear(torch.from_numpy(x), qw, st, zt, 4, group, glu=True,
                      residual=torch.from_numpy(res))


@pytest.mark.parametrize("k", [384, 200])
def test_wq_gemv_normalizes_its_input(k):
    """The GEMV computing ``RMSNorm(x) * gamma`` itself: the same result as the norm kernel
    followed by the same GEMV (x * r * gamma rounded to float16 in both; r may differ in its
    last bit), for the float32 and float16-pair forms, chunk-major tiles, split-K, prefetch,
    the residual and GLU epilogues, K whole chunks or not; the two-launch candidate and the
    tiled kernels (norm kernel first) too; M > 16 takes the norm kernel."""
    rng = np.random.default_rng(40)
    n, group = 40, 128 if k % 128 == 0 else 32
    codes, s, z, (qw, st, zt) = packed(rng, n, k, 4, group, False)
    x = torch.from_numpy((rng.standard_normal((2, k)) * 2).astype(np.float16))
    gamma = torch.from_numpy((1 + 0.3 * rng.standard_normal(k)).astype(np.float16))
    res = torch.from_numpy(rng.standard_normal((2, n)).astype(np.float16))
    xn = ops.rms_norm_fused(x, gamma, 1e-5)
    cfgs = [ops._gemv(8, 1, 1, 4), ops._gemv(4, 1, 3, 4), ops._gemv(8, 1, 1, 2, pf=2),
            ops._gemv(8, 1, 3, 4, km=True), ops.NORM_THEN_WQ, ops._nat(16, 16, 1, 4, 2),
            ops._mm(16, 64, 1, 4, 3)]
    if group % 128 == 0:
        cfgs += [ops._gemv(4, 1, 1, 4, pf=2, h2=True),
                 ops._gemv(8, 1, 1, 4, pf=2, h2=True, km=True)]
    variants = ((False, None), (False, res), (True, None))
    for i, cfg in enumerate(cfgs):  # every epilogue for the first, one each for the others
        for glu, r in variants if i == 0 else variants[i % 3: i % 3 + 1]:
            plain = dict(ops.DEFAULT_GEMV) if cfg is ops.NORM_THEN_WQ else cfg
            want = ops.wq_linear(xn, qw, st, zt, 4, group, config=plain, residual=r, glu=glu)
            got = ops.wq_linear(x, qw, st, zt, 4, group, config=cfg, residual=r, glu=glu,
                                gamma=gamma, eps=1e-5)
            assert got.shape == want.shape
            assert rel_err(got.numpy(), want.numpy()) < FLOAT_TOL, (cfg, glu)
    # no config: the default GEMV at M = 1 (normalizing), the norm kernel at M = 20
    y = ops.wq_linear(x[:1], qw, st, zt, 4, group, gamma=gamma, eps=1e-5)
    assert rel_err(y.numpy(), ops.wq_linear(xn[:1], qw, st, zt, 4, group).numpy()) < FLOAT_TOL
    x20 = x.repeat(10, 1)
    np.testing.assert_array_equal(
        ops.wq_linear(x20, qw, st, zt, 4, group, gamma=gamma, eps=1e-5).numpy(),
        ops.wq_linear(ops.rms_norm_fused(x20, gamma, 1e-5), qw, st, zt, 4, group).numpy())


def test_wq_linear_default_configs_3d_input():
    """The dispatch without an explicit config (M=1 GEMV, small M, large M) and a [B, T, K] input."""
    rng = np.random.default_rng(3)
    n, k, group = 32, 128, 32
    codes, s, z, (qw, st, zt) = packed(rng, n, k, 4, group, False)
    for shape in [(1, 1, k), (2, 3, k), (1, 20, k)]:
        x = rng.standard_normal(shape).astype(np.float16)
        y = ops.wq_linear(torch.from_numpy(x), qw, st, zt, 4, group)
        assert y.shape == (*shape[:-1], n)
        ref = _ref_linear(x.reshape(-1, k), codes, s, z, 4, group).reshape(*shape[:-1], n)
        assert rel_err(y.numpy(), ref) < FLOAT_TOL


def _ref_quant_rows(x):
    """numpy twin of the kernel: s = amax/127, q = round_half_even(x * (127/amax))."""
    x = x.astype(np.float32)
    m = np.abs(x).max(-1)
    m = np.where(m > 0, m, np.float32(1)).astype(np.float32)
    inv = (np.float32(127) / m).astype(np.float32)
    q = np.clip(np.rint(x * inv[:, None]), -127, 127).astype(np.int8)
    return q, (m / np.float32(127)).astype(np.float32)


def test_quant_rows_exact():
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((6, 300)) * 3).astype(np.float16)
    x[2] = 0  # an all-zero row: scale 1/127, codes 0
    q, s = ops.quant_rows(torch.from_numpy(x), block_k=128)
    qr, sr = _ref_quant_rows(x)
    np.testing.assert_array_equal(q.numpy(), qr)
    np.testing.assert_array_equal(s.numpy(), sr)


def test_quant_rows_rmsnorm():
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((4, 256)) * 2).astype(np.float16)
    gamma = (1 + 0.1 * rng.standard_normal(256)).astype(np.float16)
    q, s = ops.quant_rows(torch.from_numpy(x), torch.from_numpy(gamma), eps=1e-5, block_k=64)
    xf = x.astype(np.float32)
    h = xf / np.sqrt((xf * xf).mean(-1, keepdims=True) + 1e-5) * gamma.astype(np.float32)
    qr, sr = _ref_quant_rows(h)
    np.testing.assert_allclose(s.numpy(), sr, rtol=1e-5)
    assert np.abs(q.numpy().astype(int) - qr).max() <= 1  # rsqrt rounding may move a tie
    assert (q.numpy() == qr).mean() > 0.99


def test_w8a8_int32_accumulation_exact():
    rng = np.random.default_rng(13)
    m, n, k = 19, 40, 96
    q = rng.integers(-127, 128, (m, k), dtype=np.int8)
    w = rng.integers(-127, 128, (n, k), dtype=np.int8)
    sa = np.ones(m, np.float32)
    sw = np.ones(n, np.float32)
    cfg = dict(ops.DEFAULT_W8A8, BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)
    acc = ops.w8a8_linear(torch.from_numpy(q), torch.from_numpy(sa), torch.from_numpy(w),
                          torch.from_numpy(sw), out_dtype=torch.int32, config=cfg)
    np.testing.assert_array_equal(acc.numpy(), q.astype(np.int64) @ w.astype(np.int64).T)


def test_w8a8_linear_fp():
    rng = np.random.default_rng(14)
    m, n, k = 7, 48, 160
    x = rng.standard_normal((m, k)).astype(np.float16)
    wf = rng.standard_normal((n, k)).astype(np.float32)
    sw = (np.abs(wf).max(1) / 127).astype(np.float32)
    w = np.clip(np.rint(wf / sw[:, None]), -127, 127).astype(np.int8)
    bias = rng.standard_normal(n).astype(np.float16)
    y = ops.w8a8_linear_fp(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(sw),
                           torch.from_numpy(bias))
    qr, sr = _ref_quant_rows(x)
    ref = (qr.astype(np.float64) @ w.astype(np.float64).T) * sr[:, None] * sw[None, :] + bias
    assert rel_err(y.numpy(), ref) < FLOAT_TOL


def _ref_quant_rows_fp8(x):
    """numpy twin of the FP8 path: s = amax/448, q = e4m3(x * (448/amax)) (nearest even,
    ml_dtypes' conversion)."""
    import ml_dtypes

    x = x.astype(np.float32)
    m = np.abs(x).max(-1)
    m = np.where(m > 0, m, np.float32(1)).astype(np.float32)
    inv = (np.float32(448) / m).astype(np.float32)
    q = np.clip(x * inv[:, None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q.astype(np.float32), (m / np.float32(448)).astype(np.float32)


@pytest.mark.parametrize("block_k", [512, 64])
def test_quant_rows_fp8_exact(block_k):
    """E4M3 codes equal ml_dtypes' round-to-nearest-even, over the whole range: normals,
    subnormals (below 2^-6), exact ties, the row maximum at +-448 and an all-zero row."""
    rng = np.random.default_rng(16)
    x = (rng.standard_normal((5, 300)) * np.logspace(-5, 0, 300)).astype(np.float16)
    # row maximum 448: the codes are x itself, exact ties included (17 -> 16, 19 -> 20, and
    # the subnormal 1.5 * 2^-9 -> 2^-8)
    x[1, :8] = [448, -448, 17, 19, 18, 0.5, 2 ** -8, 3 * 2 ** -10]
    x[3] = 0
    q, s = ops.quant_rows(torch.from_numpy(x), block_k=block_k, fp8=True)
    assert q.dtype == torch.float8_e4m3fn
    qr, sr = _ref_quant_rows_fp8(x)
    np.testing.assert_array_equal(q.float().numpy(), qr)
    np.testing.assert_array_equal(s.numpy(), sr)
    assert [q[1, i].item() for i in (2, 3, 7)] == [16, 20, 2 ** -8]  # ties to even


def test_fp8_linear():
    """E4M3 x E4M3 products with float32 accumulation: within the float tolerance of float64
    math on the same E4M3 values and scales (K = 96: the tiles whose BLOCK_K divides it)."""
    import ml_dtypes

    rng = np.random.default_rng(17)
    m, n, k = 7, 48, 96
    x = rng.standard_normal((m, k)).astype(np.float16)
    wf = rng.standard_normal((n, k)).astype(np.float32)
    sw = (np.abs(wf).max(1) / 448).astype(np.float32)
    w8 = (wf / sw[:, None]).astype(ml_dtypes.float8_e4m3fn)
    w = torch.from_numpy(w8.view(np.uint8)).view(torch.float8_e4m3fn)
    bias = rng.standard_normal(n).astype(np.float16)
    y = ops.w8a8_linear_fp(torch.from_numpy(x), w, torch.from_numpy(sw), torch.from_numpy(bias))
    qr, sr = _ref_quant_rows_fp8(x)
    ref = (qr.astype(np.float64) @ w8.astype(np.float64).T) * sr[:, None] * sw[None, :] + bias
    assert rel_err(y.numpy(), ref) < FLOAT_TOL
    with pytest.raises(ValueError, match="divisible by 32"):
        q, sa = ops.quant_rows(torch.zeros(2, 72, dtype=torch.float16), fp8=True)
        ops.w8a8_linear(q, sa, torch.zeros(4, 72, dtype=torch.float8_e4m3fn), torch.ones(4))


@pytest.mark.parametrize("fp8", [False, True])
def test_w8a8_gemv(fp8):
    """The decode GEMV (M <= 4): int8 products summed in int32, E4M3 products in float32; the
    same result as float64 math on the same codes within the float tolerance, and the same as
    the tensor-core tile kernel; the default config at M = 1 is a GEMV whose BLOCK_K divides K."""
    import ml_dtypes

    rng = np.random.default_rng(18)
    m, n, k = 3, 40, 192
    x = rng.standard_normal((m, k)).astype(np.float16)
    wf = rng.standard_normal((n, k)).astype(np.float32)
    if fp8:
        sw = (np.abs(wf).max(1) / 448).astype(np.float32)
        w_np = (wf / sw[:, None]).astype(ml_dtypes.float8_e4m3fn)
        w = torch.from_numpy(w_np.view(np.uint8)).view(torch.float8_e4m3fn)
    else:
        sw = (np.abs(wf).max(1) / 127).astype(np.float32)
        w_np = np.clip(np.rint(wf / sw[:, None]), -127, 127).astype(np.int8)
        w = torch.from_numpy(w_np)
    q, sa = ops.quant_rows(torch.from_numpy(x), fp8=fp8)
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float16))
    ref = (q.double().numpy() @ w_np.astype(np.float64).T) * sa.numpy()[:, None] * \
        sw[None, :] + bias.numpy()
    gemv = dict(ops.W8A8_GEMV_CONFIGS[0], BLOCK_N=16, BLOCK_K=64)
    y = ops.w8a8_linear(q, sa, w, torch.from_numpy(sw), bias, config=gemv)
    assert rel_err(y.numpy(), ref) < FLOAT_TOL
    tile = dict(ops.DEFAULT_W8A8, BLOCK_M=16, BLOCK_N=16, BLOCK_K=64)
    y_tile = ops.w8a8_linear(q, sa, w, torch.from_numpy(sw), bias, config=tile)
    assert rel_err(y.numpy(), y_tile.numpy()) < FLOAT_TOL
    no_pf = ops.w8a8_linear(q, sa, w, torch.from_numpy(sw), bias,
                            config=dict(gemv, PREFETCH=False))
    np.testing.assert_array_equal(no_pf.numpy(), y.numpy())  # prefetch changes no sum
    y1 = ops.w8a8_linear(q[:1], sa[:1], w, torch.from_numpy(sw), bias)  # the default at M = 1
    np.testing.assert_array_equal(y1.numpy(), y[:1].numpy())
    # steps that run past K (masked: 192 = 128 + 64 of 128, and one step of 256)
    for bk in (128, 256):
        long = ops.w8a8_linear(q, sa, w, torch.from_numpy(sw), bias,
                               config=dict(gemv, BLOCK_K=bk))
        assert rel_err(long.numpy(), ref) < FLOAT_TOL
    # epilogues inside the GEMV (w = [G; U]: silu(g) * u, then + residual) against the tile
    # kernel followed by the torch epilogue
    res = torch.from_numpy(rng.standard_normal((m, n // 2)).astype(np.float16))
    for glu, r in ((True, None), (False, torch.cat([res, res], 1)), (True, res)):
        got = ops.w8a8_linear(q, sa, w, torch.from_numpy(sw), bias, config=gemv, residual=r,
                              glu=glu)
        want = ops.linear_epilogue(y_tile, r, glu)
        assert got.shape == want.shape
        assert rel_err(got.numpy(), want.numpy()) < FLOAT_TOL
        tiled = ops.w8a8_linear(q, sa, w, torch.from_numpy(sw), bias, config=tile, residual=r,
                                glu=glu)
        np.testing.assert_array_equal(tiled.numpy(), want.numpy())


@pytest.mark.parametrize("fp8", [False, True])
def test_w8a8_gemv_quantizes_its_input(fp8):
    """Decode in one launch: the GEMV that quantizes the float16 rows itself gives bit for bit
    the result of the quantization kernel followed by the same GEMV (same codes, same scale,
    same sums), with bias, GLU and residual; with the RMSNorm fused too, the same within the
    float tolerance (its sum of squares is added in another order). M > 4 and the explicit
    two-launch candidate take the quantization kernel."""
    import ml_dtypes

    rng = np.random.default_rng(20)
    m, n, k = 3, 48, 320
    x = torch.from_numpy((rng.standard_normal((m, k)) * 3).astype(np.float16))
    x[1, 7] = 40.0  # an outlier sets row 1's scale
    wf = rng.standard_normal((n, k)).astype(np.float32)
    qmax = 448.0 if fp8 else 127.0
    sw = torch.from_numpy((np.abs(wf).max(1) / qmax).astype(np.float32))
    if fp8:
        w_np = (wf / sw.numpy()[:, None]).astype(ml_dtypes.float8_e4m3fn)
        w = torch.from_numpy(w_np.view(np.uint8)).view(torch.float8_e4m3fn)
    else:
        w = torch.from_numpy(np.clip(np.rint(wf / sw.numpy()[:, None]), -127, 127)
                             .astype(np.int8))
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float16))
    gamma = torch.from_numpy((1 + 0.2 * rng.standard_normal(k)).astype(np.float16))
    res = torch.from_numpy(rng.standard_normal((m, n // 2)).astype(np.float16))
    cases = [(64, False, None), (64, True, None), (64, False, torch.cat([res, res], 1)),
             (64, True, res), (512, True, res), (512, False, None)]  # 512: one masked step
    for bk, glu, r in cases:
        gemv = dict(ops.W8A8_GEMV_CONFIGS[0], BLOCK_N=16, BLOCK_K=bk)
        fused = dict(gemv, QUANT=True)
        q, sa = ops.quant_rows(x, fp8=fp8)
        want = ops.w8a8_linear(q, sa, w, sw, bias, config=gemv, residual=r, glu=glu)
        got = ops.w8a8_linear_fp(x, w, sw, bias, residual=r, glu=glu, config=fused)
        np.testing.assert_array_equal(got.numpy(), want.numpy())
        q, sa = ops.quant_rows(x, gamma, 1e-5, fp8=fp8)
        want = ops.w8a8_linear(q, sa, w, sw, bias, config=gemv, residual=r, glu=glu)
        got = ops.w8a8_linear_fp(x, w, sw, bias, gamma, 1e-5, residual=r, glu=glu,
                                 config=fused)
        assert rel_err(got.numpy(), want.numpy()) < FLOAT_TOL
        two = ops.w8a8_linear_fp(x, w, sw, bias, gamma, 1e-5, residual=r, glu=glu,
                                 config=ops.QUANT_THEN_GEMM)
        assert rel_err(two.numpy(), want.numpy()) < FLOAT_TOL
    # the default at M = 1 (no tuning on the CPU): the first quantizing GEMV; at M = 5 the
    # quantization kernel and the tile kernel
    first = dict(ops.W8A8_GEMV_CONFIGS[0], QUANT=True)
    np.testing.assert_array_equal(ops.w8a8_linear_fp(x[:1], w, sw, bias).numpy(),
                                  ops.w8a8_linear_fp(x[:1], w, sw, bias, config=first).numpy())
    x5 = torch.cat([x, x[:2]])
    q, sa = ops.quant_rows(x5, gamma, 1e-5, fp8=fp8)
    np.testing.assert_array_equal(ops.w8a8_linear_fp(x5, w, sw, bias, gamma, 1e-5).numpy(),
                                  ops.w8a8_linear(q, sa, w, sw, bias).numpy())


def test_fp8_scaled_mm_candidate():
    """The cuBLASLt candidate (``torch._scaled_mm``, here its CPU implementation): the same
    product as float64 math on the same codes, the same epilogues as the tile kernel; offered to
    the tuner only on CUDA GPUs of compute capability 8.9+ with N, K multiples of 16."""
    import ml_dtypes

    rng = np.random.default_rng(19)
    m, n, k = 6, 64, 96
    x = rng.standard_normal((m, k)).astype(np.float16)
    wf = rng.standard_normal((n, k)).astype(np.float32)
    sw = torch.from_numpy((np.abs(wf).max(1) / 448).astype(np.float32))
    w_np = (wf / sw.numpy()[:, None]).astype(ml_dtypes.float8_e4m3fn)
    w = torch.from_numpy(w_np.view(np.uint8)).view(torch.float8_e4m3fn)
    q, sa = ops.quant_rows(torch.from_numpy(x), fp8=True)
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float16))
    ref = (q.double().numpy() @ w_np.astype(np.float64).T) * sa.numpy()[:, None] * \
        sw.numpy()[None, :] + bias.numpy()
    tile = dict(ops.DEFAULT_W8A8, BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)
    res = torch.from_numpy(rng.standard_normal((m, n // 2)).astype(np.float16))
    for fast in (False, True):
        cfg = ops.scaled_mm_config(fast)
        y = ops.w8a8_linear(q, sa, w, sw, bias, config=cfg)
        assert y.dtype == torch.float16 and rel_err(y.numpy(), ref) < FLOAT_TOL
        for glu, r in ((True, None), (False, torch.cat([res, res], 1)), (True, res)):
            got = ops.w8a8_linear(q, sa, w, sw, bias, config=cfg, residual=r, glu=glu)
            want = ops.w8a8_linear(q, sa, w, sw, bias, config=tile, residual=r, glu=glu)
            assert got.shape == want.shape
            assert rel_err(got.numpy(), want.numpy()) < FLOAT_TOL
    assert not ops.scaled_mm_supported(torch.device("cpu"), n, k)


def test_tuner_precompiles_candidates_in_threads():
    """Before a key's candidates are timed, each runs once from a pool of threads (Triton
    compiles them in parallel); a wrapping kind (whose first call tunes another op) is left to
    the serial timing loop, and a candidate that fails is left for that loop to record."""
    import threading

    ran, main = [], threading.get_ident()

    def fns_for(cfg):
        def call():
            if cfg.get("fail"):
                raise RuntimeError("out of shared memory")
            ran.append((cfg["i"], threading.get_ident()))
        return [call, call]

    cands = [{"kind": "gemv", "i": i} for i in range(6)] + [
        {"kind": "nat", "i": 6, "fail": True}, dict(ops.NORM_THEN_WQ, i=7),
        dict(ops.QUANT_THEN_GEMM, i=8)]
    ops.precompile(fns_for, cands, threads=3)
    assert sorted(i for i, _ in ran) == list(range(6))
    assert all(t != main for _, t in ran)
    ran.clear()
    ops.precompile(fns_for, cands, threads=1)  # one thread: nothing ahead of the timing loop
    assert ran == []


def test_quant_rows_single_pass_matches_blocked():
    """The whole-row path (BLOCK_K >= K) and the blocked path give the same codes and scales."""
    rng = np.random.default_rng(15)
    x = torch.from_numpy((rng.standard_normal((3, 200)) * 4).astype(np.float16))
    g = torch.from_numpy((1 + 0.1 * rng.standard_normal(200)).astype(np.float16))
    for gamma in (None, g):
        q1, s1 = ops.quant_rows(x, gamma, block_k=256)
        q2, s2 = ops.quant_rows(x, gamma, block_k=64)
        np.testing.assert_array_equal(q1.numpy(), q2.numpy())
        np.testing.assert_allclose(s1.numpy(), s2.numpy(), rtol=1e-6)


def test_rms_norm_fused():
    rng = np.random.default_rng(16)
    x = torch.from_numpy((rng.standard_normal((5, 96)) * 3).astype(np.float16))
    g = torch.from_numpy((1 + 0.1 * rng.standard_normal(96)).astype(np.float16))
    y = ops.rms_norm_fused(x, g, 1e-5).float().numpy()
    xf = x.float().numpy()
    ref = xf / np.sqrt((xf * xf).mean(-1, keepdims=True) + 1e-5) * g.float().numpy()
    assert rel_err(y, ref) < FLOAT_TOL


@pytest.mark.parametrize("rope", [True, False])
def test_rope_and_cache(rope):
    """q rotated into q_out; k rotated and v copied into the cache rows at their positions."""
    rng = np.random.default_rng(17)
    b, t, nh, nkv, hd, L = 2, 3, 4, 2, 16, 8
    qkv = torch.from_numpy(rng.standard_normal((b * t, (nh + 2 * nkv) * hd)).astype(np.float16))
    pos = torch.tensor([2, 3, 4])
    f = np.arange(16)[:, None] * (10000.0 ** (-np.arange(0, hd, 2) / hd))[None, :]
    cos = torch.from_numpy(np.cos(f).astype(np.float32)) if rope else None
    sin = torch.from_numpy(np.sin(f).astype(np.float32)) if rope else None
    cache = torch.zeros((2, b, nkv, L, hd), dtype=torch.float16)
    q = ops.rope_and_cache(qkv, pos, cos, sin, cache, t, nh, nkv, hd)

    def rot(x, p):  # x [rows, heads, hd]
        if not rope:
            return x
        c, s = np.cos(f[p])[:, None, :], np.sin(f[p])[:, None, :]
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    x = qkv.float().numpy()
    p_rows = pos.numpy()[np.arange(b * t) % t]
    qr = rot(x[:, :nh * hd].reshape(-1, nh, hd), p_rows)
    kr = rot(x[:, nh * hd:(nh + nkv) * hd].reshape(-1, nkv, hd), p_rows)
    vr = x[:, (nh + nkv) * hd:].reshape(-1, nkv, hd)
    assert rel_err(q.float().numpy(), qr) < FLOAT_TOL
    c = cache.float().numpy()
    for r in range(b * t):
        assert rel_err(c[0, r // t, :, p_rows[r]], kr[r]) < FLOAT_TOL
        np.testing.assert_array_equal(c[1, r // t, :, p_rows[r]], vr[r])
    assert (c[:, :, :, :2] == 0).all() and (c[:, :, :, 5:] == 0).all()
