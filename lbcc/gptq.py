"""GPTQ (Frantar et al., 2023): second-order weight rounding, on numpy.

For one linear layer with out-major weight ``W[N, K]`` and inputs ``X[n, K]``, GPTQ minimizes
``||W X^T - Q X^T||^2`` column by column: with ``H = 2 X^T X / n`` (damped by
``percdamp * mean(diag H)``) and ``U`` the upper Cholesky factor of ``H^-1``, each column ``k`` is
rounded, ``q_k = quant(w_k)``, and its error is spread over the columns not yet rounded,
``W[:, j] -= (w_k - q_k) / U[k, k] * U[k, j]`` for ``j > k``. Updates are applied lazily per block
of ``block_size`` columns (the block's error times the corresponding rows of ``U`` in one matrix
product). With ``act_order`` columns are processed by decreasing ``diag(H)``; group quantizers are
computed on the original contiguous groups before the loop ("static groups"), so the stored layout
is the usual one and no permutation has to be kept at run time. Any K works: the last group may be
shorter. ``fmt="e4m3"`` rounds each column to the FP8 E4M3 grid of its row instead
(``q = s e4m3(w / s)``, ``s = max|w_n| / 448`` per output channel): the error feedback is the
same, only the quantizer differs.
"""

from __future__ import annotations

import numpy as np

from lbcc.numerics import QuantizedWeight, quantize_weight, quantize_weight_e4m3, to_e4m3


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, bits: int, group_size: int | None,
                  symmetric: bool, percdamp: float = 0.01, block_size: int = 128,
                  act_order: bool = True, clip: str = "mse", fmt: str = "int") -> QuantizedWeight:
    """Round ``w[N, K]`` with GPTQ given ``hessian[K, K]`` (proportional to X^T X).

    ``clip="mse"`` chooses each group's grid (scale, zero point) first by the clip-ratio search
    of :func:`lbcc.numerics.quantize_weight`, weighted by diag(H) = the inputs' mean squares;
    ``"output"`` by the output error d^T H_g d (AWQ's clip search); ``"none"`` uses the plain
    min/max grid of the paper.
    """
    w = np.array(w, dtype=np.float64)
    n, k = w.shape
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    gs = k if group_size is None else int(group_size)
    # quantization grid per (row, group), from the original weights (static groups)
    if fmt == "e4m3":
        gs = k
        grid = quantize_weight_e4m3(w.astype(np.float32))
    else:
        grid = quantize_weight(w.astype(np.float32), bits=bits, block_size=gs,
                               symmetric=symmetric, clip=clip,
                               importance=np.diag(h).astype(np.float32),
                               hessian=h if clip == "output" else None)
    scale = grid.scale.astype(np.float64)
    zero = grid.zero_point.astype(np.float64) if grid.zero_point is not None else None
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)

    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w = w[:, perm]
    h = h[np.ix_(perm, perm)]
    group_of = perm // gs  # group (in the stored order) of each processed column

    h[np.diag_indices(k)] += percdamp * float(np.mean(np.diag(h)))
    try:
        hinv = np.linalg.inv(np.linalg.cholesky(h))  # L^-1
    except np.linalg.LinAlgError:
        h[np.diag_indices(k)] += float(np.mean(np.diag(h)))
        hinv = np.linalg.inv(np.linalg.cholesky(h))
    u = np.linalg.cholesky(hinv.T @ hinv).T  # upper Cholesky factor of H^-1

    q_int = np.zeros((n, k), dtype=np.float32 if fmt == "e4m3" else np.int32)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            g = group_of[i1 + i]
            s = scale[:, g]
            if fmt == "e4m3":
                q = to_e4m3(col / s).astype(np.float64)
                deq = q * s
            elif zero is None:
                q = np.clip(np.rint(col / s), qmin, qmax)
                deq = q * s
            else:
                z = zero[:, g]
                q = np.clip(np.rint(col / s) + z, qmin, qmax)
                deq = (q - z) * s
            q_int[:, i1 + i] = q
            e = (col - deq) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    inv = np.argsort(perm)
    q_int = q_int[:, inv]
    if fmt == "e4m3":
        return QuantizedWeight(q=to_e4m3(q_int), scale=grid.scale, zero_point=None, bits=8,
                               block_size=k, symmetric=True, format="e4m3")
    dtype = np.int8 if symmetric else np.uint8
    return QuantizedWeight(q=q_int.astype(dtype), scale=grid.scale, zero_point=grid.zero_point,
                           bits=bits, block_size=gs, symmetric=symmetric)
