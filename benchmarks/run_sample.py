"""Benchmark lbcc against ONNX Runtime's own quantizers on the sample model, in one run.

Model: SmolLM2-135M-Instruct (``lbcc.samples.prepare_smollm2``), float32 ONNX, input_ids -> logits.
Every model below is built from the same float ONNX, evaluated on the same token ids with the same
thread count, and timed back to back in the same process:

  float               the float32 export (the reference for every "x float" ratio)
  ort-static          onnxruntime.quantization.quantize_static: QDQ, activations QUInt8,
                      weights QInt8 per channel, MinMax, MatMul only, calibrated on the same
                      16 x 512 tokens of wikitext-2-tokens/valid.txt that lbcc calibrates on
  ort-dynamic         onnxruntime.quantization.quantize_dynamic, default settings (weights QInt8)
  ort-nbits-rtn4      onnxruntime MatMulNBitsQuantizer, 4-bit round-to-nearest, block 128,
                      asymmetric (default), accuracy_level 4
  ort-static-rr/-sq   quantize_static with reduce_range (7-bit weights) / and its SmoothQuant
  ort-nbits-hqq/kquant/gptq  MatMulNBitsQuantizer's other 4-bit algorithms, block 128
  lbcc-float-fused    the float model with lbcc's fuse-attention pass only (what every ort-int8
                      compile does to attention), unquantized: the float reference with the fusion
  lbcc-*              lbcc.compile(preset=..., calibration=valid.txt, tokenizer=HF dir) for every
                      preset (w8a8-dynamic and w4a16-rtn without calibration); lbcc-auto-vnni
                      only on a CPU with VNNI or AMX (its u8 x s8 products saturate elsewhere)

Each quantizer / compile runs in its own subprocess (``benchmarks/_bench_worker.py``); its wall time
and peak RSS come from ``os.wait4`` on that child, so memory of different tools never mixes. No
baseline uses ``quant_pre_process``.

Evaluation: perplexity with ``lbcc.evaluate.evaluate`` on the first ``--max-tokens`` tokens of
WikiText-2 raw test (``wiki.test.raw`` read as one string, tokenized once without special tokens,
no BOS, non-overlapping 512-token windows); file size = .onnx + external data; latency = median of
batch-1 forward passes at 128 tokens (prefill) and at 1 token, measured with all sessions loaded
and the models interleaved round-robin (rotating the order each round, 50 ms pause before each
run so that the previous session's spinning workers are parked: ``lbcc.evaluate.SETTLE_S``),
``--threads`` intra-op threads.

    python benchmarks/run_sample.py                                  # everything, 32768 tokens
    python benchmarks/run_sample.py --max-tokens 2048 --only lbcc-w4a16 ort-nbits-rtn4
    python benchmarks/run_sample.py --write-md BENCHMARKS.md         # also write the Markdown

Raw numbers go to ``OUT_DIR/results.json``; the child logs to ``OUT_DIR/logs/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import functools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_bench_worker.py"

FLOAT = "float"
BASELINES = ["ort-static", "ort-static-all", "ort-static-rr", "ort-static-sq", "ort-dynamic",
             "ort-nbits-rtn4", "ort-nbits-hqq", "ort-nbits-kquant", "ort-nbits-gptq"]
LBCC = ["lbcc-float-fused", "lbcc-w8a8", "lbcc-w8a8-dynamic", "lbcc-w8a8-sq", "lbcc-auto",
        "lbcc-auto-avx2", "lbcc-auto-vnni", "lbcc-w4a16-rtn", "lbcc-w4a16", "lbcc-w4a16-gptq", "lbcc-w4a16-awq", "lbcc-w4a16-mixed"]
ALL = [FLOAT, *BASELINES, *LBCC]
#: models whose int8 products are exact only on x86 CPUs with VNNI or AMX (not run elsewhere)
NEEDS_VNNI = {"lbcc-auto-vnni"}
DESCRIPTION = {
    FLOAT: "float32 ONNX export (reference)",
    "ort-static": "ORT quantize_static: QDQ, act QUInt8 per tensor, weight QInt8 per channel, "
                  "MinMax, op types {ops}, same calibration tokens as lbcc-w8a8",
    "ort-static-all": "ORT quantize_static as above, op types chosen by ORT (its default; the "
                      "configuration of the baseline figures in the foundation issue)",
    "ort-static-rr": "ORT quantize_static as ort-static with reduce_range=True (7-bit weights, "
                     "ORT's documented setting for x86 CPUs without VNNI)",
    "ort-static-sq": "ORT quantize_static as ort-static-rr plus its SmoothQuant (alpha 0.5; "
                     "needs the neural-compressor package)",
    "ort-dynamic": "ORT quantize_dynamic: default settings (weight QInt8 per tensor)",
    "ort-nbits-rtn4": "ORT MatMulNBitsQuantizer: 4-bit RTN, block 128, asymmetric, "
                      "accuracy_level 4",
    "ort-nbits-hqq": "ORT MatMulNBitsQuantizer: 4-bit HQQ, block 128, accuracy_level 4",
    "ort-nbits-kquant": "ORT MatMulNBitsQuantizer: 4-bit k_quant, block 128, accuracy_level 4",
    "ort-nbits-gptq": "ORT MatMulNBitsQuantizer: 4-bit GPTQ, block 128, same calibration tokens",
    "lbcc-float-fused": "the float model with lbcc's fuse-attention only (causal attention -> "
                        "GroupQueryAttention, as every ort-int8 compile does; no quantization)",
    "lbcc-w8a8": "lbcc preset w8a8 (calibrated on the same tokens as ort-static)",
    "lbcc-w8a8-dynamic": "lbcc preset w8a8-dynamic (no calibration)",
    "lbcc-w8a8-sq": "lbcc preset w8a8-sq: SmoothQuant (alpha searched per group), then w8a8",
    "lbcc-auto": "lbcc preset auto: SmoothQuant (norms, v -> o, tied lm_head untied), GPTQ "
                 "int8 weights, static int8 on output-error ranges where the measured "
                 "(token-averaged) layer SQNR >= 32 dB, else int8 per token where >= 31 dB, "
                 "else per block at run time",
    "lbcc-auto-avx2": "lbcc preset auto-avx2: auto, with the layers that fail both static and "
                      "per-token int8 left in float (per-block int8 is slower than float on x86 "
                      "without VNNI)",
    "lbcc-auto-vnni": "lbcc preset auto-vnni: auto with int8 weight storage (ONNX Runtime's "
                      "u8 x s8 kernels: exact and fast with VNNI or AMX; run only on such a CPU)",
    "lbcc-w4a16-rtn": "lbcc w4a16 with plain round-to-nearest (clip none, no calibration): the "
                      "RTN reference of the GPTQ / AWQ gap figures",
    "lbcc-w4a16": "lbcc preset w4a16, group size 128 (calibrated: importance-weighted clip)",
    "lbcc-w4a16-gptq": "lbcc preset w4a16-gptq, group size 128 (GPTQ, same calibration)",
    "lbcc-w4a16-awq": "lbcc preset w4a16-awq, group size 128 (AWQ scales + output-error clip, "
                      "same calibration)",
    "lbcc-w4a16-mixed": "lbcc preset w4a16-mixed: 4 / 8 bits / float per weight from measured "
                        "KL, 5.0 stored bits per weight",
}
VERSION_PACKAGES = ("onnxruntime", "onnx", "onnx-ir", "onnxscript", "torch", "numpy", "lbcc",
                    "tokenizers", "transformers")
MD_BEGIN = "<!-- run_sample.py:begin -->"
MD_END = "<!-- run_sample.py:end -->"


# ----------------------------------------------------------------------------- environment

def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == (platform.processor()
                                                         or platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024 ** 2, 1)
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable, "ram_gib": ram_gib,
            "platform": platform.platform(), "loadavg_start": _loadavg(),
            "vnni": bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """sha256 (16 hex) of lbcc's Python sources as they are now: which code the numbers are for."""
    import hashlib

    h = hashlib.sha256()
    for top in ("lbcc", "passes", "targets"):
        for f in sorted((REPO / top).rglob("*.py")):
            h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+uncommitted changes" if dirty else "")) if rev else None


