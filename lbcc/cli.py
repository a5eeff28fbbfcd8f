"""The ``lbcc`` command line: compile, eval, passes, inspect.

Exit codes: 0 success; 1 bad input or usage; 2 the target cannot run what was asked; 3 an accuracy
gate was missed. Errors print one paragraph (what is wrong, what to do); ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from lbcc.errors import LbccError
from lbcc.recipes import PRESETS

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="lbcc: compile LLMs to low-bit ONNX Runtime models.")
err = Console(stderr=True)
out = Console()
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _state["debug"] = debug


def _fail(exc: BaseException) -> None:
    if _state["debug"]:
        raise exc
    if isinstance(exc, LbccError):
        err.print(f"[bold red]error:[/] {exc.message}" + (f"\n{exc.hint}" if exc.hint else ""),
                  highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc}\n"
              "This is a bug in lbcc; rerun with --debug for the traceback and report it.",
              highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command()
def compile(
    model: str = typer.Argument(..., help=".onnx file, Hugging Face directory or .gguf file"),
    output: Path = typer.Option(..., "-o", "--output", help="Output .onnx path (a directory for --target c)"),
    target: str = typer.Option("ort-int8", "--target"),
    preset: Optional[str] = typer.Option(None, "--preset", help=" | ".join(PRESETS)),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="TOML recipe file"),
    calib: Optional[str] = typer.Option(None, "--calib",
                                        help="calibration .txt (+ --tokenizer) or .npz"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer",
                                            help="tokenizer.json or HF model directory"),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="4-bit group size"),
    report: Optional[Path] = typer.Option(None, "--report", help="write the JSON report here"),
    stop_after: Optional[str] = typer.Option(None, "--stop-after", help="stop after this pass"),
    dump_ir: Optional[Path] = typer.Option(None, "--dump-ir", help="write the IR after each pass"),
    external_data: Optional[bool] = typer.Option(None, "--external-data/--no-external-data",
                                                 help="force external data (default: by size)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no table"),
    max_ppl_increase: Optional[float] = typer.Option(
        None, "--max-ppl-increase", help="accuracy gate: allowed relative perplexity increase "
        "on --eval-text (0.02 = 2 %); missed -> exit 3, the model and report still written"),
    eval_text: Optional[Path] = typer.Option(None, "--eval-text",
                                             help="evaluation text of the accuracy gate"),
    eval_tokens: int = typer.Option(8192, "--eval-tokens", help="tokens of --eval-text used"),
    eval_seq_len: int = typer.Option(512, "--eval-seq-len", help="perplexity window length"),
    auto_fallback: bool = typer.Option(False, "--auto-fallback",
                                       help="keep the most sensitive layers in float until the "
                                            "accuracy gate is met"),
    as_json: bool = typer.Option(False, "--json", help="print the JSON report on stdout"),
    kv_cache: bool = typer.Option(False, "--kv-cache",
                                  help="export with a KV cache (prefill + decode graph, for "
                                       "`lbcc generate`); HF directory or .gguf input"),
    kv_cache_dtype: str = typer.Option("float", "--kv-cache-dtype",
                                       help="float | int8 (ort-int8: GroupQueryAttention "
                                            "keeps the cache in int8, per-channel scales from "
                                            "--calib)"),
) -> None:
    """Compile MODEL for a target with a preset or a recipe."""
    import lbcc
    from lbcc.errors import AccuracyGateError, BadInputError
    from lbcc.modelio import check_output_path

    gate = None
    try:
        if preset is None and recipe is None:
            preset = "w8a8"
        from lbcc.target import get_target

        if getattr(get_target(target), "output_is_directory", False):  # e.g. --target c
            check_output_path(output / "model" if output.is_dir() else output)
        else:
            check_output_path(output)
        if report is not None:
            check_output_path(report)
        if max_ppl_increase is not None or eval_text is not None or auto_fallback:
            from lbcc.gates import gated_compile

            if kv_cache:
                raise BadInputError("the accuracy gate evaluates the no-cache graph.",
                                    "Compile without --kv-cache to gate, then with it to deploy.")

            if max_ppl_increase is None or eval_text is None or stop_after is not None:
                raise BadInputError("the accuracy gate needs --max-ppl-increase X and "
                                    "--eval-text FILE (with --tokenizer), and a full compile "
                                    "(no --stop-after).", "Add the missing option, or drop "
                                    "--auto-fallback / --eval-text.")
            result, gate = gated_compile(
                model, max_ppl_increase=max_ppl_increase, eval_text=eval_text,
                tokenizer=tokenizer, target=target, preset=preset, recipe=recipe,
                calibration=calib, group_size=group_size, eval_tokens=eval_tokens,
                seq_len=eval_seq_len,
                auto_fallback=auto_fallback, dump_ir=dump_ir, command=["lbcc", *sys.argv[1:]])
        else:
            result = lbcc.compile(model, target=target, preset=preset, recipe=recipe,
                                  calibration=calib, tokenizer=tokenizer, group_size=group_size,
                                  stop_after=stop_after, dump_ir=dump_ir,
                                  command=["lbcc", *sys.argv[1:]], kv_cache=kv_cache,
                                  kv_cache_dtype=kv_cache_dtype)
        result.save(output, report_path=report, external_data=external_data)
        if kv_cache and (Path(model) / "config.json").is_file():
            from lbcc.genai_config import write_genai_config

            write_genai_config(output, model)  # onnxruntime-genai can load the directory
    except (LbccError, Exception) as exc:  # noqa: BLE001 - every failure gets one paragraph
        _fail(exc)
        return
    if not quiet and not as_json:
        result.report.render(err)
    if as_json:
        out.print_json(result.report.to_json())
    else:
        out.print(f"wrote {output}" + (f" and {report}" if report else ""), highlight=False)
    if gate is not None:
        from lbcc.gates import gate_message

        if gate["passed"]:
            err.print(gate_message(gate), highlight=False, soft_wrap=True)
        else:
            _fail(AccuracyGateError(gate_message(gate) + ".",
                                    f"The model and its report were written ({output}). Allow a "
                                    "larger increase, use --auto-fallback, or a gentler preset."))


@app.command(name="eval")
def eval_(
    models: List[Path] = typer.Argument(..., help="one or more .onnx models"),
    text: Optional[Path] = typer.Option(None, "--text", help="evaluation text file"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer"),
    seq_len: int = typer.Option(512, "--seq-len"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens"),
    threads: int = typer.Option(2, "--threads"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Perplexity, latency (seq 128 and 1) and size of each model, side by side."""
    from lbcc.evaluate import evaluate

    try:
        if text is not None and tokenizer is None:
            raise LbccError("--text needs --tokenizer.", "Pass the model's tokenizer.json or "
                            "its Hugging Face directory.")
        results = evaluate(models, text, tokenizer, seq_len=seq_len, max_tokens=max_tokens,
                           threads=threads)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
        return
    if as_json:
        out.print_json(json.dumps({"seq_len": seq_len, "threads": threads,
                                   "results": [r.to_json() for r in results]}))
        return
    from rich.table import Table

    base = results[0]
    table = Table(title=f"eval (seq_len {seq_len}, {threads} threads; ratios vs the first model)")
    for col in ("model", "size MB", "ppl", "seq128 ms", "seq1 ms"):
        table.add_column(col)
    for r in results:
        def ratio(a: float | None, b: float | None) -> str:
            return f" ({a / b:.2f}x)" if a and b and r is not base else ""
        ppl = f"{r.perplexity:.3f}{ratio(r.perplexity, base.perplexity)}" if r.perplexity else "-"
        table.add_row(Path(r.model).name, f"{r.size_mb:.1f}{ratio(r.size_mb, base.size_mb)}", ppl,
                      f"{r.latency_ms[128]:.1f}{ratio(r.latency_ms[128], base.latency_ms[128])}",
                      f"{r.latency_ms[1]:.2f}{ratio(r.latency_ms[1], base.latency_ms[1])}")
    out.print(table)


