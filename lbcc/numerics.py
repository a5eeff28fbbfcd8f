"""Integer quantization numerics on numpy arrays (no IR here).

Weights are handled out-major: ``w[N, K]`` with N output channels and K the reduction axis
(a MatMul weight ``B[K, N]`` is passed as ``B.T``). Groups are blocks of ``block_size`` along K;
per-channel is one block per row.

Symmetric:   q = clamp(round(w / s), -2^(b-1), 2^(b-1)-1),  s = r * max|w_g| / (2^(b-1)-1)
Asymmetric:  q = clamp(round(w / s) + z, 0, 2^b-1),  s = r * (max(w_g,0) - min(w_g,0)) / (2^b-1),
             z = round(-r * min(w_g,0) / s)
FP8 E4M3 (OCP ``float8_e4m3fn``: 4 exponent bits, 3 mantissa bits, largest finite 448), symmetric
per output channel: s_n = max_k |w_nk| / 448, q = e4m3(w / s) rounded to nearest even (a
floating-point grid: relative step 2^-3 in each binade, subnormals below 2^-6). Activations use
the same grid per token at run time (:func:`fake_quant_e4m3_per_token`).
The clip ratio r is 1 for plain round-to-nearest, or chosen per group from a grid to minimize
- ``clip="mse"``: the (importance-weighted) reconstruction error  sum_k h_k (w_k - dq(q_k))^2,
  where h_k is E[x_k^2] of the layer's input when calibration statistics exist and 1 otherwise;
- ``clip="output"``: the layer's output error on the calibration inputs (AWQ's clipping search,
  Lin et al. 2024), for output channel n and group g with d = w_ng - dq(q_ng):
  ||X_g d||^2 = d^T (X_g^T X_g) d, using the diagonal block of H = X^T X for that group.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

#: clip ratios searched per group: 4-bit grids are coarse enough that clipping pays off far from
#: 1; at 8 bits the optimum is always close to 1, so a short grid gives the same choice faster
CLIP_GRID = {4: np.linspace(1.0, 0.55, 19, dtype=np.float32),
             7: np.linspace(1.0, 0.8, 5, dtype=np.float32),
             8: np.linspace(1.0, 0.8, 5, dtype=np.float32)}


@dataclasses.dataclass
class QuantizedWeight:
    """Integer weight ``q[N, K]`` with per-block ``scale[N, nb]`` and optional ``zero_point``."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    bits: int
    block_size: int  # == K for per-channel
    symmetric: bool
    #: "int" (integer codes) or "e4m3" (``q`` holds float8_e4m3fn values)
    format: str = "int"

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape  # type: ignore[return-value]

    def dequantize(self) -> np.ndarray:
        n, k = self.q.shape
        s = np.repeat(self.scale, self.block_size, axis=1)[:, :k]
        q = self.q.astype(np.float32)
        if self.zero_point is not None:
            q = q - np.repeat(self.zero_point, self.block_size, axis=1)[:, :k].astype(np.float32)
        return q * s


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    n, k = w.shape
    nb = -(-k // block_size)
    pad = nb * block_size - k
    if pad:
        w = np.pad(w, ((0, 0), (0, pad)))
    return w.reshape(n, nb, block_size)


def _quantize_blocks(wb: np.ndarray, bits: int, symmetric: bool, ratio: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """wb[N, nb, B], ratio broadcastable to [N, nb] -> (q, scale[N, nb], zp[N, nb] or None)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = np.abs(wb).max(axis=-1) * ratio
        scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
        q = np.clip(np.rint(wb / scale[..., None]), -qmax - 1, qmax)
        return q, scale, None
    qmax = 2**bits - 1
    lo = np.minimum(wb.min(axis=-1), 0.0) * ratio
    hi = np.maximum(wb.max(axis=-1), 0.0) * ratio
    scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale), 0, qmax)
    q = np.clip(np.rint(wb / scale[..., None]) + zp[..., None], 0, qmax)
    return q, scale, zp


def _hessian_blocks(hessian: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """The diagonal ``[B, B]`` blocks of ``hessian[K, K]`` as ``[nb, B, B]`` (last one padded)."""
    nb = -(-k // block_size)
    out = np.zeros((nb, block_size, block_size), np.float32)
    for b in range(nb):
        lo, hi = b * block_size, min((b + 1) * block_size, k)
        out[b, : hi - lo, : hi - lo] = hessian[lo:hi, lo:hi]
    return out


def quantize_weight(w: np.ndarray, bits: int, block_size: int | None = None,
                    symmetric: bool = True, clip: str = "none",
                    importance: np.ndarray | None = None,
                    hessian: np.ndarray | None = None) -> QuantizedWeight:
    """Quantize ``w[N, K]`` per channel (``block_size=None``) or per block of K.

    ``clip="mse"`` searches the clip ratio per block on :data:`CLIP_GRID`, minimizing the
    importance-weighted squared error; ``importance[K]`` defaults to ones. ``clip="output"``
    minimizes the output error ``d^T H_g d`` with ``hessian[K, K]`` (proportional to X^T X).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    n, k = w.shape
    bs = k if block_size is None else int(block_size)
    wb = _blocks(w, bs)
    if clip == "output" and hessian is None:
        raise ValueError("clip='output' needs the inputs' hessian (X^T X)")
    if clip in ("mse", "output"):
        if clip == "output":
            hblocks = _hessian_blocks(np.asarray(hessian, np.float32), k, bs)
        else:
            h = np.ones(k, np.float32) if importance is None else np.asarray(importance, np.float32)
            hb = _blocks(h[None, :], bs)[0]  # [nb, B]; padding has zero importance
        best_err = np.full(wb.shape[:2], np.inf, dtype=np.float32)
        best_ratio = np.ones(wb.shape[:2], dtype=np.float32)
        for r in CLIP_GRID.get(bits, CLIP_GRID[4]):
            q, s, z = _quantize_blocks(wb, bits, symmetric, r)
            deq = (q - (z[..., None] if z is not None else 0.0)) * s[..., None]
            if clip == "output":
                d = np.ascontiguousarray((wb - deq).transpose(1, 0, 2), np.float32)  # [nb, N, B]
                err = ((d @ hblocks) * d).sum(axis=-1).T
            else:
                err = (((wb - deq) ** 2) * hb[None]).sum(axis=-1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_ratio = np.where(better, r, best_ratio)
        q, scale, zp = _quantize_blocks(wb, bits, symmetric, best_ratio)
    elif clip == "none":
        q, scale, zp = _quantize_blocks(wb, bits, symmetric, np.float32(1.0))
    else:
        raise ValueError(f"unknown clip method {clip!r} (use 'none', 'mse' or 'output')")
    q = q.reshape(n, -1)[:, :k]
    int_dtype = np.int8 if symmetric else np.uint8
    return QuantizedWeight(q=q.astype(int_dtype), scale=scale.astype(np.float32),
                           zero_point=None if zp is None else zp.astype(int_dtype), bits=bits,
                           block_size=bs, symmetric=symmetric)


#: the largest finite float8_e4m3fn value
E4M3_MAX = 448.0
#: weight formats: integer codes, or FP8 E4M3 values (8 bits, per-channel scales)
WEIGHT_FORMATS = ("int", "e4m3")


def to_e4m3(v: np.ndarray) -> np.ndarray:
    """``v`` rounded to the nearest float8_e4m3fn (ties to even), saturated at +-448."""
    return np.clip(np.asarray(v, np.float32), -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)


def quantize_weight_e4m3(w: np.ndarray) -> QuantizedWeight:
    """``w[N, K]`` to FP8 E4M3 per output channel: s_n = max_k |w_nk| / 448, q = e4m3(w / s).

    The grid is floating point, so the largest value of a row sets only the exponent range: a
    small weight keeps 3 mantissa bits of relative precision (down to 2^-9 s_n). No clip search:
    clipping the largest weights gains no resolution for the others, as it does on an
    integer grid.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    amax = np.abs(w).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)
    return QuantizedWeight(q=to_e4m3(w / scale), scale=scale, zero_point=None, bits=8,
                           block_size=w.shape[1], symmetric=True, format="e4m3")


def fake_quant_e4m3_per_token(x: np.ndarray) -> np.ndarray:
    """FP8 E4M3 per row (token): s_t = max_k |x_tk| / 448, x_tk -> s_t e4m3(x_tk / s_t)."""
    s = np.abs(x).max(axis=-1, keepdims=True) / E4M3_MAX
    s = np.where(s > 0, s, 1.0).astype(np.float32)
    return to_e4m3(x / s).astype(np.float32) * s


def relative_error(w: np.ndarray, qw: QuantizedWeight) -> float:
    """||w - dq(q)||_F / ||w||_F."""
    denom = float(np.linalg.norm(w))
    return float(np.linalg.norm(w - qw.dequantize())) / denom if denom else 0.0


def pack_uint4(q: np.ndarray) -> np.ndarray:
    """Pack uint4 values (0..15) pairwise along the last axis, low nibble first."""
    q = q.astype(np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (q[..., 0::2] & 0x0F) | ((q[..., 1::2] & 0x0F) << 4)


def sqnr_db(signal_power: float, noise_power: float) -> float:
    if noise_power <= 0:
        return float("inf")
    if signal_power <= 0:
        return float("-inf")
    return float(10.0 * np.log10(signal_power / noise_power))


def token_sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """SQNR with every row (token) weighted equally: ``-10 log10 mean_t ||e_t||^2 / ||r_t||^2``.

    A global ratio ``sum ||r||^2 / sum ||e||^2`` is set by the rows of largest energy: with an
    LLM's massive activations (a few tokens hundreds of times larger than the rest) a range that
    fits those tokens and rounds every other token to zero still scores well. Perplexity counts
    every token once, so this does too; all-zero reference rows are left out.
    """
    r = (np.asarray(ref, np.float64) ** 2).sum(axis=-1).reshape(-1)
    e = (np.asarray(ref, np.float64) - got) ** 2
    e = e.sum(axis=-1).reshape(-1)
    keep = r > 0
    if not keep.any():
        return float("inf")
    rel = float((e[keep] / r[keep]).mean())
    return float("inf") if rel <= 0 else float(-10.0 * np.log10(rel))
