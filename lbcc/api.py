"""The Python API, the CLI's twin: :func:`compile` and :func:`build_pipeline`."""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import onnx_ir as ir

from lbcc.calibration import Feed, NpzFeed, RandomFeed, TextFeed, load_tokenizer
from lbcc.errors import BadInputError
from lbcc.irutils import initializer_bytes
from lbcc.kvcache import kv_layout
from lbcc.pipeline import DumpIR, Pass, Pipeline, PipelineContext, PipelineRun
from lbcc.recipes import Recipe, load_recipe, preset
from lbcc.report import Report, build_report
from lbcc.target import check_recipe, get_target


@dataclasses.dataclass
class CompileResult:
    model: ir.Model
    report: Report
    run: PipelineRun
    target: Any

    def save(self, path: str | os.PathLike, report_path: str | os.PathLike | None = None,
             external_data: bool | None = None) -> list[Path]:
        """Write the model (atomically) and, if asked, the JSON report; returns the paths."""
        from lbcc.evaluate import model_size_bytes

        path = Path(path)
        written = self.target.emit(self.model, path, external_data=external_data)
        size = (sum(p.stat().st_size for p in written) if path.is_dir()  # a C source directory
                else model_size_bytes(path))
        self.report.data["output"] = {"path": str(path), "bytes": size,
                                      "files": [str(p) for p in written]}
        if report_path is not None:
            self.report.write_json(report_path)
        return written


def make_feed(calibration: Any, tokenizer: Any = None, recipe: Recipe | None = None,
              model: ir.Model | None = None) -> Feed | None:
    """A calibration feed from a Feed, a .txt (+ tokenizer), a .npz, or ``"random:VOCAB"``."""
    if calibration is None or isinstance(calibration, Feed):
        return calibration
    spec = str(calibration)
    if spec.startswith("random:"):
        try:
            vocab = int(spec.split(":", 1)[1])
        except ValueError:
            raise BadInputError(f"--calib {spec!r}: expected random:VOCAB_SIZE.", "") from None
        seq_len = min(64, recipe.calibration.seq_len if recipe else 64)
        if model is not None and len(model.graph.inputs) == 1:
            shape = model.graph.inputs[0].shape
            if shape is not None and len(shape) == 2 and isinstance(shape[1], int):
                seq_len = shape[1]  # the model has a fixed sequence length
        return RandomFeed(vocab_size=vocab, seq_len=seq_len)
    path = Path(spec)
    if path.suffix == ".npz":
        return NpzFeed(path)
    if tokenizer is None:
        raise BadInputError(f"calibration text {spec!r} needs a tokenizer.",
                            "Add --tokenizer PATH (a tokenizer.json or the HF model directory).")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    cal = recipe.calibration if recipe else None
    return TextFeed(path, tok, seq_len=cal.seq_len if cal else 512,
                    max_samples=cal.samples if cal else 16)


def build_pipeline(recipe: Recipe, target: Any, context: PipelineContext | None = None,
                   calibrate: bool | None = None, kv_cache_dtype: str = "float") -> Pipeline:
    """The passes a recipe runs for a target, in order (``kv_cache_dtype``: one of the target's
    ``capabilities.kv_cache_dtypes``)."""
    from lbcc.passes import (AWQ, Calibrate, CaptureNormalize, DetectOutliers, FuseKVAttention,
                             FuseORT, InsertQDQ, MixedPrecision, RoundWeightsGPTQ, RoundWeightsRTN,
                             SelectPrecision, SmoothQuant)
    from lbcc.passes.calibrate import ACTIVATION_STATS, compute_activation_stats

    recipe = copy.deepcopy(recipe)  # passes may add per-layer rules (mixed precision)
    context = context or PipelineContext()
    context.analyses.providers[ACTIVATION_STATS] = compute_activation_stats
    if calibrate is None:
        calibrate = recipe.needs_calibration or context.calibration is not None
    # a KV-cache graph keeps its attention as exported and Q / K / V as separate layers while
    # precision is chosen (what the cache-free graph computes); attention is fused after
    # rounding, and the target packs Q / K / V where their plans agree
    passes: list[Pass] = [CaptureNormalize(), FuseORT(pack_qkv=False, kv_attention=False)]
    if calibrate:
        passes += [Calibrate(), DetectOutliers(recipe.activations.min_sqnr_db)]
    if (recipe.activations.criterion == "measured" or recipe.activations.method == "output"
            or recipe.activations.fallback == "dynamic-token"):
        context.keep_rows = max(context.keep_rows, 512)  # the per-layer SQNR is measured on rows
    if recipe.smoothing.method == "smoothquant":
        context.keep_rows = max(context.keep_rows, 512)
        static = recipe.activations.mode == "static"  # layers below min_sqnr_db fall back
        passes.append(SmoothQuant(alpha=recipe.smoothing.alpha, step=recipe.smoothing.step,
                                  min_sqnr_db=recipe.activations.min_sqnr_db if static
                                  else None, untie=recipe.smoothing.untie_lm_head,
                                  fallback=recipe.activations.fallback,
                                  token_fallback=recipe.activations.token_fallback))
    elif recipe.smoothing.method == "awq":
        context.keep_rows = max(context.keep_rows, 512)
        passes.append(AWQ(recipe))
    gptq = recipe.weights.method == "gptq"
    mp = recipe.mixed_precision
    if mp.enabled:
        passes.append(MixedPrecision(recipe, avg_bits=mp.avg_bits,
                                     max_ppl_increase=mp.max_ppl_increase, samples=mp.samples,
                                     tokens=mp.tokens))
    output_clip = recipe.weights.clip == "output" or any(o.clip == "output" for o in recipe.layers)
    context.second_moments = context.second_moments or gptq or output_clip
    rounding = RoundWeightsGPTQ(sequential=recipe.weights.sequential) if gptq \
        else RoundWeightsRTN()
    passes += [SelectPrecision(recipe, target.capabilities.int8_weight_max_exact), rounding]
    if recipe.activations.mode in ("static", "dynamic") or any(
            o.activations in ("static", "dynamic") for o in recipe.layers):
        passes.append(InsertQDQ())
    passes.append(FuseKVAttention())
    passes += target.passes(recipe) if kv_cache_dtype == "float" \
        else target.passes(recipe, kv_cache_dtype=kv_cache_dtype)
    return Pipeline(passes, context)


