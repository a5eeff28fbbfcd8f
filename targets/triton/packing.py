"""The packed weight layout of the ``triton`` target, in numpy (done once, at compile time).

One layout for every shape and every kernel (format version 2, "chunked planes"):

* ``qweight``: int32 ``[N, Kp // E]`` with ``E = 32 // bits`` codes per word. The words of a
  row come in *chunks* of ``CW = 16`` consecutive words that cover ``C = 16 * E`` consecutive
  k (128 for 4-bit, 64 for 8-bit). Word ``i`` of chunk ``c`` (word index ``16 c + i``) holds in
  bits ``[j*bits, (j+1)*bits)`` the unsigned code ``u[n, c*C + 16*j + i]``: bit field ``j`` of
  the chunk's 16 words (its *plane* ``j``) is the run of 16 consecutive k ``c*C + 16 j .. +15``.
  So a thread that holds words ``i .. i+3`` of a chunk needs, for each plane, 4 *consecutive*
  activations (one vector load), a plane of a ``[rows, 16]`` word tile is itself a ``[rows, 16]``
  operand of a K=16 tensor-core product, and a plane never straddles a quantization group
  (groups are 16, 32, ... k long and start at multiples of 16).
* ``Kp`` is K rounded up to a multiple of ``max(group, C)``; the padding codes equal the zero
  point, so the padded weights are exactly 0 (the kernels also mask the activations there).
* ``scales``: float16 ``[N, Kp // group]``; groups that lie wholly in the padding have scale 1.
* ``zeros``: uint8 ``[N, Kp // group]`` (asymmetric only; symmetric weights use the constant zero
  point ``2**(bits-1)``, so no zero tensor is stored or read).

The weight a kernel computes with is ``W[n, k] = (u[n, k] - z[n, k // group]) * s[n, k // group]``,
evaluated as float16 ``(u - z)`` (exact: small integers) times the float16 scale (one rounding),
which :func:`dequantize` reproduces bit for bit.

8-bit W8A8 weights are not packed: int8 ``[N, K]`` and one float32 scale per output channel.
"""

from __future__ import annotations

import numpy as np

CHUNK_WORDS = 16  # words per chunk (per plane: 16 consecutive k)


def codes_per_word(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"packed weights are 4- or 8-bit, not {bits}-bit")
    return 32 // bits


def chunk_k(bits: int) -> int:
    """k values per chunk of 16 words: 128 (4-bit), 64 (8-bit)."""
    return CHUNK_WORDS * codes_per_word(bits)


def padded_k(k: int, group: int, bits: int = 4) -> int:
    step = max(group, chunk_k(bits))
    return -(-k // step) * step


def pack(codes: np.ndarray, bits: int, group: int, pad_code: int | np.ndarray) -> np.ndarray:
    """Unsigned codes ``[N, K]`` (0 .. 2**bits-1) -> int32 words ``[N, Kp // E]``.

    ``pad_code``: the code written into the K padding (the zero point, per row or a scalar).
    """
    e = codes_per_word(bits)
    codes = np.asarray(codes)
    if codes.min(initial=0) < 0 or codes.max(initial=0) >= (1 << bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    n, k = codes.shape
    kp = padded_k(k, group, bits)
    full = np.empty((n, kp), np.uint32)
    full[:, :k] = codes
    if kp > k:
        full[:, k:] = np.broadcast_to(np.asarray(pad_code, np.uint32).reshape(-1, 1), (n, kp - k))
    planes = full.reshape(n, kp // chunk_k(bits), e, CHUNK_WORDS)  # [n, chunk, plane j, word i]
    words = np.zeros((n, kp // chunk_k(bits), CHUNK_WORDS), np.uint32)
    for j in range(e):
        words |= planes[:, :, j, :] << np.uint32(j * bits)
    return words.reshape(n, kp // e).view(np.int32)


def unpack(words: np.ndarray, bits: int, k: int | None = None) -> np.ndarray:
    """int32 words ``[N, Kp // E]`` -> unsigned codes ``[N, k]`` (uint8)."""
    e = codes_per_word(bits)
    w = np.asarray(words).view(np.uint32)
    n = w.shape[0]
    w = w.reshape(n, -1, CHUNK_WORDS)
    mask = np.uint32((1 << bits) - 1)
    codes = np.stack([(w >> np.uint32(j * bits)) & mask for j in range(e)], axis=2)
    codes = codes.reshape(n, -1).astype(np.uint8)  # [n, chunk, plane, word] = natural k order
    return codes if k is None else codes[:, :k]


def pad_groups(scales: np.ndarray, zeros: np.ndarray | None, k: int, bits: int, group: int):
    """Scales / zero points ``[N, ceil(K / group)]`` -> ``[N, Kp // group]``: groups wholly in
    the padding get scale 1 and the last real group's zero point (the padding's code)."""
    g = padded_k(k, group, bits) // group
    extra = g - scales.shape[1]
    if extra <= 0:
        return scales, zeros
    scales = np.concatenate([scales, np.ones((scales.shape[0], extra), scales.dtype)], 1)
    if zeros is not None:
        zeros = np.concatenate([zeros, np.repeat(zeros[:, -1:], extra, 1)], 1)
    return scales, zeros


def quantize_groupwise(w: np.ndarray, bits: int, group: int, symmetric: bool):
    """Round-to-nearest group-wise quantization of float ``w [N, K]`` (for tests and benchmarks).

    Symmetric: ``s = max|w| / (2**(bits-1) - 1)``, ``u = clip(round(w/s) + 2**(bits-1))``;
    asymmetric: ``s = (max - min) / (2**bits - 1)``, ``z = clip(round(-min/s))``,
    ``u = clip(round(w/s) + z)``. Returns ``(codes uint8 [N,K], scales f16 [N,G], zeros u8 [N,G])``
    with ``G = Kp // group`` (see :func:`padded_k`; groups wholly in the padding: scale 1, zero
    point as the last real group's); the scales are rounded to float16 before the codes are
    computed.
    """
    n, k = w.shape
    kg = -(-k // group) * group
    wp = np.zeros((n, kg), np.float32)
    wp[:, :k] = w
    g = wp.reshape(n, kg // group, group)
    qmax = (1 << bits) - 1
    if symmetric:
        zero = np.full(g.shape[:2], 1 << (bits - 1), np.float32)
        s = np.abs(g).max(-1) / ((1 << (bits - 1)) - 1)
    else:
        lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
        s = (hi - lo) / qmax
    s = np.where(s == 0, 1.0, s).astype(np.float16)
    sf = s.astype(np.float32)
    if not symmetric:
        zero = np.clip(np.round(-lo / sf), 0, qmax)
    u = np.clip(np.round(g / sf[..., None]) + zero[..., None], 0, qmax)
    codes = u.reshape(n, kg)[:, :k].astype(np.uint8)
    s, z = pad_groups(s, zero.astype(np.uint8), k, bits, group)
    return codes, s, z


def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int,
               group: int) -> np.ndarray:
    """float16 ``W = (u - z) * s`` exactly as the kernels form it (see the module docstring)."""
    n, k = codes.shape
    gidx = np.arange(k) // group
    z = (np.float16(1 << (bits - 1)) if zeros is None
         else zeros.astype(np.float16)[:, gidx])
    return (codes.astype(np.float16) - z) * scales.astype(np.float16)[:, gidx]