# ----------------------------------------------------------------------------- building

def onnx_files(path: Path) -> list[Path]:
    """The .onnx file and the external-data files next to it that share its name."""
    return [path, *sorted(path.parent.glob(path.name + ".data*")),
            *sorted(path.parent.glob(path.stem + ".report.json"))]


def build_settings(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """What a build depends on besides the float model: a reused build must match it."""
    out: dict[str, Any] = {}
    calibrated = name.startswith("ort-static") or name == "ort-nbits-gptq" or (
        name in LBCC and name not in ("lbcc-float-fused", "lbcc-w8a8-dynamic", "lbcc-w4a16-rtn"))
    if calibrated:
        out.update(calib_samples=args.calib_samples, seq_len=args.seq_len)
    if name in ("ort-static", "ort-static-rr", "ort-static-sq"):
        out["op_types"] = args.ort_static_op_types
    if name == "ort-static-all":
        out["op_types"] = "default"
    if name in LBCC:  # a reused lbcc build must come from the code being benchmarked
        out["lbcc_source_sha256"] = source_digest()
    return out


def run_job(name: str, float_path: Path, out: Path, args: argparse.Namespace, calib: Path,
            tokenizer: Path, log_dir: Path) -> dict[str, Any]:
    """Build one model in a child process; wall time and peak RSS of exactly that child."""
    for f in onnx_files(out):
        f.unlink(missing_ok=True)  # never evaluate a stale file from an earlier run
    result_path = log_dir / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    log_path = log_dir / f"{name}.log"
    cmd = [sys.executable, str(WORKER), name, "--float", str(float_path), "--out", str(out),
           "--result", str(result_path), "--calib", str(calib), "--tokenizer", str(tokenizer),
           "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
           "--op-types", args.ort_static_op_types]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    print(f"[build] {name} ...", flush=True)
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    rec: dict[str, Any] = {"wall_s": round(wall, 2),
                           "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
                           "user_cpu_s": round(usage.ru_utime, 2),
                           "sys_cpu_s": round(usage.ru_stime, 2),
                           "returncode": proc.returncode, "log": str(log_path),
                           "command": shlex.join(cmd)}
    if proc.returncode == 0 and result_path.is_file() and out.is_file():
        rec.update(json.loads(result_path.read_text()))
        rec["job_seconds"] = round(rec.get("job_seconds", 0.0), 2)
        print(f"[build] {name}: {wall:.1f} s wall, peak RSS {rec['peak_rss_mb']:.0f} MB",
              flush=True)
    else:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        rec["error"] = "\n".join(tail)
        print(f"[build] {name} FAILED (exit {proc.returncode}); see {log_path}:\n  "
              + "\n  ".join(tail), flush=True)
    return rec


# ----------------------------------------------------------------------------- evaluation

def interleaved_latency(paths: dict[str, Path], threads: int, seqs: dict[int, int],
                        warmup: int) -> dict[str, dict[str, Any]]:
    """Median latency per model and sequence length, all sessions loaded, round-robin order.

    ``seqs`` maps a sequence length to its number of timed runs per model.

    The input is the one ``lbcc.evaluate.latency_ms`` uses (seeded random ids < 100, batch 1).
    """
    from lbcc.evaluate import SETTLE_S, make_session

    sessions = {name: make_session(p, threads) for name, p in paths.items()}
    names = list(sessions)
    inputs = {s: np.random.default_rng(0).integers(0, 100, (1, s), dtype=np.int64) for s in seqs}
    feeds = {n: sessions[n].get_inputs()[0].name for n in names}
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for s, repeats in seqs.items():
        x = inputs[s]
        for n in names:
            for _ in range(warmup):
                sessions[n].run(None, {feeds[n]: x})
        samples: dict[str, list[float]] = {n: [] for n in names}
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                time.sleep(SETTLE_S)  # the previous session's workers stop spinning
                t = time.perf_counter()
                sessions[n].run(None, {feeds[n]: x})
                samples[n].append((time.perf_counter() - t) * 1e3)
        for n in names:
            v = samples[n]
            out[n][f"seq{s}"] = {"median_ms": round(statistics.median(v), 3),
                                 "min_ms": round(min(v), 3), "max_ms": round(max(v), 3),
                                 "samples_ms": [round(t, 3) for t in v]}
    del sessions
    return out


def evaluate_models(paths: dict[str, Path], text: Path, tokenizer: Any,
                    args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from lbcc.evaluate import evaluate

    out: dict[str, dict[str, Any]] = {}
    for name, p in paths.items():
        print(f"[eval] perplexity {name} ...", flush=True)
        try:
            res = evaluate([p], text, tokenizer, seq_len=args.seq_len, max_tokens=args.max_tokens,
                           threads=args.threads, latency_seqs=(), progress=False)[0]
        except Exception as exc:  # noqa: BLE001 - one broken model must not sink the run
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            print(f"[eval] {name} FAILED: {out[name]['error']}", flush=True)
            continue
        out[name] = {"size_mb": res.size_mb, "perplexity": res.perplexity,
                     "predicted_tokens": res.tokens, "windows": res.windows,
                     "ppl_seconds": round(res.seconds, 2)}
        print(f"[eval] {name}: ppl {res.perplexity:.4g}, {res.size_mb:.1f} MB, "
              f"{res.seconds:.1f} s", flush=True)
    ok = {n: p for n, p in paths.items() if "error" not in out[n]}
    if ok:
        print(f"[eval] latency, {len(ok)} models interleaved ...", flush=True)
        lat = interleaved_latency(ok, args.threads, {128: args.latency_repeats,
                                                     1: args.latency_repeats_seq1},
                                  args.latency_warmup)
        for n, v in lat.items():
            out[n]["latency"] = v
    return out


# ----------------------------------------------------------------------------- reporting

def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def _fmt_num(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 1e5:
        return f"{v:.3g}"
    return f"{v:,.{digits}f}"


def _fmt_x(r: float | None) -> str:
    if r is None:
        return ""
    return f" ({r:.3g}x)" if r >= 100 else f" ({r:.2f}x)"


def _lat(row: dict[str, Any], seq: int) -> float | None:
    return (row.get("latency") or {}).get(f"seq{seq}", {}).get("median_ms")


def table_rows(models: dict[str, dict[str, Any]]) -> list[list[str]]:
    ref = models.get(FLOAT, {})
    rows = []
    for name, m in models.items():
        if "error" in m and "perplexity" not in m:
            err = m["error"].splitlines()[-1]
            rows.append([name, err if err.startswith("not run") else "failed: " + err[:80],
                         "", "", "", "", ""])
            continue
        size, ppl = m.get("size_mb"), m.get("perplexity")
        l128, l1 = _lat(m, 128), _lat(m, 1)
        build = m.get("build") or {}
        rows.append([
            name,
            _fmt_num(size) + _fmt_x(_ratio(size, ref.get("size_mb"))),
            _fmt_num(ppl, 2) + _fmt_x(_ratio(ppl, ref.get("perplexity"))),
            _fmt_num(l128) + _fmt_x(_ratio(l128, _lat(ref, 128))),
            _fmt_num(l1, 2) + _fmt_x(_ratio(l1, _lat(ref, 1))),
            _fmt_num(build.get("wall_s")) if build else "-",
            _fmt_num(build.get("peak_rss_mb"), 0) if build else "-",
        ])
    return rows


HEADER = ["model", "size MB (x float)", "ppl (x float)", "seq128 ms (x float)",
          "seq1 ms (x float)", "compile/quantize s", "peak RSS MB"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def check_targets(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets: each with the measured value and met / NOT met / n/a."""
    f = models.get(FLOAT, {})
    checks: list[dict[str, Any]] = []

    def get(name: str, what: str) -> float | None:
        m = models.get(name)
        if not m or "error" in m and "perplexity" not in m:
            return None
        if what == "size":
            return m.get("size_mb")
        if what == "ppl":
            return m.get("perplexity")
        if what in ("seq128", "seq1"):
            return _lat(m, int(what[3:]))
        return (m.get("build") or {}).get({"time": "wall_s", "rss": "peak_rss_mb"}[what])

    def vs_float(name: str, what: str, limit: float, label: str) -> None:
        v, ref = get(name, what), get(FLOAT, what)
        r = _ratio(v, ref)
        checks.append({"model": name, "target": f"{label} <= {limit:.2f}x float",
                       "measured": None if r is None else f"{r:.3f}x ({_fmt_num(v, 2)} vs "
                       f"{_fmt_num(ref, 2)})", "ratio": r, "met": None if r is None else r <= limit})

    def vs_model(name: str, what: str, other: str, label: str, unit: str) -> None:
        v, o = get(name, what), get(other, what)
        met = None if v is None or o is None else v < o
        checks.append({"model": name, "target": f"{label} < {other}'s",
                       "measured": None if met is None else f"{_fmt_num(v, 2)}{unit} vs "
                       f"{_fmt_num(o, 2)}{unit}", "ratio": _ratio(v, o), "met": met})

    del f
    vs_float("lbcc-w8a8", "size", 0.30, "size")
    vs_float("lbcc-w8a8", "seq128", 0.60, "seq128 latency")
    vs_float("lbcc-w8a8", "ppl", 1.10, "perplexity")
    vs_model("lbcc-w8a8", "time", "ort-static", "compile time", " s")
    vs_model("lbcc-w8a8", "rss", "ort-static", "peak RSS", " MB")
    vs_model("lbcc-w8a8", "time", "ort-static-all", "compile time", " s")
    vs_model("lbcc-w8a8", "rss", "ort-static-all", "peak RSS", " MB")
    vs_float("lbcc-w8a8-dynamic", "seq128", 0.65, "seq128 latency")
    vs_model("lbcc-w8a8-dynamic", "ppl", "ort-dynamic", "perplexity", "")
    vs_float("lbcc-w4a16", "size", 0.22, "size")
    vs_float("lbcc-w4a16", "seq1", 0.35, "seq1 latency")
    vs_float("lbcc-w4a16", "ppl", 1.30, "perplexity")
    vs_model("lbcc-w4a16", "ppl", "ort-nbits-rtn4", "perplexity", "")
    vs_model("lbcc-w4a16-gptq", "ppl", "ort-nbits-rtn4", "perplexity", "")
    vs_model("lbcc-w8a8-sq", "ppl", "lbcc-w8a8", "perplexity", "")
    # the accuracy issue: best static W8A8 <= 1.02x float at seq128 <= 0.65x, better than every
    # ORT recipe; GPTQ and AWQ each close >= 30 % of RTN's gap; best W4 beats every ORT 4-bit
    w8 = [n for n in ("lbcc-w8a8", "lbcc-w8a8-sq", "lbcc-auto", "lbcc-auto-avx2",
                      "lbcc-auto-vnni")
          if get(n, "ppl") is not None]
    if w8:
        # the target asks for one model meeting both: the fastest within 1.02x float perplexity,
        # else (none is) the most accurate
        fl_ppl = get(FLOAT, "ppl")
        within = [n for n in w8 if fl_ppl and get(n, "ppl") <= 1.02 * fl_ppl
                  and get(n, "seq128") is not None]
        best = min(within, key=lambda n: get(n, "seq128")) if within \
            else min(w8, key=lambda n: get(n, "ppl"))
        vs_float(best, "ppl", 1.02, "perplexity (best static W8A8)")
        vs_float(best, "seq128", 0.65, "seq128 latency (best static W8A8)")
        # the same attention fusion in float: what the quantization alone gains
        vs_model(best, "seq128", "lbcc-float-fused", "seq128 latency", " ms")
        for o in ("ort-static", "ort-static-all", "ort-static-rr", "ort-static-sq",
                  "ort-dynamic"):
            if get(o, "ppl") is not None:
                vs_model(best, "ppl", o, "perplexity", "")
    rtn, fl = get("lbcc-w4a16-rtn", "ppl"), get(FLOAT, "ppl")
    for name in ("lbcc-w4a16-gptq", "lbcc-w4a16-awq"):
        v = get(name, "ppl")
        closed = None if None in (v, rtn, fl) or rtn == fl else (rtn - v) / (rtn - fl)
        checks.append({"model": name, "target": "closes >= 30 % of lbcc-w4a16-rtn's gap to float",
                       "measured": None if closed is None else f"{100 * closed:.1f} % "
                       f"({_fmt_num(v, 2)} vs RTN {_fmt_num(rtn, 2)}, float {_fmt_num(fl, 2)})",
                       "ratio": closed, "met": None if closed is None else closed >= 0.30})
    w4 = [n for n in ("lbcc-w4a16", "lbcc-w4a16-gptq", "lbcc-w4a16-awq")
          if get(n, "ppl") is not None]
    if w4:
        best4 = min(w4, key=lambda n: get(n, "ppl"))
        for o in ("ort-nbits-rtn4", "ort-nbits-hqq", "ort-nbits-kquant", "ort-nbits-gptq"):
            if get(o, "ppl") is not None:
                vs_model(best4, "ppl", o, "perplexity (best W4 g128)", "")
    return checks


def _status(met: bool | None) -> str:
    return "n/a (not measured in this run)" if met is None else ("met" if met else "**NOT met**")


def markdown_section(res: dict[str, Any]) -> str:
    s, mach, ver = res["settings"], res["machine"], res["versions"]
    lines = [MD_BEGIN,
             "## Sample model: SmolLM2-135M-Instruct, lbcc vs ONNX Runtime quantizers",
             "",
             "Generated by `benchmarks/run_sample.py`; do not edit by hand between the markers.",
             "",
             f"- Command: `{res['command']}`",
             f"- Date: {res['date']} (total run {res['total_seconds'] / 60:.1f} min)"
             + (f"; repo at {res['git']}" if res.get("git") else "")
             + (f", lbcc sources sha256 {res['lbcc_source_sha256']}"
                if res.get("lbcc_source_sha256") else ""),
             f"- Machine: {mach['cpu']}, {mach['usable_cpus']} usable of {mach['logical_cpus']} "
             f"logical CPUs, {mach['ram_gib']} GiB RAM; load average at start "
             f"{mach.get('loadavg_start')}, at end {mach.get('loadavg_end')}",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()),
             f"- Evaluation: first {s['max_tokens']:,} tokens of `wiki.test.raw` (one string, "
             f"tokenized once, no special tokens / BOS), non-overlapping {s['seq_len']}-token "
             f"windows ({s['predicted_tokens']:,} predicted tokens); {s['threads']} intra-op "
             "threads, CPUExecutionProvider. Latency: median of batch-1 runs "
             f"({s['latency_repeats']} at 128 tokens (prefill), {s['latency_repeats_seq1']} at "
             f"1 token, after {s['latency_warmup']} warm-up), all models loaded and run "
             "round-robin (order rotated each round, a 50 ms pause before each run so that "
             "the previous session's spinning threads are parked).",
             f"- Calibration (ort-static, lbcc-w8a8): the first {s['calib_samples']} x "
             f"{s['seq_len']} tokens of `wikitext-2-tokens/valid.txt`. No baseline uses "
             "`quant_pre_process`.",
             "- compile/quantize s: wall time of the child process that loads the float model, "
             "quantizes and saves (interpreter start-up and imports included); peak RSS MB: "
             "`ru_maxrss` of that child alone. Builds run one at a time, each with its tool's "
             "default threading."]
    reused = [f"`{n}` (built {m['build'].get('date', '?')})" for n, m in res["models"].items()
              if (m.get("build") or {}).get("reused")]
    if reused:
        lines.append("- Not rebuilt in this run (build numbers from an earlier run): "
                     + ", ".join(reused))
    lines += ["", markdown_table(HEADER, table_rows(res["models"])), "", "Rows:", ""]
    lines += [f"- `{n}`: {m.get('description') or DESCRIPTION[n]}"
              for n, m in res["models"].items()]
    lines += ["", "### Targets", "", "| model | target | measured | status |",
              "| --- | --- | --- | --- |"]
    for c in res["targets"]:
        lines.append(f"| {c['model']} | {c['target']} | {c['measured'] or '-'} | "
                     f"{_status(c['met'])} |")
    lines += ["", f"Raw numbers: `{res['results_json']}`.", MD_END]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, section: str) -> None:
    """Replace the marked section if the file has one, else append it (or create the file)."""
    if path.is_file():
        old = path.read_text()
        if MD_BEGIN in old and MD_END in old:
            head, rest = old.split(MD_BEGIN, 1)
            tail = rest.split(MD_END, 1)[1].lstrip("\n")
            new = head + section + ("\n" + tail if tail else "")
        else:
            new = old.rstrip("\n") + "\n\n" + section
    else:
        new = "# Benchmarks\n\n" + section
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)


# ----------------------------------------------------------------------------- main

def select(only: list[str] | None) -> list[str]:
    if not only:
        return list(ALL)
    chosen = set()
    for pat in only:
        hits = [n for n in ALL if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise SystemExit(f"--only {pat!r} matches no model; choose from: {', '.join(ALL)}")
        chosen.update(hits)
    chosen.add(FLOAT)  # the reference of every ratio
    return [n for n in ALL if n in chosen]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Models: " + ", ".join(ALL))
    p.add_argument("--max-tokens", type=int, default=32768,
                   help="evaluate perplexity on the first N tokens of wiki.test.raw (32768)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for evaluation (2)")
    p.add_argument("--out-dir", type=Path, default=REPO / ".cache" / "bench",
                   help="where models, logs and results.json go (.cache/bench)")
    p.add_argument("--calib-samples", type=int, default=16,
                   help="calibration windows of --seq-len tokens for ort-static and lbcc-w8a8 (16)")
    p.add_argument("--seq-len", type=int, default=512, help="window length (512)")
    p.add_argument("--skip-baselines", action="store_true",
                   help="do not build the ORT baselines; evaluate those already in --out-dir "
                        "(with their build numbers from OUT_DIR/builds.json), if any")
    p.add_argument("--reuse", action="store_true",
                   help="do not rebuild a model already in --out-dir whose last build (in "
                        "OUT_DIR/builds.json) used the same settings: re-evaluate only")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="only these models (names or globs, e.g. 'lbcc-*'); float is always "
                        "included as the reference")
    p.add_argument("--write-md", type=Path, metavar="FILE",
                   help="write (or replace) the Markdown section in FILE")
    p.add_argument("--latency-repeats", type=int, default=20,
                   help="timed runs per model at 128 tokens (20)")
    p.add_argument("--latency-repeats-seq1", type=int, default=60,
                   help="timed runs per model at 1 token (60)")
    p.add_argument("--latency-warmup", type=int, default=3, help="warm-up runs (3)")
    p.add_argument("--ort-static-op-types", default="MatMul", metavar="OPS",
                   help="op_types_to_quantize for ort-static: comma-separated, or 'default' for "
                        "ORT's own choice, which adds Gather, Add, Mul, ... (MatMul)")
    p.add_argument("--model-cache", type=Path, default=REPO / ".cache" / "smollm2",
                   help="prepare_smollm2 cache directory (.cache/smollm2)")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                   help="the shared data directory (../shared/data)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    command = shlex.join(["python", os.path.relpath(__file__, Path.cwd()),
                          *(sys.argv[1:] if argv is None else argv)])
    out_dir = args.out_dir.resolve()
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    builds_path = out_dir / "builds.json"  # the last successful build of each model
    builds: dict[str, Any] = {}
    if builds_path.is_file():
        try:
            builds = json.loads(builds_path.read_text())
        except (OSError, ValueError):
            builds = {}

    text = args.data_dir / "wikitext-2-raw" / "wiki.test.raw"
    calib = args.data_dir / "wikitext-2-tokens" / "valid.txt"
    for f in (text, calib):
        if not f.is_file():
            raise SystemExit(f"missing data file {f}; pass --data-dir")

    from lbcc.calibration import load_tokenizer
    from lbcc.samples import prepare_smollm2

    sample = prepare_smollm2(args.model_cache)
    float_path, hf_dir = Path(sample["onnx"]).resolve(), Path(sample["hf_dir"]).resolve()
    names = select(args.only)
    ops = args.ort_static_op_types
    DESCRIPTION["ort-static"] = DESCRIPTION["ort-static"].format(
        ops="chosen by ORT (default)" if ops == "default" else ops.replace(",", ", "))
    machine = machine_info()

    # 1-2. build every quantized model, one child process each
    models: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {FLOAT: float_path}
    t_build = time.perf_counter()
    for name in names:
        if name == FLOAT:
            continue
        out = out_dir / f"{name}.onnx"
        prev_build = builds.get(name)
        reusable = (out.is_file() and prev_build is not None
                    and prev_build.get("build_settings") == build_settings(name, args))
        if (args.reuse or (args.skip_baselines and name in BASELINES)) and reusable:
            print(f"[build] {name}: reusing {out} (built {prev_build.get('date', '?')})")
            models[name] = {"build": dict(prev_build, reused=True)}
            paths[name] = out
            continue
        if args.skip_baselines and name in BASELINES:
            print(f"[build] {name}: skipped (--skip-baselines, nothing to reuse)")
            continue
        if name in NEEDS_VNNI and not machine["vnni"]:
            models[name] = {"build": {"error": "not run: this CPU has no VNNI / AMX, where "
                                               "ONNX Runtime's u8 x s8 kernels saturate"}}
            print(f"[build] {name}: {models[name]['build']['error']}")
            continue
        rec = run_job(name, float_path, out, args, calib, hf_dir, log_dir)
        rec["date"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        rec["build_settings"] = build_settings(name, args)
        models[name] = {"build": rec}
        if "error" not in rec:
            paths[name] = out
            builds[name] = rec
        else:
            builds.pop(name, None)
        builds_path.write_text(json.dumps(builds, indent=2, default=str))
    build_seconds = time.perf_counter() - t_build

    # 3. evaluate: perplexity + size per model, then interleaved latency
    t_eval = time.perf_counter()
    tokenizer = load_tokenizer(hf_dir)
    evals = evaluate_models(paths, text, tokenizer, args)
    eval_seconds = time.perf_counter() - t_eval
    ordered: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == FLOAT or name in models or name in evals:
            m = dict(models.get(name, {}))
            m.update(evals.get(name, {"error": (m.get("build") or {}).get("error", "not built")}))
            m["path"] = str(paths.get(name, out_dir / f"{name}.onnx"))
            m["description"] = DESCRIPTION[name]
            ordered[name] = m
    predicted = next((m.get("predicted_tokens") for m in ordered.values()
                      if m.get("predicted_tokens")), 0)

    machine["loadavg_end"] = _loadavg()
    res: dict[str, Any] = {
        "command": command,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": git_revision(),
        "lbcc_source_sha256": source_digest(),
        "machine": machine,
        "versions": versions(),
        "settings": {"max_tokens": args.max_tokens, "seq_len": args.seq_len,
                     "threads": args.threads, "calib_samples": args.calib_samples,
                     "latency_repeats": args.latency_repeats,
                     "latency_repeats_seq1": args.latency_repeats_seq1,
                     "latency_warmup": args.latency_warmup, "predicted_tokens": predicted,
                     "ort_static_op_types": args.ort_static_op_types,
                     "eval_text": str(text), "calibration_text": str(calib),
                     "float_model": str(float_path), "tokenizer": str(hf_dir)},
        "models": ordered,
        "build_seconds": round(build_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "results_json": os.path.relpath(results_path, REPO) if results_path.is_relative_to(REPO)
        else str(results_path),
    }
    res["targets"] = check_targets(ordered)
    res["total_seconds"] = round(time.perf_counter() - t_start, 1)

    # 4. print, save JSON, write Markdown
    results_path.write_text(json.dumps(res, indent=2, default=str))
    print()
    print(markdown_table(HEADER, table_rows(ordered)))
    print()
    for c in res["targets"]:
        print(f"  {c['model']:<18} {c['target']:<40} {c['measured'] or '-':<36} "
              f"{_status(c['met']).replace('**', '')}")
    print(f"\nbuild {build_seconds:.0f} s, evaluation {eval_seconds:.0f} s, total "
          f"{res['total_seconds']:.0f} s; raw numbers in {results_path}")
    if args.write_md:
        write_markdown(args.write_md, markdown_section(res))
        print(f"wrote the Markdown section to {args.write_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
