"""GPU correctness sweep of the ``triton`` target's weight-only kernels (run on demand).

    python benchmarks/triton_check.py

Every kernel form (GEMV with and without split-K, tiled with and without SWAP and split-K, the
natural-order tiled kernel with and without float16-pair dequantization, the dequantize kernel
behind dequant+cublas) on 4- and 8-bit, symmetric and asymmetric, several
group sizes, K a multiple of the chunk or not; relative Frobenius error against float32 math on
the same dequantized weights (< 2e-3 passes); for the GEMVs also the residual and gated-MLP
(silu(gate) * up) epilogues, two steps of prefetch, programmatic dependent launch and
chunk-major tiles. Prints one
line per case and a summary; exits 1 on a failure. Runs in a few seconds (the compilation dominates).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

try:
    from lbcc.targets.triton import ops
except ImportError:  # a bare copy on the GPU machine
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lbcc_triton import ops  # type: ignore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_kernels import dequant_ref, pack_gpu, quantize_gpu  # noqa: E402


def main() -> int:
    torch.manual_seed(0)
    dev = "cuda"
    fails = 0
    cases = [(4, 128, True, 512, 1024), (4, 128, False, 256, 1024), (4, 32, False, 384, 1000),
             (8, 64, False, 320, 512)]
    cfgs = [ops._gemv(8, 1, 1, 4), ops._gemv(4, 8, 1, 4, pf=False), ops._gemv(16, 4, 2, 4),
            ops._gemv(32, 2, 4, 8), ops._gemv(16, 4, 1, 2), ops._gemv(8, 8, 1, 2, h2=True),
            ops._gemv(32, 4, 4, 4, h2=True), ops._mm(16, 64, 1, 4, 3),
            ops._mm(16, 64, 2, 4, 3),
            ops._mm(16, 64, 1, 4, 3, swap=True), ops._mm(64, 128, 1, 4, 4),
            ops._mm(128, 128, 1, 8, 3, swap=True), ops._mm(16, 128, 2, 4, 3, cat=True),
            ops._mm(128, 128, 2, 8, 3, swap=True, cat=True), ops._nat(64, 128, 1, 4, 4),
            ops._nat(128, 128, 2, 8, 3, h2=True), ops._nat(128, 256, 4, 8, 3, h2=True),
            ops._nat(128, 128, 2, 8, 3, swap=True, h2=True), ops._nat(16, 64, 1, 4, 3),
            ops._dqmm(), ops._dqmm(64, 128, 4), ops._dqmm(4, 2048, 4),
            ops._nat(128, 128, 4, 8, 2, h2=True, maxnreg=128),
            # two steps of prefetch; programmatic dependent launch (sm_90+)
            ops._gemv(8, 1, 1, 2, pf=2), ops._gemv(8, 8, 1, 4, pf=2, h2=True),
            dict(ops._gemv(8, 1, 1, 4), PDL=True), dict(ops._gemv(16, 4, 2, 4), PDL=True),
            dict(ops._gemv(32, 8, 1, 16, pf=2, h2=True), PDL=True),
            # chunk-major tiles: float16 pairs (4-word accumulation) and float32
            ops._gemv(16, 8, 1, 2, pf=2, h2=True, km=True), ops._gemv(8, 16, 1, 4, h2=True, km=True),
            ops._gemv(32, 4, 4, 4, h2=True, km=True), ops._gemv(8, 4, 1, 2, km=True),
            ops._gemv(16, 2, 2, 4, pf=2, km=True),
            dict(ops._gemv(8, 4, 1, 2, h2=True, km=True), PDL=True),
            dict(ops._gemv(8, 4, 1, 1, pf=2, h2=True, km=True), PDL=True)]
    for bits, group, sym, n, k in cases:
        w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        codes, s, z = quantize_gpu(w, bits, group, sym)
        qw = pack_gpu(codes, bits)
        wref = dequant_ref(codes, s, z, bits, group)[:, :k].float()
        bias = torch.randn(n, device=dev, dtype=torch.float16)
        dq = ops.dequantize(qw, s, z, bits, group, k)
        exact = torch.equal(dq, wref.half())
        fails += not exact
        print(f"dequant {bits}b g{group} {'sym' if sym else 'asym'} {n}x{k}: "
              f"{'exact' if exact else 'MISMATCH'}", flush=True)
        for m in (1, 3, 16, 130):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            ref = x.float() @ wref.t() + bias.float()
            for cfg in cfgs:
                if ((cfg["kind"] == "gemv" and m > 16)
                        or not ops._fits(cfg, qw.shape[1], bits, group)):
                    continue
                try:
                    y = ops.wq_linear(x, qw, s, z, bits, group, bias=bias, config=cfg)
                    torch.cuda.synchronize()
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                except Exception as e:  # noqa: BLE001
                    err, msg = float("nan"), f"{type(e).__name__}: {str(e)[:300]}"
                else:
                    msg = ""
                ok = err < 2e-3
                if ok and cfg["kind"] == "gemv" and m <= 3:  # the epilogues, unbiased
                    y0 = x.float() @ wref.t()
                    res = torch.randn(m, n, device=dev, dtype=torch.float16)
                    y = ops.wq_linear(x, qw, s, z, bits, group, config=cfg, residual=res)
                    e_res = ((y.float() - y0 - res.float()).norm() / (y0 + res.float()).norm())
                    g, u = y0[:, : n // 2], y0[:, n // 2:]
                    glu_ref = torch.nn.functional.silu(g) * u
                    y = ops.wq_linear(x, qw, s, z, bits, group, config=cfg, glu=True)
                    e_glu = ((y.float() - glu_ref).norm() / glu_ref.norm())
                    ok = e_res.item() < 2e-3 and e_glu.item() < 2e-3
                    msg = f"residual {e_res.item():.1e}, glu {e_glu.item():.1e}"
                fails += not ok
                if not ok or m == 1:
                    print(f"  {bits}b g{group} {'sym' if sym else 'asym'} {n}x{k} M={m} {cfg}: "
                          f"{err:.1e} {'ok' if ok else 'FAIL'} {msg}", flush=True)
    print(f"triton_check: {fails} failures")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
