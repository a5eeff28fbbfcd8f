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
    output: Path = typer.Option(..., "-o", "--output", help="Output .onnx path"),
    target: str = typer.Option("ort-int8", "--target"),
    preset: Optional[str] = typer.Option(None, "--preset", help="w8a8 | w8a8-dynamic | w4a16"),
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
    kv_cache: bool = typer.Option(False, "--kv-cache",
                                  help="export with a KV cache (prefill + decode graph, for "
                                       "`lbcc generate`); HF directory or .gguf input"),
    kv_cache_dtype: str = typer.Option("float", "--kv-cache-dtype",
                                       help="float | int8 (int8: not supported by ort-int8)"),
) -> None:
    """Compile MODEL for a target with a preset or a recipe."""
    import lbcc
    from lbcc.modelio import check_output_path

    try:
        if preset is None and recipe is None:
            preset = "w8a8"
        check_output_path(output)
        if report is not None:
            check_output_path(report)
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
    if not quiet:
        result.report.render(err)
    out.print(f"wrote {output}" + (f" and {report}" if report else ""), highlight=False)


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
