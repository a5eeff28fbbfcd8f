"""Generation benchmark on the sample (SmolLM2-135M): lbcc KV-cache models vs onnxruntime-genai.

Models (all from the same HF weights, ``.cache/smollm2/hf``):

  lbcc-fp32        capture(kv_cache=True) + capture-normalize + fuse-ort (GQA with packed QKV and
                   rotary inside, skip-norm)
  lbcc-w8a8        lbcc.compile(..., kv_cache=True, preset="w8a8"), calibrated on 16 x 512 tokens of
                   wikitext-2-tokens/valid.txt
  lbcc-w4a16       the same with preset "w4a16" (RTN + clip search on the same calibration text;
                   the preset keeps the tied embedding / lm_head at 8 bits)
  lbcc-w4a16-e4    preset "w4a16-e4": 4-bit symmetric groups of 32 (no zero points) for every
                   weight, the tied embedding / lm_head included (onnxruntime-genai's int4
                   layout): one 4-bit table for GatherBlockQuantized and MatMulNBits
  lbcc-w4a16-e4-gptq  preset "w4a16-e4-gptq": the same layout with GPTQ rounding (same
                   calibration text)
  lbcc-w4a16-e4-gptq-g64  preset "w4a16-e4-gptq-g64": the same in groups of 64 (a tenth
                   fewer bytes a step); -kv8 with the int8 KV cache
  lbcc-w4a16-e4-kv8  lbcc-w4a16-e4 with --kv-cache-dtype int8: GroupQueryAttention keeps the
                   cache in int8 (per-channel scales calibrated on the compiled graph)
  (every lbcc 4-bit graph has each MLP's gate and up MatMulNBits packed into one: pack-nbits)
  genai-int4/fp32  ``python -m onnxruntime_genai.models.builder -i HF -p int4|fp32 -e cpu``
  nocache-*        the foundation's cache-free graphs (input_ids -> logits), as the reference for
                   perplexity and for generation without a cache

Measured, models interleaved round-robin, ``--threads`` intra-op threads:
- prefill: time of the first step (``--prompt`` tokens, from wiki.test.raw);
- decode: tokens/s over the next ``--new - 1`` tokens, greedy, no stop at EOS; lbcc models run
  through :class:`lbcc.generate.Generator` (past and present in one shared buffer a cache, as
  every present is a GroupQueryAttention output), genai models through onnxruntime-genai's own
  ``og.Generator`` (and through lbcc's Generator too, which reads their inputs the same way);
- no-cache "decode step": one forward pass of the cache-free graph at prompt + new/2 tokens (what
  each token costs when every step recomputes the whole sequence);
- perplexity: first ``--eval-tokens`` tokens of WikiText-2 test, 512-token windows, no BOS, each
  window one prefill of the cache graph;
- greedy identity: lbcc-fp32 tokens vs transformers' ``generate`` (greedy) for 64 tokens;
- decode in paired blocks: genai-int4 (its runtime), lbcc-w4a16-e4, lbcc-fp32, lbcc-w4a16-e4-kv8,
  lbcc-w4a16-e4-gptq and the two g64 models interleaved in 24 blocks of 16 decode steps (order
  rotated each block, a 50 ms pause before each model's turn so that the previous model's
  spinning threads are parked), speed as the median of per-block ratios (load that changes
  between rounds cancels out);
- work per decode step: process CPU time a step with 1 intra-op thread (no spinning, no waiting
  for a descheduled worker thread), models interleaved in blocks of 16 steps: the figure the
  machine's load disturbs least;
- where a decode step goes: ONNX Runtime's profiler over 32 decode steps (after the timed rounds),
  kernel time by op type, for lbcc-w4a16-e4 and genai-int4 (both under lbcc's runner).

    python benchmarks/generate.py --write-md BENCHMARKS-generate.md

onnxruntime-genai must be importable (``pip install onnxruntime-genai``); models are built once
into ``--out`` and reused (delete them after changing the passes).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from lbcc.evaluate import SETTLE_S
from run_sample import machine_info  # (this folder is on sys.path when a script here runs)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / ".cache" / "smollm2"
DATA = REPO.parent / "shared" / "data"
PROMPTS = ["The history of the Roman Empire", "def fibonacci(n):",
           "Water boils at a temperature of", "Once upon a time, in a small village,"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- building

def build(out: Path, hf_dir: Path) -> dict[str, Path]:
    """Build every model once (cached in ``out``); returns name -> .onnx path."""
    import onnx_ir as ir

    import lbcc
    from lbcc.capture import capture, load_hf_causal_lm
    from lbcc.modelio import save_model
    from lbcc.passes import CaptureNormalize, FuseORT
    from lbcc.pipeline import Pipeline, PipelineContext

    out.mkdir(parents=True, exist_ok=True)
    paths = {"lbcc-fp32": out / "fp32-kv.onnx", "lbcc-w8a8": out / "w8a8-kv.onnx",
             "lbcc-w4a16": out / "w4a16-kv.onnx", "lbcc-w4a16-e4": out / "w4a16-e4-kv.onnx",
             "lbcc-w4a16-e4-kv8": out / "w4a16-e4-kv8.onnx",
             "lbcc-w4a16-e4-gptq": out / "w4a16-e4-gptq-kv.onnx",
             "lbcc-w4a16-e4-gptq-g64": out / "w4a16-e4-gptq-g64-kv.onnx",
             "lbcc-w4a16-e4-gptq-g64-kv8": out / "w4a16-e4-gptq-g64-kv8.onnx",
             "nocache-fp32": SAMPLE / "model.onnx",
             "nocache-w8a8": out / "w8a8-nocache.onnx",
             "nocache-w4a16": out / "w4a16-nocache.onnx",
             "nocache-w4a16-e4": out / "w4a16-e4-nocache.onnx"}
    raw = out / "raw-kv.onnx"
    if not raw.exists():
        log("exporting the KV-cache graph")
        save_model(capture(load_hf_causal_lm(hf_dir), kv_cache=True), raw, external_data=True)
    calib = DATA / "wikitext-2-tokens" / "valid.txt"
    if not paths["lbcc-fp32"].exists():
        log("lbcc-fp32: normalize + fuse")
        run = Pipeline([CaptureNormalize(), FuseORT()], PipelineContext()).run(ir.load(raw))
        (out / "fp32-kv.fusions.json").write_text(json.dumps(run.records[-1].notes, indent=1))
        save_model(run.model, paths["lbcc-fp32"], external_data=True)
    jobs = [("lbcc-w4a16-e4", raw, "w4a16-e4"), ("lbcc-w4a16-e4-kv8", raw, "w4a16-e4", "int8"),
            ("lbcc-w4a16-e4-gptq", raw, "w4a16-e4-gptq"),
            ("lbcc-w4a16-e4-gptq-g64", raw, "w4a16-e4-gptq-g64"),
            ("lbcc-w4a16-e4-gptq-g64-kv8", raw, "w4a16-e4-gptq-g64", "int8"),
            ("lbcc-w4a16", raw, "w4a16"),
            ("nocache-w4a16", SAMPLE / "model.onnx", "w4a16"),
            ("nocache-w4a16-e4", SAMPLE / "model.onnx", "w4a16-e4"), ("lbcc-w8a8", raw, "w8a8"),
            ("nocache-w8a8", SAMPLE / "model.onnx", "w8a8")]
    for name, src, recipe, *kv_dtype in jobs:
        path = paths[name]
        if path.exists():
            continue
        log(f"compiling {path.name}")
        r = lbcc.compile(str(src), preset=recipe, calibration=str(calib), tokenizer=str(hf_dir),
                         progress=False, kv_cache_dtype=kv_dtype[0] if kv_dtype else "float")
        r.save(path, report_path=path.with_suffix(".json"), external_data=True)
    for prec in ("int4", "fp32"):
        d = out / f"genai-{prec}"
        if not (d / "genai_config.json").exists():
            log(f"onnxruntime-genai builder -p {prec}")
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                            str(hf_dir), "-o", str(d), "-p", prec, "-e", "cpu", "-c",
                            str(out / "hfcache")], check=True, capture_output=True)
        paths[f"genai-{prec}"] = d / "model.onnx"
    return paths


class FixedHeadDim:
    """An ORT session whose inputs report ``head_dim`` where the genai builder left the cache's
    last dim symbolic (``kv_cache_dim``); everything else is the session's."""

    def __init__(self, session: Any, head_dim: int):
        self._session, self._head_dim = session, head_dim

    def get_inputs(self) -> list:
        import types

        out = []
        for i in self._session.get_inputs():
            shape = list(i.shape)
            if i.name.startswith("past_key_values.") and len(shape) == 4 \
                    and not isinstance(shape[3], int):
                shape[3] = self._head_dim
            out.append(types.SimpleNamespace(name=i.name, shape=shape, type=i.type))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def session_for(path: Path, threads: int) -> Any:
    from lbcc.evaluate import make_session

    sess = make_session(path, threads)
    cfg = path.parent / "genai_config.json"
    if path.parent.name.startswith("genai-") and cfg.exists():
        return FixedHeadDim(sess, json.loads(cfg.read_text())["model"]["decoder"]["head_size"])
    return sess


