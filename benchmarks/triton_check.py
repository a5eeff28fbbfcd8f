"""GPU correctness sweep of the ``triton`` target's kernels (run on demand).

    python benchmarks/triton_check.py [--only-w8a8 | --only-norm]

Every kernel form (GEMV with and without split-K, tiled with and without SWAP and split-K, the
natural-order tiled kernel with and without float16-pair dequantization, the dequantize kernel
behind dequant+cublas) on 4- and 8-bit, symmetric and asymmetric, several
group sizes, K a multiple of the chunk or not; relative Frobenius error against float32 math on
the same dequantized weights (< 2e-3 passes); for the GEMVs also the residual and gated-MLP
(silu(gate) * up) epilogues, two steps of prefetch, programmatic dependent launch and
chunk-major tiles; then W8A8 int8 and FP8 E4M3 (:func:`check_w8a8`). Prints one
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
    if "--only-w8a8" in sys.argv[1:]:
        fails = check_w8a8(dev)
        print(f"triton_check (W8A8 / FP8 only): {fails} failures")
        return 1 if fails else 0
    if "--only-norm" in sys.argv[1:]:
        fails = check_norm_gemv(dev)
        print(f"triton_check (normalizing GEMVs only): {fails} failures")
        return 1 if fails else 0
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
    fails += check_norm_gemv(dev)
    fails += check_w8a8(dev)
    print(f"triton_check: {fails} failures")
    return 1 if fails else 0


def check_norm_gemv(dev: str) -> int:
    """W4A16 / W8A16 GEMVs that compute ``RMSNorm(x) * gamma`` themselves, against the norm
    kernel followed by the same GEMV (< 2e-3; r may differ in its last bit), every GEMV form
    (split-K, prefetch, float16 pairs, chunk-major, PDL), residual and GLU epilogues, K whole
    chunks or not. Returns the number of failures."""
    fails = 0
    cfgs = [ops._gemv(8, 1, 1, 4), ops._gemv(16, 4, 2, 4), ops._gemv(8, 1, 1, 2, pf=2),
            ops._gemv(8, 8, 1, 2, h2=True), ops._gemv(16, 8, 1, 2, pf=2, h2=True, km=True),
            ops._gemv(8, 4, 1, 2, km=True), dict(ops._gemv(8, 1, 1, 4), PDL=True),
            dict(ops._gemv(8, 4, 1, 1, pf=2, h2=True, km=True), PDL=True), ops.NORM_THEN_WQ]
    for bits, group, sym, n, k in ((4, 128, True, 512, 1024), (4, 32, False, 384, 1000),
                                   (8, 64, False, 320, 512)):
        w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        codes, s, z = quantize_gpu(w, bits, group, sym)
        qw = pack_gpu(codes, bits)
        gamma = 1 + 0.2 * torch.randn(k, device=dev, dtype=torch.float16)
        for m in (1, 3):
            x = torch.randn(m, k, device=dev, dtype=torch.float16) * 2
            xn = ops.rms_norm_fused(x, gamma, 1e-5)
            res = torch.randn(m, n, device=dev, dtype=torch.float16)
            for cfg in cfgs:
                if not ops._fits(cfg, qw.shape[1], bits, group):
                    continue
                errs = []
                for glu, r in ((False, None), (False, res), (True, None)):
                    plain = ops.DEFAULT_GEMV if cfg is ops.NORM_THEN_WQ else cfg
                    try:
                        want = ops.wq_linear(xn, qw, s, z, bits, group, config=plain,
                                             residual=r, glu=glu).double()
                        got = ops.wq_linear(x, qw, s, z, bits, group, config=cfg, residual=r,
                                            glu=glu, gamma=gamma, eps=1e-5).double()
                        errs.append(((got - want).norm() / want.norm()).item())
                    except Exception as e:  # noqa: BLE001
                        errs.append(float("nan"))
                        print(f"  {type(e).__name__}: {str(e)[:300]}", flush=True)
                ok = all(e < 2e-3 for e in errs)
                fails += not ok
                print(f"  norm {bits}b g{group} {n}x{k} M={m} {cfg}: "
                      f"{', '.join(f'{e:.1e}' for e in errs)} {'ok' if ok else 'FAIL'}",
                      flush=True)
    return fails


def check_w8a8(dev: str, shapes=((320, 512), (96, 576)), ms=(1, 3, 16, 130)) -> int:
    """W8A8 int8 and FP8 E4M3: activation codes exact against torch's rounding (IEEE division,
    round to nearest even), every GEMV / tile form (prefetch, promotion, fast accumulation)
    against float64 math on the same codes (< 2e-3), cuBLASLt's FP8 product (``scaled-mm``) where the
    GPU has one, the GEMV's and scaled-mm's residual and GLU epilogues against the tile kernel plus
    the torch epilogue. Returns the number of failures."""
    fails = 0
    gemvs = [dict(ops.W8A8_GEMV_CONFIGS[0], BLOCK_N=bn, BLOCK_K=bk, PREFETCH=pf)
             for bn, bk, pf in ((16, 64, True), (8, 64, False), (32, 32, True),
                                # steps past K (masked): 576 in one step of 1024 or three of 256
                                (4, 1024, True), (16, 256, False))]
    tiles = [dict(ops.DEFAULT_W8A8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
             for bm, bn, bk, nw in ((16, 64, 64, 4), (64, 64, 32, 4), (128, 128, 64, 8))]
    for fp8 in (False, True):
        qmax = 448.0 if fp8 else 127.0
        for n, k in shapes:
            wf = torch.randn(n, k, device=dev) * 0.02
            sw = wf.abs().amax(1) / qmax
            w = ((wf / sw[:, None]).clamp(-qmax, qmax).to(torch.float8_e4m3fn) if fp8 else
                 (wf / sw[:, None]).round().clamp(-qmax, qmax).to(torch.int8))
            bias = torch.randn(n, device=dev, dtype=torch.float16)
            for m in ms:
                x = torch.randn(m, k, device=dev, dtype=torch.float16)
                q, sa = ops.quant_rows(x, fp8=fp8)
                xf = x.float()
                amax = xf.abs().amax(-1, keepdim=True)
                v = xf * (torch.full_like(amax, qmax) / amax)
                want = (v.clamp(-qmax, qmax).to(torch.float8_e4m3fn).float() if fp8 else
                        v.round().clamp(-qmax, qmax))
                exact = torch.equal(q.float(), want)
                fails += not exact
                if not exact:
                    bad = (q.float() != want).nonzero()
                    i, j = bad[0].tolist()
                    print(f"  {'fp8' if fp8 else 'int8'} {n}x{k} M={m}: codes MISMATCH at "
                          f"{len(bad)} of {q.numel()}, e.g. x={x[i, j].item()!r} max="
                          f"{amax[i, 0].item()!r}: {q[i, j].float().item()} (want "
                          f"{want[i, j].item()}, x * qmax / max = {v[i, j].item()!r})", flush=True)
                ref = (q.double() @ w.double().t()) * sa[:, None].double() * \
                    sw[None, :].double() + bias.double()
                cfgs = tiles + (gemvs if m <= ops.W8A8_GEMV_MAX_M else [])
                if fp8:
                    cfgs += [dict(c, PROMOTE=False) for c in tiles]
                    if ops.scaled_mm_supported(q.device, n, k):
                        cfgs += [ops.scaled_mm_config(False), ops.scaled_mm_config(True)]
                for cfg in cfgs:
                    try:
                        y = ops.w8a8_linear(q, sa, w, sw, bias, config=cfg)
                        err = ((y.double() - ref).norm() / ref.norm()).item()
                        msg = ""
                    except Exception as e:  # noqa: BLE001
                        err, msg = float("nan"), f"{type(e).__name__}: {str(e)[:300]}"
                    fast = not cfg.get("PROMOTE", True) or cfg.get("FAST", False)
                    ok = err < (5e-3 if fast else 2e-3)
                    if ok and cfg["kind"] in ("w8a8-gemv", "scaled-mm"):
                        res = torch.randn(m, n // 2, device=dev, dtype=torch.float16)
                        tile = ops.w8a8_linear(q, sa, w, sw, bias, config=tiles[0])
                        want_e = ops.linear_epilogue(tile, res, True).double()
                        got_e = ops.w8a8_linear(q, sa, w, sw, bias, config=cfg, residual=res,
                                                glu=True).double()
                        e_epi = ((got_e - want_e).norm() / want_e.norm()).item()
                        ok = e_epi < 2e-3
                        msg = f"glu + residual {e_epi:.1e}"
                    if ok and cfg["kind"] == "w8a8-gemv":  # quantizing its own input
                        got = ops.w8a8_linear_fp(x, w, sw, bias, config=dict(cfg, QUANT=True))
                        same = torch.equal(got, y)
                        gamma = 1 + 0.2 * torch.randn(k, device=dev, dtype=torch.float16)
                        q2, sa2 = ops.quant_rows(x, gamma, 1e-5, fp8=fp8)
                        want_n = ops.w8a8_linear(q2, sa2, w, sw, bias, config=cfg).double()
                        got_n = ops.w8a8_linear_fp(x, w, sw, bias, gamma, 1e-5,
                                                   config=dict(cfg, QUANT=True)).double()
                        e_n = ((got_n - want_n).norm() / want_n.norm()).item()
                        ok = same and e_n < 2e-3
                        msg += (f", quantizing GEMV {'identical' if same else 'DIFFERENT'}, "
                                f"with the norm {e_n:.1e}")
                    fails += not ok
                    if not ok or m == 1:
                        print(f"  {'fp8' if fp8 else 'int8'} {n}x{k} M={m} codes "
                              f"{'exact' if exact else 'MISMATCH'} {cfg}: {err:.1e} "
                              f"{'ok' if ok else 'FAIL'} {msg}", flush=True)
    return fails


if __name__ == "__main__":
    sys.exit(main())
