"""lbcc.numerics: weight quantization (per channel, groups, sym/asym, MSE clip) and int4 packing."""

from __future__ import annotations

import numpy as np
import pytest

from lbcc.numerics import CLIP_GRID, pack_uint4, quantize_weight, relative_error, sqnr_db


def _w(n: int, k: int, seed: int = 0, heavy: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if heavy:  # a few large values per row, like real LLM weights
        return rng.standard_t(3, size=(n, k)).astype(np.float32)
    return rng.standard_normal((n, k)).astype(np.float32)


def _per_element_scale(qw) -> np.ndarray:
    n, k = qw.q.shape
    return np.repeat(qw.scale, qw.block_size, axis=1)[:, :k]


def _weighted_block_error(w: np.ndarray, qw, h: np.ndarray) -> np.ndarray:
    """sum_k h_k (w - dq)^2 per (row, block)."""
    n, k = w.shape
    bs = qw.block_size
    nb = -(-k // bs)
    e = (w - qw.dequantize()) ** 2 * h[None, :]
    e = np.pad(e, ((0, 0), (0, nb * bs - k)))
    return e.reshape(n, nb, bs).sum(-1)


# ----------------------------------------------------------------------------- per channel int8

def test_int8_per_channel_symmetric_layout_and_range():
    w = _w(24, 64, seed=1)
    qw = quantize_weight(w, bits=8, block_size=None, symmetric=True, clip="none")
    assert qw.q.shape == (24, 64) and qw.q.dtype == np.int8
    assert qw.scale.shape == (24, 1) and qw.scale.dtype == np.float32
    assert qw.zero_point is None and qw.block_size == 64 and qw.symmetric
    # s = max|w_row| / 127, so the largest magnitude of each row maps to +-127 exactly
    np.testing.assert_allclose(qw.scale[:, 0], np.abs(w).max(1) / 127, rtol=1e-6)
    assert np.abs(qw.q.astype(int)).max(axis=1).tolist() == [127] * 24
    assert qw.q.min() >= -128 and qw.q.max() <= 127


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,block", [(8, None), (8, 32), (4, 16), (4, 32), (4, 64)])
def test_rtn_error_is_bounded_by_half_a_step(bits, block, symmetric):
    w = _w(16, 128, seed=bits * 7 + (block or 0))
    qw = quantize_weight(w, bits=bits, block_size=block, symmetric=symmetric, clip="none")
    err = np.abs(w - qw.dequantize())
    bound = _per_element_scale(qw) / 2
    assert (err <= bound * (1 + 1e-5) + 1e-7).all(), float((err - bound).max())
    lo, hi = ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1))
    assert qw.q.min() >= lo and qw.q.max() <= hi
    if symmetric:
        assert qw.zero_point is None and qw.q.dtype == np.int8
    else:
        assert qw.q.dtype == np.uint8 and qw.zero_point is not None
        assert qw.zero_point.shape == qw.scale.shape
        assert qw.zero_point.min() >= 0 and qw.zero_point.max() <= 2 ** bits - 1
    # 8 bits is far more accurate than 4 bits on the same weight
    assert relative_error(w, qw) < (0.01 if bits == 8 else 0.15)


def test_4bit_groups_shapes():
    w = _w(8, 128)
    qw = quantize_weight(w, bits=4, block_size=32, symmetric=False)
    assert qw.scale.shape == (8, 4) and qw.zero_point.shape == (8, 4) and qw.block_size == 32
    assert qw.dequantize().shape == w.shape


def test_asymmetric_zero_is_exact_and_one_sided_rows_use_full_range():
    # an all-positive row: lo clamps to 0 so zero point 0; the row max maps to 15
    w = np.abs(_w(4, 32, seed=3)) + 0.1
    qw = quantize_weight(w, bits=4, block_size=16, symmetric=False, clip="none")
    assert (qw.zero_point == 0).all()
    assert qw.q.reshape(4, 2, 16).max(-1).tolist() == [[15, 15]] * 4
    # exact zeros stay exactly zero after dequantization
    w2 = _w(4, 32, seed=4)
    w2[:, ::5] = 0.0
    qw2 = quantize_weight(w2, bits=4, block_size=16, symmetric=False, clip="none")
    assert (qw2.dequantize()[:, ::5] == 0).all()


