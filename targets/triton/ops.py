"""torch entry points for the kernels, and the autotuner that picks a kernel and its tile sizes.

``wq_linear`` (W4A16 / W8A16), ``quant_rows`` + ``w8a8_linear`` (W8A8), ``dequantize``.
The tuner times a small set of candidates per (GPU, op, M bucket, N, K, bits, group) on the
first call with real inputs, as CUDA-graph replays over copies of the weights that exceed L2
(never while a CUDA graph is being captured: then the default is used) and keeps the winner in a JSON file (``$LBCC_TRITON_CACHE`` or
``~/.cache/lbcc/triton-tune.json``). On the CPU (``TRITON_INTERPRET=1``) the defaults are used.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import triton

# lbcc:strip-begin
from . import kernels as K
# lbcc:strip-end

# ---------------------------------------------------------------------------------------------
# candidate configurations


def _gemv(bn, ch, sk, nw, ns=1, pf=True, h2=False, km=False):
    """A GEMV config. h2: float16-pair arithmetic (4-bit, groups of whole chunks). km: the tile
    chunk-major (``[CHUNKS, BLOCK_N, 16]``), so that a thread holds several rows of the same
    chunk and reads each activation pair once for all of them; with h2, a thread's 4 words of
    a chunk also accumulate in float16 pairs before one conversion to float32 (ACC = 4,
    :func:`kernels._dot_h2_acc`)."""
    c = {"kind": "gemv", "BLOCK_N": bn, "CHUNKS": ch, "SPLIT_K": sk, "num_warps": nw,
         "num_stages": ns, "PREFETCH": pf}
    if h2:
        c["HALF2"] = True
    if km:
        c["KMAJOR"] = True
        if h2:
            c["ACC"] = 4
    return c


def _mm(bm, bn, sk, nw, ns, gm=8, swap=False, cat=False):
    return {"kind": "mm", "BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": sk, "GROUP_M": gm,
            "SWAP": swap, "CAT": cat, "num_warps": nw, "num_stages": ns}


def _nat(bm, bn, sk, nw, ns, gm=8, swap=False, h2=False, maxnreg=None):
    """The natural-order tiled kernel (:func:`kernels._wq_mm_nat_kernel`); h2: float16-pair
    dequantization (4-bit, groups of whole chunks); maxnreg: a register cap (so that two
    programs fit on one SM: one dequantizes while the other's tensor-core product runs)."""
    c = {"kind": "nat", "BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": sk, "GROUP_M": gm,
         "SWAP": swap, "H2": h2, "num_warps": nw, "num_stages": ns}
    if maxnreg:
        c["maxnreg"] = maxnreg
    return c


def _dqmm(bn=8, bk=1024, nw=4):
    """Dequantize (natural order, :func:`kernels._dequant_nat_kernel`) then cuBLAS."""
    return {"kind": "dequant+cublas", "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw}


# GEMV (M = 1 .. 16): a program holds BLOCK_N rows x CHUNKS chunks of 16 words a step (each row
# 64 * CHUNKS contiguous bytes a step), whole rows of K unless SPLIT_K > 1 (then float16 atomic
# adds into a zeroed output: an extra memset). A thread's activations serve every row it holds
# (BLOCK_N * CHUNKS * 16 / (32 * num_warps) words a thread: 8 or 16 here); PREFETCH keeps the
# next step's words (PREFETCH=2: the next two steps') in flight during this step's arithmetic.
# On sm_90+ every GEMV candidate is also timed with programmatic dependent launch (PDL) at
# M <= 2 (decode).
GEMV_CONFIGS = [_gemv(bn, ch, sk, nw, pf=pf) for bn, ch, sk, nw, pf in (
    (16, 4, 1, 2, True), (16, 4, 1, 2, False), (16, 8, 1, 4, True), (16, 8, 1, 4, False),
    (32, 4, 1, 4, True), (32, 4, 1, 4, False), (32, 8, 1, 8, True), (8, 8, 1, 2, True),
    (8, 4, 1, 2, True), (16, 4, 1, 4, True), (8, 8, 1, 4, True), (4, 8, 1, 4, True),
    (32, 4, 2, 4, True), (32, 8, 2, 8, True), (16, 8, 2, 4, True), (16, 4, 2, 2, True),
    (64, 4, 4, 8, True), (32, 4, 4, 4, True), (16, 4, 4, 2, True),
    # whole short rows in one or two steps (K = 2048 .. 4096: every load issued at once)
    (2, 32, 1, 4, True), (4, 16, 1, 4, True), (2, 16, 1, 2, True), (8, 16, 1, 8, True),
    # small N, long K (down_proj 2048 x 8192): more programs by splitting K
    (8, 8, 4, 2, True), (8, 8, 2, 2, True), (16, 8, 4, 4, True), (4, 8, 4, 4, True),
    # rows of an odd number of chunks (K = 576: 5 chunks) take one chunk a step
    (8, 1, 1, 2, True), (16, 1, 1, 2, True), (32, 1, 1, 2, True), (64, 1, 1, 4, True))] + [
    # float16-pair arithmetic (4-bit, groups of whole chunks), chunk-major tiles: ~2.4 instead
    # of ~4 instructions per weight, and the activation pairs read once for all of a thread's
    # rows (H200, M = 1: 13.5 -> 10.9 µs at 8192 x 8192 against the row-major float16-pair tile)
    _gemv(bn, ch, sk, nw, h2=True, km=True) for bn, ch, sk, nw in (
        (32, 8, 1, 8), (16, 4, 1, 4), (4, 16, 1, 4), (32, 4, 4, 4), (16, 4, 1, 2), (32, 4, 1, 4),
        (8, 8, 1, 2), (32, 8, 2, 8), (8, 8, 1, 4), (16, 8, 1, 4), (8, 16, 1, 4), (16, 8, 1, 8),
        (4, 8, 1, 2), (8, 4, 1, 2), (16, 8, 2, 4), (8, 8, 2, 2),
        # 512-thread programs, whole short rows (H200 exploration: best at 8192 x 8192)
        (32, 8, 1, 16), (16, 16, 1, 8), (4, 32, 1, 4))] + [
    # two steps of loads in flight
    _gemv(bn, ch, sk, nw, pf=2, h2=True, km=True) for bn, ch, sk, nw in (
        (32, 8, 1, 16), (16, 8, 1, 8), (8, 16, 1, 4), (8, 8, 1, 2), (16, 4, 1, 4), (8, 4, 1, 2),
        (16, 8, 1, 2),
        # one warp a program: no barriers for the activations' layout change (H200: best at
        # 14336 x 4096 in two runs, 10.3-10.5 µs)
        (8, 4, 1, 1))]
SMALL_MM_CONFIGS = ([_mm(16, bn, sk, nw, ns, swap=sw)
                     for bn in (64, 128) for sk in (1, 2, 4) for sw in (False, True)
                     for nw, ns in ((4, 3),)]
                    + [_mm(16, bn, 4, 4, 3, swap=sw, cat=True)
                       for bn, sw in ((64, False), (128, False), (128, True))])
LARGE_MM_CONFIGS = ([_mm(bm, bn, sk, nw, ns, swap=sw)
                     for bm, bn, sk, nw, ns, sw in (
                         (64, 64, 1, 4, 4, False), (64, 128, 1, 4, 4, False),
                         (128, 64, 1, 4, 4, False), (128, 128, 1, 8, 3, False),
                         (128, 128, 1, 4, 4, False), (128, 256, 1, 8, 3, False),
                         (256, 128, 1, 8, 3, False), (64, 64, 2, 4, 4, False),
                         (64, 128, 2, 4, 4, False), (64, 128, 1, 4, 4, True),
                         (128, 128, 1, 8, 3, True), (128, 128, 2, 8, 3, True),
                         (64, 128, 2, 4, 4, True),
                         # M ~ 128: one row-tile, so N / BLOCK_N * SPLIT_K programs (>= 132)
                         (128, 64, 4, 4, 4, True), (128, 64, 2, 4, 4, True),
                         (128, 128, 4, 8, 3, True), (64, 64, 4, 4, 4, False),
                         (128, 64, 4, 4, 3, False))]
                    + [_mm(bm, bn, sk, nw, ns, swap=sw, cat=True)
                       for bm, bn, sk, nw, ns, sw in (
                           (128, 128, 4, 8, 3, True), (128, 128, 2, 8, 3, False),
                           (128, 64, 4, 4, 4, True), (128, 256, 1, 8, 3, False),
                           (64, 128, 2, 4, 4, False))]
                    # natural-order tiles, one K = C product a step (M ~ 128: one row tile
                    # and split-K; large M: large tiles), float16-pair dequantization
                    + [_nat(bm, bn, sk, nw, ns, swap=sw, h2=h2)
                       for bm, bn, sk, nw, ns, sw, h2 in (
                           (128, 128, 4, 8, 3, False, True), (128, 128, 2, 8, 3, False, True),
                           (128, 128, 4, 8, 4, False, True), (128, 128, 4, 8, 3, False, False),
                           (128, 256, 4, 8, 3, False, True), (128, 256, 2, 8, 3, False, True),
                           (64, 128, 4, 4, 4, False, True), (64, 128, 2, 4, 4, False, True),
                           (128, 64, 4, 4, 4, False, True), (64, 256, 4, 8, 3, False, True),
                           (128, 128, 4, 8, 3, True, True), (128, 128, 1, 8, 3, False, True),
                           (128, 256, 1, 8, 3, False, True),
                           (128, 128, 1, 8, 4, False, True))]
                    # two programs an SM (shared memory of 2 stages, registers capped): one
                    # dequantizes while the other's product runs
                    + [_nat(128, 128, sk, 8, 2, h2=True, maxnreg=128) for sk in (2, 4, 8)]
                    # dequantize (natural order, long row tiles) then cuBLAS
                    + [_dqmm(bn, bk, nw) for bn, bk, nw in (
                        (8, 1024, 4), (4, 2048, 4), (8, 2048, 8), (16, 1024, 8), (64, 128, 4))])
W8A8_CONFIGS = [{"kind": "w8a8", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                 "num_warps": nw, "num_stages": ns}
                for bm, bn, bk, nw, ns in ((16, 64, 128, 4, 4), (64, 64, 128, 4, 4),
                                           (64, 128, 128, 4, 4), (128, 128, 128, 8, 3),
                                           (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                                           (128, 128, 64, 4, 4), (128, 256, 64, 8, 4),
                                           (128, 256, 128, 8, 4), (256, 128, 128, 8, 4))]

# FP8 runs only tiles whose BLOCK_K divides K (no masked float8 loads): shorter K steps for
# hidden sizes that are multiples of 32 or 64 but not of 128 (576, 960, 1088, ...)
FP8_CONFIGS = W8A8_CONFIGS + [
    {"kind": "w8a8", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": nw,
     "num_stages": ns}
    for bm, bn, bk, nw, ns in ((16, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                               (128, 128, 64, 8, 4), (16, 64, 32, 4, 4), (64, 64, 32, 4, 4),
                               (128, 128, 32, 8, 4),
                               # promoted accumulation: longer products between promotions
                               (64, 128, 256, 4, 3), (128, 128, 256, 8, 3), (64, 256, 128, 8, 3))]
#: FP8 products accumulate in float32 on the CUDA cores every BLOCK_K (PROMOTE, the accurate
#: default, as cuBLAS without use_fast_accum); LBCC_TRITON_FP8_FAST_ACCUM=1 keeps the whole sum in
#: the tensor cores' reduced-precision accumulator: faster at large M, 1.3e-3..2.9e-3 relative
#: error at K = 4096..14336 instead of 2.4e-4 (H200)
FP8_FAST_ACCUM = os.environ.get("LBCC_TRITON_FP8_FAST_ACCUM", "0") == "1"

#: W8A8 / FP8 decode (M <= W8A8_GEMV_MAX_M): CUDA-core GEMV tiles; a step may run past K
#: (masked), so that short rows (K = 576: SmolLM2) take one or two steps, all loads in flight
W8A8_GEMV_CONFIGS = [{"kind": "w8a8-gemv", "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw,
                      "num_stages": 1, "PREFETCH": pf}
                     for bn, bk, nw in ((16, 512, 4), (32, 256, 4), (8, 1024, 4), (8, 512, 2),
                                        (64, 128, 4), (32, 512, 8), (16, 256, 2), (4, 1024, 4),
                                        (16, 128, 2), (8, 256, 1), (4, 512, 1), (8, 64, 1),
                                        (4, 1024, 2), (2, 1024, 1), (16, 1024, 8))
                     for pf in (True, False)]
W8A8_GEMV_MAX_M = 4


def scaled_mm_config(fast: bool) -> dict:
    """FP8 through cuBLASLt (``torch._scaled_mm``: E4M3 x E4M3, row-wise float32 scales, float16
    out; ``FAST``: its ``use_fast_accum``); bias, GLU and residual then in torch. A tuning
    candidate beside the Triton tiles for M > :data:`W8A8_GEMV_MAX_M` (H200, M = 2048: 1.61-1.70x
    fp16 against 1.21-1.32x for the promoted Triton tiles)."""
    return {"kind": "scaled-mm", "FAST": fast}


def scaled_mm_supported(device: torch.device, n: int, k: int) -> bool:
    """cuBLASLt FP8 products: CUDA compute capability 8.9 or newer, a torch with
    ``_scaled_mm``, N and K multiples of 16 (its layout rule); never under the interpreter."""
    if _INTERPRET or device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    if n % 16 or k % 16:
        return False
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _FP8_MM:
        _FP8_MM[i] = torch.cuda.get_device_capability(i) >= (8, 9)
    return _FP8_MM[i]


_FP8_MM: dict = {}

DEFAULT_GEMV = _gemv(8, 1, 1, 4)
DEFAULT_SMALL_MM = _mm(16, 64, 1, 4, 3)
DEFAULT_LARGE_MM = _mm(64, 64, 1, 4, 3)
DEFAULT_W8A8 = W8A8_CONFIGS[1]


# Part of every tuning-table key: entries written for other kernels (other config fields) are
# never read back. 2: the chunked-plane layout's GEMV / tiled configs (CHUNKS, SWAP, CAT, ...);
# 3: natural-order tiles (kind nat) and tiled dequantization (dequant+cublas fields); 4: GEMVs
# with programmatic dependent launch (PDL) and two steps of prefetch (PREFETCH=2); 5: chunk-major
# float16-pair GEMVs (KMAJOR, ACC); 6: FP8 tables that may hold cuBLASLt (kind scaled-mm), and
# the W8A8 / FP8 decode GEMVs that quantize their input (keys w8a8q / fp8q; W4A16 keys ending
# in "norm": GEMVs that normalize their input, new keys).
TUNE_VERSION = 6

#: threads that compile a key's candidates before they are timed (``$LBCC_TRITON_COMPILE_THREADS``;
#: 1 compiles each on its first timed call). Triton releases the GIL for much of a compile (not for
#: its Python code generation): with 16 threads the first tuning of 8192 x 8192 at M = 2048 took
#: 18 s instead of 47 s on the H200 machine, a small M = 1 key 7.0 s instead of 10.2 s.
COMPILE_THREADS = int(os.environ.get("LBCC_TRITON_COMPILE_THREADS", "0")) or min(
    16, os.cpu_count() or 1)

#: candidate kinds whose first call tunes the op they wrap (the norm kernel + ``wq_linear``, the
#: quantization + ``w8a8_linear``): never run beside other threads, whose launches would break
#: that tuning's graph capture
_WRAPPING_KINDS = frozenset({"norm+wq", "quant+w8a8"})


def m_bucket(m: int) -> int:
    """M rounded up to a power of two (at most 4096): tuning is per bucket, not per M."""
    return min(1 << max(0, (m - 1).bit_length()), 4096)


# ---------------------------------------------------------------------------------------------
# the tuner


class Tuner:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path or os.environ.get("LBCC_TRITON_CACHE")
                         or Path.home() / ".cache" / "lbcc" / "triton-tune.json")
        self._lock = threading.Lock()
        self._table: dict[str, dict] | None = None
        self.enabled = os.environ.get("LBCC_TRITON_TUNE", "1") != "0"
        self.trials: dict[str, list] = {}  # key -> [(µs, config)] of the last tuning (reports)
        self.seconds: dict[str, dict] = {}  # key -> {"compile": s, "time": s} of its tuning

    def _load(self) -> dict[str, dict]:
        if self._table is None:
            try:
                self._table = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._table = {}
        return self._table

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(self._table, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only home: keep the table in memory only

    def pick(self, key: tuple, device: torch.device, candidates: list[dict], default: dict,
             make_fns) -> dict:
        """The fastest of ``candidates`` for ``key``; cached in memory and on disk.

        ``make_fns()`` returns ``(fns_for, n)``: ``fns_for(cfg)`` gives callables that each run
        the op once with ``cfg`` on one of several copies of the weights (so the timing does not
        read them from L2); each candidate is timed as CUDA-graph replays of those calls.
        """
        if device.type != "cuda" or not self.enabled:
            return default
        full = "|".join([_device_name(device), *map(str, key), f"v{TUNE_VERSION}"])
        table = self._load()
        if full in table:
            return table[full]
        if torch.cuda.is_current_stream_capturing():
            return default
        if default not in candidates:
            candidates = [*candidates, default]  # (always timed: a finite entry in the table)
        fns_for = make_fns()
        t0 = time.perf_counter()
        precompile(fns_for, candidates)
        t1 = time.perf_counter()
        best, best_t = default, float("inf")
        trials = self.trials.setdefault(full, [])
        for cfg in candidates:
            try:
                t = graph_time_us(fns_for(cfg))
            except Exception as e:  # a config the compiler rejects (shared memory, registers)
                torch.cuda.synchronize()
                trials.append((None, cfg, f"{type(e).__name__}: {str(e)[:120]}"))
                continue
            trials.append((round(t, 2), cfg))
            if t < best_t:
                best, best_t = cfg, t
        self.seconds[full] = {"compile": round(t1 - t0, 2),
                              "time": round(time.perf_counter() - t1, 2)}
        with self._lock:
            table[full] = dict(best, us=round(best_t, 2))
            self._save()
        return table[full]


def precompile(fns_for, candidates: list[dict], threads: int | None = None) -> None:
    """Run each candidate once (its first copy of the weights) from ``threads`` threads, so that
    Triton compiles them in parallel; the timing loop then finds every kernel compiled. A failing
    candidate is left to the timing loop, which records why. Wrapping kinds run later, alone."""
    threads = threads or COMPILE_THREADS
    todo = [c for c in candidates if c.get("kind") not in _WRAPPING_KINDS]
    if threads < 2 or len(todo) < 2:
        return

    def first_call(cfg):
        try:
            fns_for(cfg)[0]()
        except Exception:  # noqa: BLE001 - timed again (and its error kept) by the caller
            pass

    with ThreadPoolExecutor(min(threads, len(todo))) as pool:
        list(pool.map(first_call, todo))
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def capture_graph(fns, calls: int) -> torch.cuda.CUDAGraph:
    """One CUDA graph of ``calls`` launches of ``fns``, cycled (``fns[i % len(fns)]``)."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    return g


def replay_times_us(g: torch.cuda.CUDAGraph, calls: int, replays: int) -> list[float]:
    """µs per launch of each of ``replays`` replays of ``g`` (``calls`` launches a replay):
    CUDA-event time of the replay / ``calls``."""
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return times


def graph_time_us(fns, calls: int | None = None, replays: int = 10) -> float:
    """Median µs per call of ``fns`` (cycled), ``calls`` launches captured in one CUDA graph."""
    for f in fns:  # compile and allocate outside the capture
        f()
    torch.cuda.synchronize()
    calls = calls or max(2 * len(fns), 8)
    g = capture_graph(fns, calls)
    g.replay()
    torch.cuda.synchronize()
    times = sorted(replay_times_us(g, calls, replays))
    return times[len(times) // 2]


def rotation_copies(nbytes: int, device: torch.device) -> int:
    """How many copies of ``nbytes`` of weights exceed 4x the L2 cache (2 .. 32)."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, min(32, -(-4 * l2 // max(nbytes, 1)) + 1))


_NAMES: dict = {}


def _device_name(device: torch.device) -> str:
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _NAMES:
        _NAMES[i] = torch.cuda.get_device_name(i)
    return _NAMES[i]


TUNER = Tuner()


# ---------------------------------------------------------------------------------------------
# weight-only linear (W4A16 / W8A16)


#: the RMSNorm kernel, then :func:`wq_linear` (tuned on its own): a tuning candidate beside
#: the GEMVs that normalize their input
NORM_THEN_WQ = {"kind": "norm+wq"}


def _launch_wq(cfg: dict, x, qw, scales, zeros, bias, bits, group, residual=None,
               glu: bool = False, gamma=None, eps: float = 0.0):
    """``x @ W^T (+ bias)`` by the kernel of ``cfg``, then the epilogue: ``+ residual``, or with
    ``glu`` (W = [G; U]) ``silu(x G^T) * (x U^T)``. GEMVs apply the epilogue inside the kernel;
    the other kinds in torch afterwards. ``gamma``: x is first ``RMSNorm(x) * gamma``, inside
    the GEMV, or by the norm kernel for the other kinds."""
    if gamma is not None and cfg["kind"] == "norm+wq":
        return wq_linear(rms_norm_fused(x, gamma, eps), qw, scales, zeros, bits, group, bias,
                         residual=residual, glu=glu)
    if gamma is not None and cfg["kind"] != "gemv":
        x, gamma = rms_norm_fused(x, gamma, eps), None
    m, k = x.shape
    n, kw = qw.shape
    g = scales.shape[1]
    has_zero, has_bias = zeros is not None, bias is not None
    zp = zeros if has_zero else scales
    bp = bias if has_bias else scales
    even_k = k == kw * (32 // bits)
    kind = cfg["kind"]
    if kind == "gemv":
        n_out = n // 2 if glu else n
        y = (torch.zeros if cfg["SPLIT_K"] > 1 else torch.empty)(
            (m, n_out), dtype=x.dtype, device=x.device)
        pdl = cfg.get("PDL", False) and pdl_supported(x.device)
        grid = (m, triton.cdiv(n_out, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        K._wq_gemv_kernel[grid](x, qw, scales, zp, bp,
                                residual if residual is not None else x, y,
                                gamma if gamma is not None else scales, m, n_out, k, kw, g,
                                x.stride(0), residual.stride(0) if residual is not None else 0,
                                y.stride(0), 150 << 23, eps, HAS_NORM=gamma is not None,
                                BITS=bits, GROUP=group,
                                HAS_ZERO=has_zero, HAS_BIAS=has_bias, BLOCK_N=cfg["BLOCK_N"],
                                CHUNKS=cfg["CHUNKS"], SPLIT_K=cfg["SPLIT_K"], EVEN_K=even_k,
                                PREFETCH=int(cfg.get("PREFETCH", False)),
                                HALF2=cfg.get("HALF2", False), ASM=not _INTERPRET,
                                PDL=pdl, HAS_RES=residual is not None, GLU=glu,
                                ACC=cfg.get("ACC", 1), KMAJOR=cfg.get("KMAJOR", False),
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                                **({"launch_pdl": True} if pdl else {}))
        return y
    if kind == "dequant+cublas":
        # F.linear, not mm(..., out=y): on the H200 at M = 2048, 8192 x 8192 the out= form got a
        # slower cuBLAS kernel (409 vs 363 µs)
        w = dequantize(qw, scales, zeros, bits, group, k, cfg.get("BLOCK_N", 8),
                       cfg.get("BLOCK_K", 1024), cfg.get("num_warps", 4))
        return linear_epilogue(torch.nn.functional.linear(x, w, bias), residual, glu)
    # the tiled kernels: "nat" (natural k order) or "mm" (plane by plane)
    y = (torch.zeros if cfg.get("SPLIT_K", 1) > 1 else torch.empty)(
        (m, n), dtype=x.dtype, device=x.device)
    if kind == "nat":
        kernel = K._wq_mm_nat_kernel
        extra = {"H2": cfg.get("H2", False), "ASM": not _INTERPRET,
                 **({"maxnreg": cfg["maxnreg"]} if "maxnreg" in cfg and not _INTERPRET
                    else {})}
    else:
        kernel, extra = K._wq_matmul_kernel, {"CAT": cfg.get("CAT", False)}
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    kernel[grid](x, qw, scales, zp, bp, y, m, n, k, kw, g, x.stride(0), y.stride(0),
                 BITS=bits, GROUP=group, HAS_ZERO=has_zero, HAS_BIAS=has_bias,
                 BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], GROUP_M=cfg["GROUP_M"],
                 SPLIT_K=cfg["SPLIT_K"], SWAP=cfg.get("SWAP", False), EVEN_K=even_k,
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)
    return linear_epilogue(y, residual, glu)


def linear_epilogue(y: torch.Tensor, residual: torch.Tensor | None, glu: bool) -> torch.Tensor:
    """In torch: ``silu(y_G) * y_U`` (``glu``: y = [y_G, y_U] along the last axis), then
    ``residual + y``."""
    if glu:
        g, u = y.split(y.shape[-1] // 2, -1)
        y = torch.nn.functional.silu(g) * u
    return y if residual is None else y + residual


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # no inline PTX in the interpreter


def _fits(cfg: dict, kw: int, bits: int = 4, group: int = 128) -> bool:
    """A GEMV step (CHUNKS x 16 words) divides the packed row, and the split leaves every part
    at least one step; HALF2 GEMVs take 4-bit codes in groups of whole chunks."""
    if cfg["kind"] == "nat":
        return not cfg.get("H2") or (bits == 4 and group % 128 == 0)
    if cfg["kind"] != "gemv":
        return True
    if cfg.get("HALF2") and (bits != 4 or group % 128):
        return False
    step = 16 * cfg["CHUNKS"]
    return kw % step == 0 and kw // step >= cfg["SPLIT_K"]


# GLU (gate/up + silu * mul) in the GEMV's epilogue up to this many rows; larger M runs the
# tiled kernels and the activation in torch.
GLU_GEMV_MAX_M = 4


def wq_linear(x: torch.Tensor, qw: torch.Tensor, scales: torch.Tensor,
              zeros: torch.Tensor | None, bits: int, group: int,
              bias: torch.Tensor | None = None, config: dict | None = None,
              residual: torch.Tensor | None = None, glu: bool = False,
              gamma: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` for packed ``W`` (see :mod:`packing`); x float16 ``[..., K]``.

    ``residual`` (shape of y): returns ``residual + y``. ``glu``: W is ``[G; U]`` (2N rows) and
    the result ``silu(x G^T) * (x U^T)`` ``[..., N]``; not together with ``residual``.
    ``gamma``: the input is ``RMSNorm(x) * gamma`` (float16, as :func:`rms_norm_fused` gives
    it); up to 16 rows the GEMVs compute it themselves (one launch instead of two) and the
    tuner also times the two-launch form (:data:`NORM_THEN_WQ`); larger M runs the norm kernel.
    """
    if glu and residual is not None:
        raise ValueError("wq_linear: glu and residual are not fused together")
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n, kw = x2.shape[0], qw.shape[0], qw.shape[1]
    n_out = n // 2 if glu else n
    r2 = None
    if residual is not None:
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    if m == 0:
        return torch.empty((*lead, n_out), dtype=x.dtype, device=x.device)
    if gamma is not None and m > 16:  # (no GEMV at this M)
        x2, gamma = rms_norm_fused(x2, gamma, eps), None
    if config is None:
        pdl = pdl_supported(x.device)
        if glu and m <= GLU_GEMV_MAX_M:
            cands = [c for c in GEMV_CONFIGS if c["SPLIT_K"] == 1]
            default = DEFAULT_GEMV
        elif m <= 16:
            cands = GEMV_CONFIGS + (SMALL_MM_CONFIGS if m > 1 else [])
            default = DEFAULT_GEMV if m <= 2 else DEFAULT_SMALL_MM
        else:
            cands, default = LARGE_MM_CONFIGS, DEFAULT_LARGE_MM
        if pdl and m <= 2:  # (at larger M the tiled kernels win: no need to time both forms)
            cands = cands + [dict(c, PDL=True) for c in cands if c["kind"] == "gemv"]
        cands = [c for c in cands if _fits(c, kw, bits, group)]
        if gamma is not None:
            cands = cands + [NORM_THEN_WQ]
        fused_glu = glu and m <= GLU_GEMV_MAX_M
        key = ("wq-glu" if fused_glu else "wq", m_bucket(m), n, k, bits, group,
               zeros is not None, *(["norm"] if gamma is not None else []))

        def make_fns():
            r = rotation_copies(qw.numel() * 4 + scales.numel() * 2, x.device)
            sets = [(qw, scales, zeros)] + [
                (qw.clone(), scales.clone(), None if zeros is None else zeros.clone())
                for _ in range(r - 1)]
            return lambda c: [lambda q=q, s=s, z=z: _launch_wq(c, x2, q, s, z, bias, bits, group,
                                                               glu=fused_glu, gamma=gamma,
                                                               eps=eps)
                              for q, s, z in sets]
        config = TUNER.pick(key, x.device, cands, default, make_fns)
    kind = config["kind"]
    if glu and kind != "norm+wq" and (kind != "gemv" or config["SPLIT_K"] > 1):
        y = linear_epilogue(_launch_wq(config, x2, qw, scales, zeros, bias, bits, group,
                                       gamma=gamma, eps=eps), None, True)
    else:
        y = _launch_wq(config, x2, qw, scales, zeros, bias, bits, group, r2, glu, gamma, eps)
    return y.reshape(*lead, n_out)


_PDL: dict = {}


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: CUDA compute capability 9.0 or newer, a Triton that has it
    (``tl.extra.cuda.gdc_wait``), not the interpreter, not turned off by ``LBCC_TRITON_PDL=0``."""
    if _INTERPRET or device.type != "cuda" or os.environ.get("LBCC_TRITON_PDL", "1") == "0":
        return False
    try:
        from triton.language.extra import cuda as _cuda
    except ImportError:
        return False
    if not hasattr(_cuda, "gdc_wait"):
        return False
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _PDL:
        _PDL[i] = torch.cuda.get_device_capability(i)[0] >= 9
    return _PDL[i]


def dequantize(qw: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
               group: int, k: int, block_n: int = 8, block_k: int = 1024, num_warps: int = 4,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """float16 ``W [N, k]`` from packed weights (bit-identical to ``packing.dequantize``), in
    natural k order; ``out``: a ``[N, k]`` buffer with unit stride along k."""
    n, kw = qw.shape
    w = torch.empty((n, k), dtype=torch.float16, device=qw.device) if out is None else out
    bk = max(block_k, group) // group * group
    kp = kw * (32 // bits)
    even = k == kp and n % block_n == 0 and kp % bk == 0
    grid = (triton.cdiv(n, block_n), triton.cdiv(kp, bk))
    K._dequant_nat_kernel[grid](qw, scales, zeros if zeros is not None else scales, w, n, k, kw,
                                scales.shape[1], w.stride(0), BITS=bits, GROUP=group,
                                HAS_ZERO=zeros is not None, BLOCK_N=block_n, BLOCK_K=bk,
                                EVEN=even, num_warps=num_warps)
    return w


# ---------------------------------------------------------------------------------------------
# W8A8


def quant_rows(x: torch.Tensor, gamma: torch.Tensor | None = None, eps: float = 1e-6,
               block_k: int = 16384, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(q [M, K], s [M] float32)``, optionally of ``RMSNorm(x) * gamma``: int8 codes
    (s = max|x| / 127), or with ``fp8`` float8_e4m3fn codes (s = max|x| / 448)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    bk = min(block_k, triton.next_power_of_2(k))
    K._quant_rows_kernel[(m,)](x2, gamma if gamma is not None else x2, q, s, k, x2.stride(0),
                               q.stride(0), eps, HAS_NORM=gamma is not None, BLOCK_K=bk, FP8=fp8,
                               num_warps=4 if bk <= 1024 else (8 if bk <= 4096 else 16))
    return q, s


def _launch_w8a8_gemv(cfg, a, sa, w, sw, bias, y, residual, glu, quant=False, gamma=None,
                      eps=0.0):
    """The decode GEMV (:func:`kernels._w8a8_gemv_kernel`) into ``y``: ``a`` the codes (as
    bytes) with their scales ``sa``, or with ``quant`` the float16 rows it quantizes itself
    (``RMSNorm(a) * gamma`` when ``gamma`` is given)."""
    m, k = a.shape
    n_out = y.shape[1]
    K._w8a8_gemv_kernel[(m, triton.cdiv(n_out, cfg["BLOCK_N"]))](
        a, sa, _code_bytes(w), sw, bias if bias is not None else sw,
        residual if residual is not None else y, y, gamma if gamma is not None else sw, n_out, k,
        a.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0), eps,
        HAS_BIAS=bias is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        FP8=w.dtype == torch.float8_e4m3fn, HAS_RES=residual is not None, GLU=glu,
        PREFETCH=cfg.get("PREFETCH", False), QUANT=quant, HAS_NORM=gamma is not None,
        EVEN_K=k % cfg["BLOCK_K"] == 0, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return y


def _code_bytes(t: torch.Tensor) -> torch.Tensor:
    """E4M3 codes as their bytes (uint8) for the GEMV, which masks its loads; int8 unchanged."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _gemv_fits(cfg: dict, k: int) -> bool:
    """A W8A8 / FP8 GEMV step no longer than K rounded up to a power of two (a step may run
    past K: those lanes load zeros)."""
    return cfg["BLOCK_K"] <= triton.next_power_of_2(k)


def _launch_w8a8(cfg, q, sa, w, sw, bias, y, out_int32, residual=None, glu=False):
    """One W8A8 / FP8 product into ``y`` (``[M, N]``, ``[M, N / 2]`` with ``glu``); the GEMV
    applies the epilogues in the kernel, the tile kernel in torch after it."""
    m, k = q.shape
    n = w.shape[0]
    if cfg["kind"] == "scaled-mm":
        t = torch._scaled_mm(q, w.t(), scale_a=sa[:, None], scale_b=sw[None, :],
                             out_dtype=y.dtype, use_fast_accum=cfg["FAST"])
        if bias is not None:
            t = t + bias
        y.copy_(linear_epilogue(t, residual, glu))
        return y
    if cfg["kind"] == "w8a8-gemv":
        return _launch_w8a8_gemv(cfg, _code_bytes(q), sa, w, sw, bias, y, residual, glu)
    t = y if not glu else torch.empty((m, n), dtype=y.dtype, device=y.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    K._w8a8_matmul_kernel[grid](q, sa, w, sw, bias if bias is not None else sw, t, m, n, k,
                                q.stride(0), t.stride(0), HAS_BIAS=bias is not None,
                                OUT_INT32=out_int32, BLOCK_M=cfg["BLOCK_M"],
                                BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                                GROUP_M=cfg["GROUP_M"], FP8=q.dtype == torch.float8_e4m3fn,
                                EVEN_K=k % cfg["BLOCK_K"] == 0, PROMOTE=cfg.get("PROMOTE", True),
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if glu:
        y.copy_(linear_epilogue(t, None, True))
    if residual is not None:
        y.add_(residual)
    return y


def w8a8_linear(q: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sw: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                config: dict | None = None, fast_accum: bool | None = None,
                residual: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    """``y = (q @ w.T) * sa[:, None] * sw[None, :] (+ bias)``; q ``[M, K]`` and w ``[N, K]``
    both int8 or both float8_e4m3fn (FP8 tensor cores, float32 accumulation; ``fast_accum``:
    see :data:`FP8_FAST_ACCUM`, its default); then ``silu(y_G) * y_U`` (``glu``: w = [G; U])
    and ``+ residual`` (``[M, N]`` or ``[M, N / 2]``), inside the decode GEMV.

    ``out_dtype=torch.int32`` returns the raw integer accumulator (int8, for exactness tests).
    """
    m, n = q.shape[0], w.shape[0]
    fp8 = q.dtype == torch.float8_e4m3fn
    if fp8 != (w.dtype == torch.float8_e4m3fn):
        raise TypeError(f"w8a8_linear: activations {q.dtype} and weights {w.dtype} differ")
    out_int32 = out_dtype == torch.int32
    if out_int32 and (glu or residual is not None):
        raise ValueError("w8a8_linear: the int32 accumulator has no epilogues")
    y = torch.empty((m, n // 2 if glu else n), dtype=out_dtype, device=q.device)
    if residual is not None:
        residual = residual.reshape(m, y.shape[1])
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
    configs, default = W8A8_CONFIGS, DEFAULT_W8A8
    kind = "w8a8"
    if fp8:
        fast = FP8_FAST_ACCUM if fast_accum is None else fast_accum
        configs = [dict(c, PROMOTE=not fast) for c in FP8_CONFIGS if q.shape[1] % c["BLOCK_K"] == 0]
        if not configs:
            raise ValueError(f"FP8 layers need K divisible by 32, not {q.shape[1]}")
        default = next(c for c in configs if c["BLOCK_M"] == 64)
        kind = "fp8-fast" if fast else "fp8"
        if m > W8A8_GEMV_MAX_M and scaled_mm_supported(q.device, n, q.shape[1]):
            configs = configs + [scaled_mm_config(fast)]
    if m <= W8A8_GEMV_MAX_M and not out_int32:
        gemv = [c for c in W8A8_GEMV_CONFIGS if _gemv_fits(c, q.shape[1])]
        configs, default = gemv + configs, (gemv[0] if gemv else default)
    if config is None:
        key = (kind, m_bucket(m), n, q.shape[1], *(["glu"] if glu else []),
               *(["res"] if residual is not None else []))

        def make_fns():
            sets = [w] + [w.clone() for _ in range(rotation_copies(w.numel(), q.device) - 1)]
            out = torch.empty_like(y)
            return lambda c: [lambda w_=w_: _launch_w8a8(c, q, sa, w_, sw, bias, out, out_int32,
                                                         residual, glu) for w_ in sets]
        config = TUNER.pick(key, q.device, configs, default, make_fns)
    return _launch_w8a8(config, q, sa, w, sw, bias, y, out_int32, residual, glu)


#: the unfused decode form, a tuning candidate beside the quantizing GEMVs: the quantization
#: kernel, then :func:`w8a8_linear` (tuned on its own)
QUANT_THEN_GEMM = {"kind": "quant+w8a8"}


def _launch_w8a8_fp(cfg, x, w, sw, bias, residual, glu, gamma, eps):
    """One float16-in W8A8 / FP8 product of ``x [M, K]``: the GEMV that quantizes its input
    (kind w8a8-gemv with QUANT), or ``QUANT_THEN_GEMM``."""
    if cfg["kind"] == "quant+w8a8":
        q, sa = quant_rows(x, gamma, eps, fp8=w.dtype == torch.float8_e4m3fn)
        return w8a8_linear(q, sa, w, sw, bias, residual=residual, glu=glu)
    y = torch.empty((x.shape[0], w.shape[0] // 2 if glu else w.shape[0]), dtype=torch.float16,
                    device=x.device)
    return _launch_w8a8_gemv(cfg, x, sw, w, sw, bias, y, residual, glu, True, gamma, eps)


def w8a8_linear_fp(x: torch.Tensor, w: torch.Tensor, sw: torch.Tensor,
                   bias: torch.Tensor | None = None, gamma: torch.Tensor | None = None,
                   eps: float = 1e-6, residual: torch.Tensor | None = None, glu: bool = False,
                   config: dict | None = None) -> torch.Tensor:
    """float16 in, float16 out: dynamic per-token quantization of ``x`` (of ``RMSNorm(x) *
    gamma`` when ``gamma`` is given) + int8 product (FP8 E4M3 when ``w`` is float8_e4m3fn), then
    the epilogues of :func:`w8a8_linear` (``glu``, ``residual``).

    Up to :data:`W8A8_GEMV_MAX_M` rows (decode) the GEMV quantizes the rows itself, one launch
    instead of two; the tuner also times the two-launch form (:data:`QUANT_THEN_GEMM`), which
    larger M always takes. Codes without the norm are the same in both forms; with it the
    row's 1 / rms may differ in its last bit (its sum of squares is added in another order).
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], w.shape[0]
    n_out = n // 2 if glu else n
    r2 = None
    if residual is not None:
        r2 = residual.reshape(m, n_out)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    if config is None:
        gemvs = ([dict(c, QUANT=True) for c in W8A8_GEMV_CONFIGS if _gemv_fits(c, k)]
                 if 0 < m <= W8A8_GEMV_MAX_M else [])
        if not gemvs:
            config = QUANT_THEN_GEMM
    if config is None:
        fp8 = w.dtype == torch.float8_e4m3fn
        key = ("fp8q" if fp8 else "w8a8q", m_bucket(m), n, k,
               *(["norm"] if gamma is not None else []), *(["glu"] if glu else []),
               *(["res"] if residual is not None else []))

        def make_fns():
            sets = [w] + [w.clone() for _ in range(rotation_copies(w.numel(), x.device) - 1)]
            return lambda c: [lambda w_=w_: _launch_w8a8_fp(c, x2, w_, sw, bias, r2, glu, gamma,
                                                            eps) for w_ in sets]
        config = TUNER.pick(key, x.device, [*gemvs, QUANT_THEN_GEMM], gemvs[0], make_fns)
    y = _launch_w8a8_fp(config, x2, w, sw, bias, r2, glu, gamma, eps)
    return y.reshape(*lead, n_out)



# ---------------------------------------------------------------------------------------------
# decoder epilogues / prologues


def rms_norm_fused(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * gamma`` per row in one launch."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty_like(x2)
    bk = triton.next_power_of_2(k)
    pdl = pdl_supported(x.device)
    K._rmsnorm_kernel[(x2.shape[0],)](x2, gamma, y, k, x2.stride(0), y.stride(0), eps,
                                      BLOCK_K=bk, PDL=pdl, num_warps=4 if bk <= 2048 else 8,
                                      **({"launch_pdl": True} if pdl else {}))
    return y.reshape(x.shape)


def rope_and_cache(qkv: torch.Tensor, positions: torch.Tensor, cos, sin, cache: torch.Tensor,
                   t: int, nh: int, nkv: int, hd: int) -> torch.Tensor:
    """Rotary on q, k of ``qkv [B*T, (NH + 2 NKV) * HD]``; k, v into ``cache [2, B, NKV, L, HD]``
    at ``positions [T]``; returns q ``[B*T, NH, HD]``."""
    rows = qkv.shape[0]
    q = torch.empty((rows, nh, hd), dtype=qkv.dtype, device=qkv.device)
    has_rope = cos is not None
    pdl = pdl_supported(qkv.device)
    K._rope_cache_kernel[(rows, nh + 2 * nkv)](
        qkv, positions, cos if has_rope else qkv, sin if has_rope else qkv, q, cache, t,
        qkv.stride(0), cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        NH=nh, NKV=nkv, HD=hd, HAS_ROPE=has_rope, PDL=pdl, num_warps=1,
        **({"launch_pdl": True} if pdl else {}))
    return q


__all__ = ["wq_linear", "linear_epilogue", "pdl_supported", "dequantize", "quant_rows",
           "w8a8_linear", "w8a8_linear_fp", "TUNER",
           "Tuner", "m_bucket", "rms_norm_fused", "rope_and_cache"]