def check_kv_cache_dtype(dtype: str, target: Any) -> None:
    """A KV-cache element type is a target question, answered before any work."""
    from lbcc.errors import TargetError

    supported = target.capabilities.kv_cache_dtypes
    if dtype in supported:
        return
    if dtype in ("int8", "int4", "fp8"):
        raise TargetError(f"target {target.name!r} cannot keep the KV cache in {dtype}: it "
                          f"keeps it in {' or '.join(sorted(supported))}.",
                          "Use --kv-cache-dtype " + " or ".join(sorted(supported)) + ".")
    raise BadInputError(f"unknown KV-cache dtype {dtype!r}.", "Use float or int8.")


def resolve_recipe(preset_name: str | None, recipe: str | os.PathLike | Recipe | None,
                   group_size: int | None = None) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe is not None:
        r = load_recipe(recipe, default_base=preset_name)
        if group_size is not None:
            r.weights.group_size = group_size
        return r
    return preset(preset_name or "w8a8", group_size=group_size)


def require_calibration(rec: Recipe, feed: Any) -> None:
    """A clear error when ``rec`` computes something from calibration data and ``feed`` is None:
    what it computes, and the preset of the same kind that needs none."""
    if not rec.needs_calibration or feed is not None:
        return
    uses = rec.calibration_uses
    alternative = "w4a16 or w4a16-e4" if rec.weights.bits == 4 else "w8a8-dynamic"
    raise BadInputError(f"preset/recipe {rec.name!r} needs calibration data, for "
                        f"{', '.join(uses[:-1]) + ' and ' if len(uses) > 1 else ''}{uses[-1]}.",
                        "Pass --calib FILE.txt --tokenizer T (real text from the model's "
                        "domain, not the evaluation set), or --calib FILE.npz; or use "
                        f"--preset {alternative}, which "
                        f"{'need' if ' or ' in alternative else 'needs'} none.")


def compile(source: Any, target: str = "ort-int8", preset: str | None = None,
            recipe: str | os.PathLike | Recipe | None = None, calibration: Any = None,
            tokenizer: Any = None, *, group_size: int | None = None,
            stop_after: str | None = None, dump_ir: str | os.PathLike | None = None,
            example_inputs: tuple | None = None, progress: bool = True,
            command: Sequence[str] | None = None, kv_cache: bool = False,
            kv_cache_dtype: str = "float") -> CompileResult:
    """Compile ``source`` for ``target`` with a preset or a recipe; see the README.

    ``kv_cache=True`` captures HF / GGUF models as the prefill + decode graph with a KV cache
    (:mod:`lbcc.kvcache`), the graph :mod:`lbcc.generate` runs."""
    from lbcc.capture import capture

    start = time.perf_counter()
    rec = resolve_recipe(preset, recipe, group_size)
    tgt = get_target(target)
    check_recipe(rec, tgt)
    check_kv_cache_dtype(kv_cache_dtype, tgt)
    model = capture(source, example_inputs, kv_cache=kv_cache)
    if kv_cache_dtype != "float" and kv_layout(model) is None:
        raise BadInputError(f"--kv-cache-dtype {kv_cache_dtype} needs a graph with a KV cache, "
                            "and this one has no past_key_values inputs.",
                            "Add --kv-cache (a Hugging Face or GGUF source), or give a KV-cache "
                            "ONNX file.")
    feed = make_feed(calibration, tokenizer, rec, model)
    require_calibration(rec, feed)
    if kv_cache_dtype != "float" and feed is None:
        raise BadInputError(f"--kv-cache-dtype {kv_cache_dtype} takes the cache's scales from "
                            "calibration data, and none was given.",
                            "Pass --calib FILE.txt --tokenizer T.")
    context = PipelineContext(calibration=feed, progress=progress)
    pipeline = build_pipeline(rec, tgt, context, kv_cache_dtype=kv_cache_dtype)
    if dump_ir is not None:
        pipeline.instruments.append(DumpIR(dump_ir))
    source_desc = str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    input_bytes = initializer_bytes(model)
    run = pipeline.run(model, stop_after=stop_after)
    report = build_report(run, rec, tgt.name, source=source_desc, input_bytes=input_bytes,
                          seconds=time.perf_counter() - start,
                          command=list(command) if command is not None else sys.argv)
    return CompileResult(model=run.model, report=report, run=run, target=tgt)