@app.command()
def passes(
    preset: str = typer.Option("w8a8", "--preset"),
    recipe: Optional[Path] = typer.Option(None, "--recipe"),
    target: str = typer.Option("ort-int8", "--target"),
) -> None:
    """Print the pipeline a preset (or recipe) runs."""
    from lbcc.api import build_pipeline, resolve_recipe
    from lbcc.pipeline import PipelineContext
    from lbcc.target import check_recipe, get_target

    try:
        rec = resolve_recipe(preset, recipe)
        tgt = get_target(target)
        check_recipe(rec, tgt)
        pipe = build_pipeline(rec, tgt, PipelineContext(), calibrate=rec.needs_calibration)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
        return
    out.print(f"preset/recipe {rec.name!r} -> target {tgt.name!r}:", highlight=False)
    for line in pipe.describe():
        out.print(line, highlight=False, soft_wrap=True)


@app.command()
def inspect(
    model: str = typer.Argument(..., help=".onnx model (or HF directory / .gguf)"),
    calib: Optional[str] = typer.Option(None, "--calib",
                                        help="with calibration data: the outlier report"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Op histogram, weight sites and sizes; with --calib, per-layer outlier statistics."""
    from lbcc.api import make_feed
    from lbcc.capture import capture
    from lbcc.irutils import initializer_bytes, op_histogram
    from lbcc.passes import Calibrate, CaptureNormalize, DetectOutliers, FuseORT
    from lbcc.passes.calibrate import ACTIVATION_STATS, compute_activation_stats
    from lbcc.passes.sites import find_sites
    from lbcc.pipeline import Pipeline, PipelineContext

    try:
        m = capture(model)
        info: dict = {"ops": op_histogram(m), "initializer_bytes": initializer_bytes(m),
                      "opset": dict(m.opset_imports)}
        if calib is not None:
            ctx = PipelineContext(calibration=make_feed(calib, tokenizer, None, m))
            ctx.analyses.providers[ACTIVATION_STATS] = compute_activation_stats
            m = Pipeline([CaptureNormalize(), FuseORT(), Calibrate(), DetectOutliers()],
                         ctx).run(m).model
            info["outliers"] = ctx.notes["outliers"]
        sites, skipped = find_sites(m)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
        return
    info["float_weight_sites"] = [{"layer": s.layer, "op": s.node.op_type, "kind": s.kind,
                                   "shape": list(s.weight.const_value.shape)} for s in sites]
    info["not_sites"] = len(skipped)
    if as_json:
        out.print_json(json.dumps(info))
        return
    out.print(f"{model}: opset {info['opset']}, weights {info['initializer_bytes'] / 1e6:.1f} MB")
    out.print("ops: " + ", ".join(f"{k} {v}" for k, v in info["ops"].items()), highlight=False)
    out.print(f"{len(sites)} float weight sites, {len(skipped)} other MatMul/Gather nodes")
    if "outliers" in info:
        from rich.table import Table

        table = Table(title="outliers per weight-site input (output SQNR with a per-tensor "
                            "uint8 input; after SmoothQuant alpha=0.5)")
        for col in ("layer", "abs-max", "max/median", "kurtosis", ">6", ">20x med",
                    "SQNR dB", "smoothed dB", "verdict"):
            table.add_column(col, no_wrap=col in ("layer", "verdict"))
        short = {"fine for per-tensor int8": "fine (int8)", "smoothable": "smoothable",
                 "keep in higher precision / dynamic": "keep higher"}
        for r in info["outliers"]:
            table.add_row(r["layer"], f"{r['absmax']:.1f}", f"{r['max_over_median']:.0f}",
                          f"{r['kurtosis']:.0f}", str(r["channels_over_6"]),
                          str(r["channels_over_20x_median"]), f"{r['output_sqnr_db']:.1f}",
                          f"{r['smoothed_sqnr_db']:.1f}", short.get(r["verdict"], r["verdict"]))
        out.print(table)


@app.command(name="measure-c")
def measure_c(
    directory: Path = typer.Argument(..., help="output directory of lbcc compile --target c"),
    core: List[str] = typer.Option(["cortex-m4"], "--core",
                                   help="cortex-m4 (mps2-an386) and/or cortex-m3 (mps2-an385)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Flash, RAM and instructions per inference of generated C on an emulated Cortex-M."""
    try:
        from lbcc.targets.c.toolchain import CORES, measure

        for c in core:
            if c not in CORES:
                raise LbccError(f"unknown core {c!r}.", f"Use one of: {', '.join(CORES)}.")
        results = [measure(directory, c) for c in core]
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
        return
    if as_json:
        out.print_json(json.dumps(results))
        return
    from rich.table import Table

    table = Table(title=f"{directory} on emulated Cortex-M (QEMU -icount shift=0)")
    for col in ("core", "flash B", "RAM B (arena+data, stack)", "instructions/inference"):
        table.add_column(col)
    for r in results:
        table.add_row(f"{r['core']} ({r['machine']})", str(r["flash_bytes"]),
                      f"{r['ram_bytes']} ({r['static_ram_bytes']}, {r['stack_bytes']})",
                      f"{r['instructions_per_inference']:,.0f}")
    out.print(table)


# ----------------------------------------------------------------------------- lbcc debug

debug_app = typer.Typer(no_args_is_help=True,
                        help="Find where accuracy went: compare layers, bisect passes / layers.")
app.add_typer(debug_app, name="debug")


def _emit_json(data: dict, path: Optional[Path]) -> None:
    """Print ``data`` as JSON on stdout, or write it atomically to ``path``."""
    text = json.dumps(data, indent=2, default=str)
    if path is None:
        out.print_json(text)
        return
    from lbcc.modelio import check_output_path
    import os

    check_output_path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


@debug_app.command("compare")
def debug_compare(
    float_model: str = typer.Argument(..., help="the float model (.onnx, HF dir, .gguf)"),
    quant_model: str = typer.Argument(..., help="the compiled model (.onnx)"),
    calib: str = typer.Option(..., "--calib", help="samples: .txt (+ --tokenizer), .npz or "
                                                   "random:VOCAB"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer"),
    layers: str = typer.Option("sites", "--layers", help="sites (weight layers + outputs) | all"),
    max_samples: Optional[int] = typer.Option(None, "--max-samples"),
    numerics: str = typer.Option("deployed", "--numerics",
                                 help="deployed (ONNX Runtime's integer kernels) | qdq (Q/DQ run "
                                      "as written: the quantization's own error)"),
    check_fusions: bool = typer.Option(False, "--check-fusions",
                                       help="also run the unmodified model for the output rows"),
    rows: int = typer.Option(30, "--rows", help="rows shown in the table"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (schema_version) instead"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="also write the JSON"),
) -> None:
    """Per-layer SQNR / cosine / max error of QUANT's activations against FLOAT's, worst first."""
    from lbcc.debug import compare

    try:
        if layers not in ("sites", "all"):
            raise LbccError(f"--layers {layers!r}: expected sites or all.", "")
        result = compare(float_model, quant_model, calib, tokenizer=tokenizer, layers=layers,
                         max_samples=max_samples, numerics=numerics,
                         check_fusions=check_fusions, progress=True)
        if output is not None:
            _emit_json(result.to_json(), output)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
        return
    if as_json:
        _emit_json(result.to_json(), None)
    else:
        out.print(result.table(max_rows=rows))
        s = result.seconds
        for w in result.warnings:
            err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
        out.print(f"{len(result)} layers, {result.samples} samples; {s['total']:.1f} s (float "
                  f"{s['float']:.1f} s, quantized {s['quantized']:.1f} s, statistics "
                  f"{s['statistics']:.1f} s)", highlight=False)


@debug_app.command("bisect")
def debug_bisect(
    model: str = typer.Argument(..., help="the float model (.onnx, HF dir, .gguf)"),
    preset: Optional[str] = typer.Option(None, "--preset"),
    recipe: Optional[Path] = typer.Option(None, "--recipe"),
    target: str = typer.Option("ort-int8", "--target"),
    calib: Optional[str] = typer.Option(None, "--calib"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer"),
    metric: str = typer.Option("ppl", "--metric", help="ppl | output-error"),
    tolerance: float = typer.Option(0.02, "--tolerance",
                                    help="ppl: allowed relative increase; output-error: "
                                         "allowed relative L2 error"),
    eval_text: Optional[str] = typer.Option(None, "--eval-data", "--eval-text",
                                            help="held-out samples, .txt (+ --tokenizer) or "
                                                 ".npz (default: the --calib ones)"),
    eval_samples: int = typer.Option(8, "--eval-samples", help="samples measured per step"),
    no_layers: bool = typer.Option(False, "--no-layers", help="bisect the passes only"),
    restored: Optional[Path] = typer.Option(None, "--write-restored",
                                            help="write the compile with the culprit layers "
                                                 "kept in float here"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (schema_version) instead"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="also write the JSON"),
) -> None:
    """Which pass first pushes METRIC past TOLERANCE, and the fewest layers to keep in float."""
    from lbcc.bisect import bisect

    try:
        result = bisect(model, preset=preset or ("w8a8" if recipe is None else None),
                        recipe=recipe, target=target, calibration=calib, tokenizer=tokenizer,
                        metric=metric, tolerance=tolerance, eval_data=eval_text,
                        eval_samples=eval_samples, layers=not no_layers,
                        say=(lambda s: None) if as_json
                        else (lambda s: err.print(s, highlight=False)))
        if restored is not None and result.restored_run is not None:
            from lbcc.modelio import check_output_path, save_model

            check_output_path(restored)
            save_model(result.restored_run.model, restored)
        if output is not None:
            _emit_json(result.to_json(), output)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
        return
    if as_json:
        _emit_json(result.to_json(), None)
    else:
        result.render(out)


@debug_app.command("diff")
def debug_diff(
    a: str = typer.Argument(..., help="model before (e.g. DIR/004_calibrate.onnx of --dump-ir)"),
    b: str = typer.Argument(..., help="model after"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """What changed between two models: ops, nodes, initializers, layers."""
    from lbcc.capture import capture
    from lbcc.debug import diff

    try:
        d = diff(capture(a), capture(b))
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
        return
    if as_json:
        _emit_json(d, None)
        return
    out.print("ops: " + (", ".join(f"{k} {v:+d}" for k, v in d["ops"].items()) or "no change"),
              highlight=False)
    out.print(f"nodes: +{d['nodes']['added']} -{d['nodes']['removed']}; initializers: "
              f"+{len(d['initializers']['added'])} -{len(d['initializers']['removed'])} "
              f"changed {len(d['initializers']['changed'])}; layers changed: {len(d['layers'])}",
              highlight=False)
    for row in d["initializers"]["changed"][:20]:
        out.print(f"  {row['name']}: " + ", ".join(f"{k}={v}" for k, v in row.items()
                                                   if k != "name"), highlight=False)


@app.command(name="view")
def view_(
    source: str = typer.Argument(..., help="a model (.onnx, compiled or float) or a compile "
                                           "report (.json)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output",
                                          help="self-contained HTML page (no network)"),
    report: Optional[Path] = typer.Option(None, "--report", help="the compile report JSON"),
    compare: Optional[Path] = typer.Option(None, "--compare",
                                           help="a `lbcc debug compare -o` JSON: measured error"),
    dot: Optional[Path] = typer.Option(None, "--dot", help="also write Graphviz DOT here"),
    svg: Optional[Path] = typer.Option(None, "--svg", help="also write the graph as SVG here"),
    as_json: bool = typer.Option(False, "--json", help="print the view data as JSON"),
) -> None:
    """A picture of the layer graph: precision per layer, measured error, report on click."""
    from lbcc.view import (VIEW_SCHEMA_VERSION, render_dot, render_html, render_svg, stats_line,
                           view, write_atomic)

    try:
        if output is None and dot is None and svg is None and not as_json:
            raise LbccError("nothing to write.", "Pass -o view.html, --dot FILE, --svg FILE or "
                                                 "--json.")
        data = view(source, report=report, compare=compare)
        written = []
        if output is not None:
            written.append(write_atomic(output, render_html(data, title=Path(source).name)))
        if dot is not None:
            written.append(write_atomic(dot, render_dot(data)))
        if svg is not None:
            written.append(write_atomic(svg, render_svg(data)))
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
        return
    if as_json:
        _emit_json({"schema_version": VIEW_SCHEMA_VERSION, "kind": "view", **data,
                    "written": [str(p) for p in written]}, None)
        return
    out.print(stats_line(data), highlight=False)
    if written:
        out.print("wrote " + ", ".join(str(p) for p in written), highlight=False)
@app.command()
def generate(
    model: Path = typer.Argument(..., help="KV-cache .onnx model (lbcc compile --kv-cache)"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer",
                                            help="tokenizer.json or HF model directory"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="the prompt text"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    greedy: bool = typer.Option(True, "--greedy/--sample",
                                help="argmax (default), or top-p sampling"),
    top_p: Optional[float] = typer.Option(None, "--top-p",
                                          help="nucleus sampling mass (implies --sample)"),
    temperature: float = typer.Option(1.0, "--temperature"),
    seed: int = typer.Option(0, "--seed", help="sampling seed (reproducible output)"),
    threads: int = typer.Option(2, "--threads"),
    max_context: Optional[int] = typer.Option(None, "--max-context",
                                              help="context length (default: from the configs)"),
) -> None:
    """Generate text from a KV-cache model, streaming it, then print tokens/s."""
    from lbcc.generate import Generator

    try:
        if tokenizer is None:
            raise LbccError("lbcc generate needs --tokenizer.",
                            "Pass the model's tokenizer.json or its Hugging Face directory.")
        if not prompt.strip():
            raise LbccError("the prompt is empty.", "Pass a non-empty --prompt.")
        gen = Generator(model, tokenizer, threads=threads, max_context=max_context)
        stream = gen.generate(prompt, max_new_tokens, greedy=greedy and top_p is None,
                              top_p=top_p if top_p is not None else 0.9,
                              temperature=temperature, seed=seed)
        first = next(stream, None)  # errors (prompt too long) surface before any output
        if first is not None:
            sys.stdout.write(first)
            sys.stdout.flush()
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
        return
    st = gen.stats
    err.print(f"{st.prompt_tokens} prompt tokens, prefill {st.prefill_s * 1e3:.1f} ms; "
              f"{st.new_tokens} new tokens, decode {st.decode_tokens_per_s:.1f} tokens/s "
              f"({threads} threads)", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
