"""One quantization job of ``run_sample.py``, run in its own process.

``run_sample.py`` starts this script once per baseline / lbcc preset so that the wall time and the
peak RSS it reads (``os.wait4`` rusage of exactly this child) belong to one tool and nothing else.
Each job imports only what it needs: the ONNX Runtime baselines never import lbcc, and the lbcc jobs
never import ``onnxruntime.quantization``.

    python benchmarks/_bench_worker.py JOB --float model.onnx --out out.onnx --result job.json \
        [--calib valid.txt --tokenizer HF_DIR --calib-samples 16 --seq-len 512]

JOB is one of the keys of ``JOBS`` below (``--help`` lists them).
The result JSON holds the seconds spent inside the job (load + quantize + save, without interpreter
start-up and imports), the settings used, and for lbcc the compile report's summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def _calibration_windows(calib: Path, tokenizer_dir: Path, samples: int, seq_len: int) -> list:
    """The windows lbcc's TextFeed uses: the first ``samples`` x ``seq_len`` ids, no BOS."""
    import numpy as np
    from tokenizers import Tokenizer

    tok_path = tokenizer_dir / "tokenizer.json" if tokenizer_dir.is_dir() else tokenizer_dir
    tok = Tokenizer.from_file(str(tok_path))
    text = calib.read_text(encoding="utf-8", errors="replace")
    ids = np.asarray(tok.encode_batch([text], add_special_tokens=False)[0].ids, dtype=np.int64)
    n = max(1, min(samples, len(ids) // seq_len))
    return [ids[i * seq_len:(i + 1) * seq_len][None, :] for i in range(n)]


def _calibration_reader(args: argparse.Namespace) -> Any:
    """An ORT CalibrationDataReader over the calibration windows lbcc uses."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    windows = _calibration_windows(args.calib, args.tokenizer, args.calib_samples, args.seq_len)
    input_name = onnx.load(str(args.float), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        count = len(windows)

        def __init__(self) -> None:
            self._it = iter(windows)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {input_name: x}

        def rewind(self) -> None:
            self._it = iter(windows)

    return Reader()


def ort_static(args: argparse.Namespace) -> dict[str, Any]:
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    reader = _calibration_reader(args)
    # "default": ORT's own choice (every op type its QDQ registry knows, Gather included)
    op_types = None if args.op_types == "default" else args.op_types.split(",")
    extra = {"SmoothQuant": True, "SmoothQuantAlpha": 0.5} if args.smooth_quant else {}
    settings = dict(quant_format="QDQ", activation_type="QUInt8", weight_type="QInt8",
                    per_channel=True, calibrate_method="MinMax",
                    op_types_to_quantize=op_types or "default", reduce_range=args.reduce_range,
                    extra_options=extra, use_external_data_format=True,
                    calibration_windows=reader.count, calibration_seq_len=args.seq_len,
                    preprocessing=None)
    start = time.perf_counter()
    quantize_static(str(args.float), str(args.out), reader, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=op_types, per_channel=True,
                    reduce_range=args.reduce_range, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, use_external_data_format=True,
                    calibrate_method=CalibrationMethod.MinMax, extra_options=extra)
    return {"job_seconds": time.perf_counter() - start, "settings": settings}


def ort_dynamic(args: argparse.Namespace) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    start = time.perf_counter()
    quantize_dynamic(str(args.float), str(args.out), weight_type=QuantType.QInt8,
                     use_external_data_format=True)
    return {"job_seconds": time.perf_counter() - start,
            "settings": dict(weight_type="QInt8", per_channel=False, op_types_to_quantize="default",
                             use_external_data_format=True, preprocessing=None)}


def ort_nbits(args: argparse.Namespace, algorithm: str = "default") -> dict[str, Any]:
    """ORT's MatMulNBitsQuantizer, 4-bit, block 128, with one of its algorithms."""
    import logging

    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, GPTQWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig,
        KQuantWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    # one INFO line per skipped node otherwise
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

    start = time.perf_counter()
    settings: dict[str, Any] = dict(bits=4, block_size=128, accuracy_level=4,
                                    quant_format="QOperator (MatMulNBits)", external_data=True,
                                    preprocessing=None)
    if algorithm == "default":
        # ORT's own block-wise round-to-nearest (the "RTN" algorithm name routes through its
        # Intel Neural Compressor code instead). is_symmetric keeps its default (False).
        config = DefaultWeightOnlyQuantConfig(block_size=128, accuracy_level=4, bits=4,
                                              quant_format=QuantFormat.QOperator)
        settings.update(algorithm="DEFAULT (RTN)", is_symmetric=config.is_symmetric)
    elif algorithm == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=128, bits=4)
        settings.update(algorithm="HQQ (half-quadratic optimization of scale / zero point)")
    elif algorithm == "k_quant":
        config = KQuantWeightOnlyQuantConfig()
        settings.update(algorithm="k_quant (ORT's port of llama.cpp-style k-quant search)")
    elif algorithm == "gptq":
        reader = _calibration_reader(args)
        config = GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=128)
        settings.update(algorithm="GPTQ (ORT's Intel Neural Compressor port)",
                        calibration_windows=reader.count)
    else:
        raise SystemExit(f"unknown MatMulNBits algorithm {algorithm!r}")
    source: Any = str(args.float)
    if algorithm == "gptq":
        # its GPTQ opens an InferenceSession from the serialized model, which cannot resolve
        # external data: hand it the model with the weights loaded (542 MB < 2 GB)
        import onnx

        source = onnx.load(str(args.float), load_external_data=True)
        settings["preprocessing"] = "onnx.load with external data inlined (needed by its GPTQ)"
    quant = MatMulNBitsQuantizer(source, bits=4, block_size=128, accuracy_level=4,
                                 algo_config=config)
    quant.process()
    quant.model.save_model_to_file(str(args.out), use_external_data_format=True)
    settings["op_types_to_quantize"] = sorted(config.op_types_to_quantize or ())
    return {"job_seconds": time.perf_counter() - start, "settings": settings}