@pytest.mark.parametrize("k,block", [(40, 16), (40, 32), (100, 64), (7, 16)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_k_not_divisible_by_group_size(k, block, symmetric):
    w = _w(6, k, seed=k)
    qw = quantize_weight(w, bits=4, block_size=block, symmetric=symmetric, clip="none")
    nb = -(-k // block)
    assert qw.q.shape == (6, k)
    assert qw.scale.shape == (6, nb)
    deq = qw.dequantize()
    assert deq.shape == (6, k)
    assert (np.abs(w - deq) <= _per_element_scale(qw) / 2 * (1 + 1e-5) + 1e-7).all()
    # the last (partial) block is scaled from its own values only, not from the zero padding
    tail = w[:, (nb - 1) * block:]
    if symmetric:
        np.testing.assert_allclose(qw.scale[:, -1], np.abs(tail).max(1) / 7, rtol=1e-6)
    else:
        span = np.maximum(tail.max(1), 0) - np.minimum(tail.min(1), 0)
        np.testing.assert_allclose(qw.scale[:, -1], span / 15, rtol=1e-6)


@pytest.mark.parametrize("bits,block,symmetric", [(4, 32, False), (4, 32, True), (8, None, True),
                                                  (4, 16, False)])
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_clip_never_worse_than_rtn(bits, block, symmetric, weighted):
    w = _w(32, 128, seed=5, heavy=True)
    h = (np.random.default_rng(6).gamma(0.5, size=128).astype(np.float32) if weighted
         else np.ones(128, np.float32))
    none = quantize_weight(w, bits, block, symmetric, clip="none")
    mse = quantize_weight(w, bits, block, symmetric, clip="mse", importance=h if weighted else None)
    e_none = _weighted_block_error(w, none, h)
    e_mse = _weighted_block_error(w, mse, h)
    # block by block, not only in total
    assert (e_mse <= e_none * (1 + 1e-5) + 1e-9).all()
    # on heavy-tailed 4-bit weights clipping must actually help somewhere
    if bits == 4:
        assert e_mse.sum() < 0.97 * e_none.sum()
    # the clip ratio is one of the grid's: scales never exceed the RTN ones
    assert (mse.scale <= none.scale * (1 + 1e-6)).all()
    assert (mse.scale >= none.scale * CLIP_GRID[bits].min() * (1 - 1e-5)).all()


def test_importance_moves_error_to_unimportant_channels():
    w = _w(16, 64, seed=8, heavy=True)
    h = np.ones(64, np.float32)
    h[:8] = 1000.0  # the first 8 input channels matter a lot
    plain = quantize_weight(w, 4, 32, False, clip="mse")
    weighted = quantize_weight(w, 4, 32, False, clip="mse", importance=h)
    err_plain = ((w - plain.dequantize())[:, :8] ** 2).sum()
    err_weighted = ((w - weighted.dequantize())[:, :8] ** 2).sum()
    assert err_weighted <= err_plain


def test_zero_weight_and_bad_arguments():
    qw = quantize_weight(np.zeros((3, 32), np.float32), 4, 16, symmetric=False)
    assert np.isfinite(qw.scale).all() and (qw.dequantize() == 0).all()
    qs = quantize_weight(np.zeros((3, 32), np.float32), 8, None, symmetric=True)
    assert np.isfinite(qs.scale).all() and (qs.dequantize() == 0).all()
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(np.zeros((2, 3, 4), np.float32), 8)
    with pytest.raises(ValueError, match="clip"):
        quantize_weight(np.zeros((2, 4), np.float32), 8, clip="percentile")


def test_relative_error_and_sqnr():
    w = _w(4, 32)
    qw = quantize_weight(w, 8)
    assert 0 < relative_error(w, qw) < 0.01
    assert relative_error(np.zeros_like(w), quantize_weight(np.zeros_like(w), 8)) == 0.0
    assert sqnr_db(1.0, 0.01) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.0) == float("inf")
    assert sqnr_db(0.0, 1.0) == float("-inf")


# ----------------------------------------------------------------------------- pack_uint4

def test_pack_uint4_known_values():
    packed = pack_uint4(np.array([1, 2, 3, 4], np.uint8))
    assert packed.dtype == np.uint8
    assert packed.tolist() == [0x21, 0x43]  # low nibble first
    assert pack_uint4(np.array([15, 0, 0, 15], np.uint8)).tolist() == [0x0F, 0xF0]


def test_pack_uint4_odd_length_pads_with_zero():
    assert pack_uint4(np.array([[1, 2, 3], [4, 5, 6]], np.uint8)).tolist() == [[0x21, 0x03],
                                                                               [0x54, 0x06]]


def test_pack_uint4_roundtrip():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (5, 7, 32)).astype(np.uint8)
    p = pack_uint4(q)
    assert p.shape == (5, 7, 16)
    lo, hi = p & 0x0F, p >> 4
    unpacked = np.stack([lo, hi], axis=-1).reshape(q.shape)
    assert (unpacked == q).all()


def test_e4m3_weight_grid_and_error():
    """FP8 E4M3 per channel: s_n = max|w_n| / 448, the codes are E4M3 values (the row maximum
    exactly +-448), and every normal weight is within half a step (2^-4 relative) of its code."""
    import ml_dtypes

    from lbcc.numerics import E4M3_MAX, quantize_weight_e4m3, relative_error

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 200)) * rng.uniform(0.01, 3, (16, 1))).astype(np.float32)
    w[3] = 0  # an all-zero row: scale 1, codes 0
    qw = quantize_weight_e4m3(w)
    assert qw.q.dtype == ml_dtypes.float8_e4m3fn and qw.format == "e4m3"
    np.testing.assert_array_equal(qw.scale[:, 0][[0, 3]],
                                  [np.abs(w[0]).max() / E4M3_MAX, 1.0])
    assert np.abs(qw.q.astype(np.float32)).max(1)[0] == E4M3_MAX
    v = w / qw.scale
    normal = np.abs(v) >= 2 ** -6
    err = np.abs(qw.q.astype(np.float32) - v)[normal] / np.abs(v)[normal]
    assert err.max() <= 2 ** -4 + 1e-7
    assert relative_error(w, qw) < 0.03


def test_e4m3_per_token_beats_int8_on_outlier_channels():
    """With a few massive channels (the LLM activation outliers) the token's maximum sets the
    step: int8 per token rounds the ordinary channels to a handful of levels, E4M3's floating
    grid keeps 3 mantissa bits for them. Output SQNR of x @ W, E4M3 against int8 per token."""
    from lbcc.numerics import fake_quant_e4m3_per_token, token_sqnr_db
    from lbcc.passes.precision import fake_quant_per_token

    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    w = rng.standard_normal((256, 128)).astype(np.float32)
    ref = x @ w
    plain = (token_sqnr_db(ref, fake_quant_e4m3_per_token(x) @ w),
             token_sqnr_db(ref, fake_quant_per_token(x) @ w))
    x[:, [5, 77, 200]] *= 300.0
    ref = x @ w
    outliers = (token_sqnr_db(ref, fake_quant_e4m3_per_token(x) @ w),
                token_sqnr_db(ref, fake_quant_per_token(x) @ w))
    assert plain[1] > plain[0]  # Gaussian tokens: int8's uniform grid is finer
    assert outliers[0] > outliers[1] + 3  # outlier channels: E4M3 wins by > 3 dB