def set_genai_threads(d: Path, threads: int) -> None:
    cfg_path = d / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    cfg["model"]["decoder"]["session_options"]["inter_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=4))


# ----------------------------------------------------------------------------- measuring

def size_mb(path: Path) -> float:
    from lbcc.evaluate import model_size_bytes

    return model_size_bytes(path) / 1e6


def lbcc_decode(gen: Any, prompt: np.ndarray, new: int) -> tuple[float, float, list[int]]:
    toks = list(gen.generate_ids(prompt, new, stop_at_eos=False))
    return gen.stats.prefill_s, gen.stats.decode_tokens_per_s, toks


def genai_decode(model: Any, prompt: np.ndarray, new: int) -> tuple[float, float, list[int]]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(prompt) + new
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    t = time.perf_counter()
    gen.append_tokens(prompt.astype(np.int32).tolist())  # runs the prompt (prefill)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
    decode = time.perf_counter() - t
    toks = [int(x) for x in gen.get_sequence(0)[len(prompt):]]
    steps = max(len(toks) - 1, 1)  # the first new token comes from the prefill's logits
    return prefill, steps / decode, toks


def nocache_step_ms(sess: Any, length: int, repeats: int) -> float:
    from lbcc.evaluate import latency_ms

    return latency_ms(sess, length, repeats=repeats, warmup=1)


def profile_decode(path: Path, hf_dir: Path, threads: int, prompt: np.ndarray, steps: int,
                   prefix: Path) -> dict[str, Any]:
    """Where a decode step goes: ONNX Runtime's profiler over ``steps`` decode steps after a
    prefill of ``prompt``, kernel time by op type (ms a step), the median ``model_run`` (kernels +
    executor) and the runner's step time (+ binding and sampling in Python)."""
    import collections
    import os

    import onnxruntime as ort

    from lbcc.generate import Generator

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    so.enable_profiling, so.profile_file_prefix = True, str(prefix)
    sess: Any = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    cfg = path.parent / "genai_config.json"
    if path.parent.name.startswith("genai-") and cfg.exists():
        sess = FixedHeadDim(sess, json.loads(cfg.read_text())["model"]["decoder"]["head_size"])
    gen = Generator(path, hf_dir, threads=threads, session=sess)
    list(gen.generate_ids(prompt, steps + 1, stop_at_eos=False))
    trace = sess.end_profiling()
    events = json.loads(Path(trace).read_text())
    os.remove(trace)
    runs = [e for e in events if e.get("name") == "model_run"]
    t0 = runs[1]["ts"]  # the first decode step
    ops: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t0:
            ops[e["args"].get("op_name", "?")] += e["dur"]
    return {"ops_ms": {k: v / steps / 1e3 for k, v in ops.most_common()},
            "run_ms": statistics.median(e["dur"] for e in runs[1:]) / 1e3,
            "step_ms": gen.stats.decode_s / steps * 1e3,
            "share_buffer": gen.share_buffer}


def cpu_per_step(paths: dict[str, Path], hf_dir: Path, prompt: np.ndarray, steps: int,
                 block: int = 16) -> dict[str, float]:
    """Median process CPU ms a decode step, 1 intra-op thread, lbcc's runner, the models
    interleaved in blocks of ``block`` steps after one prefill each."""
    from lbcc.generate import Generator

    its = {}
    for name, path in paths.items():
        gen = Generator(path, hf_dir, threads=1, session=session_for(path, 1))
        its[name] = gen.generate_ids(prompt, steps + 1, stop_at_eos=False)
        next(its[name])  # the prefill
    cpu: dict[str, list[float]] = {n: [] for n in paths}
    for _ in range(0, steps, block):
        for name, it in its.items():
            start = time.process_time()
            for _ in range(block):
                next(it)
            cpu[name].append((time.process_time() - start) / block * 1e3)
    return {n: statistics.median(v) for n, v in cpu.items()}


def paired_blocks(steppers: dict[str, Any], blocks: int, block: int) -> dict[str, Any]:
    """ms a decode step at the benchmark's thread count, the models interleaved in blocks of
    ``block`` steps (the order rotated every block, so each model runs first, in the middle and
    last equally often; ``lbcc.evaluate.SETTLE_S`` before each: ONNX Runtime's and genai's
    workers spin after a run, and the previous model's would take a core), and each model's
    speed relative to the first as the median of per-block ratios: on a shared machine, load
    that changes from one round of 128 tokens to the next cancels out of a ratio taken a block
    at a time."""
    ms: dict[str, list[float]] = {n: [] for n in steppers}
    names = list(steppers)
    for b in range(blocks):
        for name in names[b % len(names):] + names[:b % len(names)]:
            step = steppers[name]
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            for _ in range(block):
                step()
            ms[name].append((time.perf_counter() - start) / block * 1e3)
    first = ms[names[0]]
    return {n: {"ms_per_step": statistics.median(v),
                "speed_vs_first": 1 / statistics.median(a / b for a, b in zip(v, first))}
            for n, v in ms.items()}


def steppers_for(runners: dict[str, Any], names: tuple[str, ...], prompt: np.ndarray,
                 steps: int) -> dict[str, Any]:
    """One decode step a call for each model, after its prefill (not timed)."""
    import onnxruntime_genai as og

    out: dict[str, Any] = {}
    for name in names:
        kind, r = runners[name]
        if kind == "lbcc":
            it = r.generate_ids(prompt, steps + 2, stop_at_eos=False)
            next(it)
            out[name] = lambda it=it: next(it)
        else:
            params = og.GeneratorParams(r)
            total = len(prompt) + steps + 2
            params.set_search_options(max_length=total, min_length=total, do_sample=False)
            gen = og.Generator(r, params)
            gen.append_tokens(prompt.astype(np.int32).tolist())
            out[name] = lambda gen=gen, params=params: gen.generate_next_token()
    return out


def load_average() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "-"


def hf_greedy(hf_dir: Path, tokenizer: Any, n: int) -> dict[str, list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    out = {}
    for p in PROMPTS:
        ids = torch.tensor([tokenizer.encode(p).ids])
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)
        out[p] = g[0, ids.shape[1]:].tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "generate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--write-md", type=Path)
    args = ap.parse_args()

    import onnxruntime_genai as og

    from lbcc.calibration import load_tokenizer, tokenize_text
    from lbcc.evaluate import make_session, perplexity
    from lbcc.generate import Generator

    start = time.time()
    load_start = load_average()
    hf_dir = SAMPLE / "hf"
    paths = build(args.out, hf_dir)
    if args.build_only:
        return
    tok = load_tokenizer(hf_dir)
    text = tokenize_text(DATA / "wikitext-2-raw" / "wiki.test.raw", tok, "evaluation text")
    prompt = text[1000:1000 + args.prompt]
    eval_ids = text[: args.eval_tokens]

    log("perplexity")
    ppl = {}
    for name, path in paths.items():
        sess = session_for(path, args.threads)
        ppl[name] = perplexity(sess, eval_ids, 512)[0]
        log(f"  {name}: {ppl[name]:.4f}")
        del sess

    log("greedy identity vs transformers")
    ref = hf_greedy(hf_dir, tok, 64)
    fp32 = Generator(paths["lbcc-fp32"], hf_dir, threads=args.threads)
    identical = {p: list(fp32.generate_ids(np.array(tok.encode(p).ids), 64,
                                           stop_at_eos=False)) == ref[p] for p in PROMPTS}
    log(f"  {identical}")
    del fp32

    log("decode speed")
    runners: dict[str, Any] = {}
    for name in ("lbcc-fp32", "lbcc-w8a8", "lbcc-w4a16", "lbcc-w4a16-e4", "lbcc-w4a16-e4-kv8",
                 "lbcc-w4a16-e4-gptq", "lbcc-w4a16-e4-gptq-g64", "lbcc-w4a16-e4-gptq-g64-kv8"):
        runners[name] = ("lbcc", Generator(paths[name], hf_dir, threads=args.threads))
    for prec in ("int4", "fp32"):
        d = paths[f"genai-{prec}"].parent
        set_genai_threads(d, args.threads)
        runners[f"genai-{prec}"] = ("og", og.Model(str(d)))
        runners[f"genai-{prec} (lbcc runner)"] = (
            "lbcc", Generator(paths[f"genai-{prec}"], hf_dir, threads=args.threads,
                              session=session_for(paths[f"genai-{prec}"], args.threads)))
    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "tps": []} for n in runners}
    names = list(runners)
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for name in order:
            kind, r = runners[name]
            fn = lbcc_decode if kind == "lbcc" else genai_decode
            time.sleep(SETTLE_S)
            pre, tps, _ = fn(r, prompt, args.new)
            times[name]["prefill"].append(pre * 1e3)
            times[name]["tps"].append(tps)
            log(f"  round {rnd}: {name}: prefill {pre * 1e3:.1f} ms, {tps:.1f} tok/s")
    log("decode, paired blocks")
    paired_names = ("genai-int4", "lbcc-w4a16-e4", "lbcc-fp32", "lbcc-w4a16-e4-kv8",
                    "lbcc-w4a16-e4-gptq", "lbcc-w4a16-e4-gptq-g64", "lbcc-w4a16-e4-gptq-g64-kv8")
    paired = paired_blocks(steppers_for(runners, paired_names, prompt, 24 * 16), 24, 16)
    log(json.dumps(paired))
    log("work per decode step (1 thread, CPU time)")
    cpu_names = ("lbcc-fp32", "lbcc-w4a16", "lbcc-w4a16-e4", "lbcc-w4a16-e4-gptq-g64",
                 "genai-int4")
    cpu_ms = cpu_per_step({n: paths[n] for n in cpu_names}, hf_dir, prompt, 96)
    log(json.dumps(cpu_ms))
    log("profile of the decode step")
    profile = {name: profile_decode(paths[name], hf_dir, args.threads, prompt, 32,
                                    args.out / f"profile-{name}")
               for name in ("lbcc-w4a16-e4", "genai-int4")}
    log(json.dumps(profile, indent=1))
    nocache = {}
    for name in ("nocache-fp32", "nocache-w8a8", "nocache-w4a16"):
        sess = make_session(paths[name], args.threads)
        nocache[name] = nocache_step_ms(sess, args.prompt + args.new // 2, args.rounds + 1)
        del sess
    results = {
        "ppl": ppl, "greedy_identical_64": identical,
        "decode": {n: {"prefill_ms": statistics.median(v["prefill"]),
                       "tokens_per_s": statistics.median(v["tps"])} for n, v in times.items()},
        "nocache_step_ms": nocache, "size_mb": {n: size_mb(p) for n, p in paths.items()},
        "profile": profile, "cpu_ms_per_step_1thread": cpu_ms, "paired_blocks": paired,
        "load_average": {"start": load_start, "end": load_average()},
        "machine": machine_info(),
        "fusions": json.loads((args.out / "fp32-kv.fusions.json").read_text())
        if (args.out / "fp32-kv.fusions.json").exists() else None,
        "seconds": time.time() - start,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    log(json.dumps(results["decode"], indent=1))
    if args.write_md:
        write_md(args, results)


def write_md(args: argparse.Namespace, res: dict[str, Any]) -> None:
    def v(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "-"

    dec = res["decode"]
    base = dec["lbcc-fp32"]
    # (results.json from before the CPU was recorded: say so rather than describe this machine)
    cpu = res.get("machine") or {"cpu": "CPU not recorded", "vnni": None, "logical_cpus": "?"}
    vnni = {True: "with VNNI", False: "without VNNI"}.get(cpu["vnni"], "VNNI not recorded")
    lines = [
        "# Generation benchmark (KV cache)", "",
        f"Sample: SmolLM2-135M (`.cache/smollm2/hf`). Prompt {args.prompt} tokens of WikiText-2 "
        f"test, {args.new} new tokens, greedy, {args.threads} threads, {args.rounds} rounds "
        "interleaved (median). Decode tokens/s excludes the prefill step.", "",
        f"Command: `python benchmarks/generate.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {cpu['cpu']} ({vnni}), "
        f"{cpu['logical_cpus']} cores, {cpu.get('platform', 'platform not recorded')}; "
        "load average before the run "
        f"{res['load_average']['start']}, at its end {res['load_average']['end']} (its own "
        "threads included). The machine is shared and noisy: compare ratios within this table "
        "(and the paired blocks below), not absolute figures across runs.  ",
        f"Versions: onnxruntime {v('onnxruntime')}, onnxruntime-genai {v('onnxruntime-genai')}, "
        f"torch {v('torch')}, transformers {v('transformers')}, onnxscript {v('onnxscript')}.  ",
        f"Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
        "| model | prefill ms | decode tok/s | decode step ms | x lbcc-fp32 step | size MB | "
        "ppl (4096 tok) |", "|---|---|---|---|---|---|---|"]
    ppl_key = {"genai-int4 (lbcc runner)": "genai-int4", "genai-fp32 (lbcc runner)": "genai-fp32"}
    for name, d in dec.items():
        key = ppl_key.get(name, name)
        step = 1e3 / d["tokens_per_s"] if d["tokens_per_s"] else float("nan")
        lines.append(f"| {name} | {d['prefill_ms']:.1f} | {d['tokens_per_s']:.1f} | {step:.2f} | "
                     f"{base['tokens_per_s'] / d['tokens_per_s']:.2f} | "
                     f"{res['size_mb'].get(key, float('nan')):.1f} | "
                     f"{res['ppl'].get(key, float('nan')):.4f} |")
    for name, ms in res["nocache_step_ms"].items():
        lines.append(f"| {name} (no cache: one forward at {args.prompt + args.new // 2} tokens "
                     f"per token) | - | {1e3 / ms:.1f} | {ms:.2f} | - | "
                     f"{res['size_mb'][name]:.1f} | {res['ppl'][name]:.4f} |")
    g4, g4r = dec["genai-int4"]["tokens_per_s"], dec["genai-int4 (lbcc runner)"]["tokens_per_s"]
    fp32_tps, fp32_mb = dec["lbcc-fp32"]["tokens_per_s"], res["size_mb"]["lbcc-fp32"]
    cpu = res["cpu_ms_per_step_1thread"]
    pe4 = res["paired_blocks"]["lbcc-w4a16-e4"]["speed_vs_first"]
    pfp32 = res["paired_blocks"]["lbcc-fp32"]["speed_vs_first"]
    lines += ["", "## Against the issue's targets", "",
              "lbcc-w4a16-e4 is the preset `w4a16-e4` (4-bit symmetric groups of 32 for every "
              "weight, the tied embedding / lm_head included: the issue's size target); "
              "lbcc-w4a16 is the preset `w4a16` (asymmetric groups of 128, 8-bit embedding); "
              "lbcc-w4a16-e4-gptq-g64 is the preset `w4a16-e4-gptq-g64` (the same in groups of "
              "64, GPTQ rounding), -kv8 with the int8 KV cache.", ""]
    for name in ("lbcc-w4a16-e4", "lbcc-w4a16", "lbcc-w4a16-e4-gptq-g64",
                 "lbcc-w4a16-e4-gptq-g64-kv8"):
        w4 = dec[name]["tokens_per_s"]
        lines += [
            f"- {name} decode vs onnxruntime-genai int4 (its runtime): {w4 / g4:.2f}x tokens/s "
            f"(target >= 1.1x); vs genai-int4 under lbcc's runner: {w4 / g4r:.2f}x; perplexity "
            f"{res['ppl'][name]:.4f} vs genai-int4 {res['ppl']['genai-int4']:.4f}.",
            f"- {name} decode step / lbcc-fp32 decode step: {fp32_tps / w4:.3f} "
            "(target <= 0.25).",
            f"- {name} size / lbcc-fp32 size: {res['size_mb'][name] / fp32_mb:.3f} "
            "(target <= 0.16 with the embedding quantized)."]
    lines += [
        "- perplexity, cache graph vs cache-free graph of the same preset: " + ", ".join(
            f"{p} {100 * (res['ppl'][f'lbcc-{p}'] / res['ppl'][f'nocache-{p}'] - 1):+.3f} %"
            for p in ("fp32", "w8a8", "w4a16", "w4a16-e4")) + " (target within 0.1 %).",
        f"- int8 KV cache (lbcc-w4a16-e4-kv8 vs lbcc-w4a16-e4, same weights): perplexity "
        f"{res['ppl']['lbcc-w4a16-e4-kv8']:.4f} vs {res['ppl']['lbcc-w4a16-e4']:.4f} "
        f"({100 * (res['ppl']['lbcc-w4a16-e4-kv8'] / res['ppl']['lbcc-w4a16-e4'] - 1):+.3f} %); "
        f"decode {dec['lbcc-w4a16-e4-kv8']['tokens_per_s'] / dec['lbcc-w4a16-e4']['tokens_per_s']:.2f}x "
        "by round medians, "
        f"{res['paired_blocks']['lbcc-w4a16-e4-kv8']['speed_vs_first'] / pe4:.3f}x in paired "
        "blocks; vs genai-int4 (its runtime) "
        f"{res['paired_blocks']['lbcc-w4a16-e4-kv8']['speed_vs_first']:.3f}x in paired blocks.",
        f"- GPTQ rounding (lbcc-w4a16-e4-gptq vs lbcc-w4a16-e4, same layout): perplexity "
        f"{res['ppl']['lbcc-w4a16-e4-gptq']:.4f} vs {res['ppl']['lbcc-w4a16-e4']:.4f} (genai-int4 "
        f"{res['ppl']['genai-int4']:.4f}); decode "
        f"{res['paired_blocks']['lbcc-w4a16-e4-gptq']['speed_vs_first'] / pe4:.3f}x lbcc-w4a16-e4 "
        "and "
        f"{res['paired_blocks']['lbcc-w4a16-e4-gptq']['speed_vs_first']:.3f}x genai-int4 (its "
        "runtime) in paired blocks.",
        "- groups of 64 (GPTQ) against genai-int4 (its runtime), paired blocks: "
        f"lbcc-w4a16-e4-gptq-g64 "
        f"{res['paired_blocks']['lbcc-w4a16-e4-gptq-g64']['speed_vs_first']:.3f}x, with the "
        "int8 KV cache "
        f"{res['paired_blocks']['lbcc-w4a16-e4-gptq-g64-kv8']['speed_vs_first']:.3f}x "
        "(target >= 1.1x); step / lbcc-fp32 step "
        f"{pfp32 / res['paired_blocks']['lbcc-w4a16-e4-gptq-g64-kv8']['speed_vs_first']:.3f} "
        "with the int8 cache (target <= 0.25).",
        f"- lbcc-fp32 greedy tokens identical to transformers for 64 tokens: "
        f"{sum(res['greedy_identical_64'].values())}/{len(res['greedy_identical_64'])} prompts.",
        "", f"Decode in paired blocks ({args.threads} threads, 24 blocks of 16 steps, the models "
        "interleaved block by block in rotated order, 50 ms pause before each; speed = median of "
        "per-block ratios): " + ", ".join(
            f"{n} {d['ms_per_step']:.2f} ms a step" for n, d in res["paired_blocks"].items())
        + f"; lbcc-w4a16-e4 vs genai-int4 (its runtime) {pe4:.3f}x tokens/s (target >= 1.1x), "
        f"lbcc-w4a16-e4 step / lbcc-fp32 step {pfp32 / pe4:.3f} (target <= 0.25).",
        "", "Work per decode step, 1 intra-op thread (process CPU time, median of blocks of "
        "16 steps, models interleaved): " + ", ".join(f"{n} {ms:.2f} ms" for n, ms in cpu.items())
        + f"; lbcc-w4a16-e4 / genai-int4 {cpu['lbcc-w4a16-e4'] / cpu['genai-int4']:.3f}, "
        f"lbcc-w4a16-e4 / lbcc-fp32 {cpu['lbcc-w4a16-e4'] / cpu['lbcc-fp32']:.3f}.",
        "", "Fusions on the lbcc KV-cache graph (fuse-ort notes):", "", "```",
        json.dumps(res.get("fusions"), indent=1), "```", ""]
    prof = res.get("profile") or {}
    if prof:
        names = list(prof)
        ops = sorted({op for p in prof.values() for op in p["ops_ms"]},
                     key=lambda op: -max(p["ops_ms"].get(op, 0.0) for p in prof.values()))
        lines += ["## Where a decode step goes", "",
                  "ONNX Runtime's profiler, 32 decode steps after the same 128-token prompt, both "
                  "models under lbcc's runner (shared past/present buffers: "
                  + ", ".join(f"{n} {p['share_buffer']}" for n, p in prof.items())
                  + "); ms a step. Profiling adds its own overhead: compare columns, not with "
                  "the table above.", "",
                  "| op type | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for op in ops:
            if max(p["ops_ms"].get(op, 0.0) for p in prof.values()) < 0.05:
                continue
            lines.append(f"| {op} | " + " | ".join(f"{prof[n]['ops_ms'].get(op, 0.0):.2f}"
                                                   for n in names) + " |")
        lines += ["| all kernels | " + " | ".join(f"{sum(prof[n]['ops_ms'].values()):.2f}"
                                                  for n in names) + " |",
                  "| session run (kernels + executor) | " + " | ".join(
                      f"{prof[n]['run_ms']:.2f}" for n in names) + " |",
                  "| runner step (+ binding, sampling) | " + " | ".join(
                      f"{prof[n]['step_ms']:.2f}" for n in names) + " |", ""]
    args.write_md.write_text("\n".join(lines))
    log(f"wrote {args.write_md}")


if __name__ == "__main__":
    main()