def lbcc_preset(args: argparse.Namespace, preset: str) -> dict[str, Any]:
    import lbcc
    from lbcc.recipes import preset as make_preset

    group_size = 128 if preset.startswith("w4a16") else None
    calibration = tokenizer = None
    # every preset but w8a8-dynamic and plain RTN uses the calibration text (w4a16 for the
    # importance-weighted clip search, as the README's quick start does)
    if preset not in ("w8a8-dynamic", "w4a16-rtn"):
        calibration, tokenizer = str(args.calib), str(args.tokenizer)
    start = time.perf_counter()
    if preset == "w4a16-rtn":  # plain round-to-nearest: the baseline GPTQ / AWQ are measured on
        recipe = make_preset("w4a16", group_size=group_size)
        recipe.name, recipe.weights.clip = "w4a16-rtn", "none"
    else:
        recipe = make_preset(preset, group_size=group_size)
    recipe.calibration.samples, recipe.calibration.seq_len = args.calib_samples, args.seq_len
    kwargs: dict[str, Any] = dict(recipe=recipe)
    result = lbcc.compile(str(args.float), target="ort-int8", calibration=calibration,
                          tokenizer=tokenizer, progress=False, command=sys.argv, **kwargs)
    report_path = args.out.with_suffix(".report.json")
    result.save(args.out, report_path=report_path)
    data = result.report.data
    return {"job_seconds": time.perf_counter() - start,
            "settings": dict(preset=preset, group_size=group_size, target="ort-int8",
                             recipe=recipe.to_json(),
                             calibration=data.get("calibration")),
            "report": str(report_path),
            "lbcc_report": {k: data.get(k) for k in ("seconds", "peak_rss_mb", "sizes", "summary",
                                                     "output")}}


def lbcc_float_fused(args: argparse.Namespace) -> dict[str, Any]:
    """The float model with lbcc's cache-free attention fusion only (no quantization): the
    reference that separates the fusion's gain from the quantization's."""
    import onnx_ir as ir

    from lbcc.modelio import save_model
    from lbcc.passes.causal_attention import fuse_causal_attention

    start = time.perf_counter()
    model = ir.load(str(args.float))
    fused, left, why = fuse_causal_attention(model)
    save_model(model, args.out, external_data=True)
    return {"job_seconds": time.perf_counter() - start,
            "settings": dict(passes=["fuse-attention"], fused=fused, left_unfused=left,
                             why_not=why)}


JOBS = {
    "ort-static": ort_static,
    # the configuration the baseline figures were measured with: ORT picks the op types
    "ort-static-all": lambda a: ort_static(argparse.Namespace(**{**vars(a), "op_types": "default"})),
    # ORT's documented remedy on x86 without VNNI: 7-bit weights
    "ort-static-rr": lambda a: ort_static(argparse.Namespace(**{**vars(a), "reduce_range": True})),
    # ORT's SmoothQuant (needs the neural-compressor package)
    "ort-static-sq": lambda a: ort_static(argparse.Namespace(**{**vars(a), "smooth_quant": True,
                                                                "reduce_range": True})),
    "ort-dynamic": ort_dynamic,
    "ort-nbits-rtn4": ort_nbits,
    "ort-nbits-hqq": lambda a: ort_nbits(a, "hqq"),
    "ort-nbits-kquant": lambda a: ort_nbits(a, "k_quant"),
    "ort-nbits-gptq": lambda a: ort_nbits(a, "gptq"),
    "lbcc-float-fused": lbcc_float_fused,
    **{f"lbcc-{p}": (lambda a, p=p: lbcc_preset(a, p)) for p in (
        "w8a8", "w8a8-dynamic", "w8a8-sq", "auto", "auto-avx2", "auto-vnni", "w4a16-rtn", "w4a16",
        "w4a16-gptq", "w4a16-awq", "w4a16-mixed")},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("job", choices=sorted(JOBS))
    p.add_argument("--float", type=Path, required=True, help="float32 .onnx (external data)")
    p.add_argument("--out", type=Path, required=True, help="output .onnx")
    p.add_argument("--result", type=Path, required=True, help="write the job's JSON here")
    p.add_argument("--calib", type=Path)
    p.add_argument("--tokenizer", type=Path)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--op-types", default="MatMul",
                   help="ort-static: comma-separated op types to quantize, or 'default'")
    p.add_argument("--reduce-range", action="store_true", help="ort-static: 7-bit weights")
    p.add_argument("--smooth-quant", action="store_true", help="ort-static: its SmoothQuant")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    res = JOBS[args.job](args)
    res["job"] = args.job
    args.result.write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
