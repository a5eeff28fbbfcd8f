#!/usr/bin/env python
"""lbcc as one step of an export pipeline (an MLOps job), through the Python API.

    python examples/export_pipeline.py MODEL --out DIR --preset w4a16 \\
        --calib calib.txt --tokenizer TOK --eval-text eval.txt --max-ppl-increase 0.05 \\
        [--auto-fallback] [--target ort-int8] [--group-size G] [--eval-tokens 8192]

1. export: MODEL (an .onnx file, a Hugging Face directory or a .gguf file, exported with
   ``torch.onnx.export(dynamo=True)``) is captured and written as ``DIR/model.float.onnx``;
2. compile for the target with the preset, calibrated on ``--calib``;
3. gate: perplexity on ``--eval-text`` at most ``--max-ppl-increase`` above the float model's
   (``--auto-fallback`` keeps the most sensitive layers in float until it holds);
4. write ``DIR/model.onnx`` (+ external data), ``DIR/report.json`` and ``DIR/manifest.json``:
   sha256 and size of every input and artefact, the versions, the command, the gate's result.

Exit codes, as ``lbcc``: 0 the artefacts are good; 1 bad input; 2 the target cannot run it;
3 the accuracy gate was missed (the artefacts and the manifest are still written, with
``"status": "gate-missed"``, so a later step can inspect them). Every file is written atomically.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

MANIFEST_SCHEMA_VERSION = 1


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe(path: Path, root: Path | None = None) -> dict[str, Any]:
    """Path (relative to ``root`` when inside it), bytes and sha256 of a file, or of every file
    of a directory."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    rows = []
    for p in files:
        shown = p.relative_to(root) if root is not None and p.is_relative_to(root) else p
        rows.append({"path": str(shown), "bytes": p.stat().st_size, "sha256": sha256(p)})
    return {"path": str(path), "files": rows} if path.is_dir() else rows[0]


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    from lbcc.capture import capture
    from lbcc.gates import gate_message, gated_compile
    from lbcc.modelio import save_model
    from lbcc.report import versions

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # 1. export
    float_path = out / "model.float.onnx"
    save_model(capture(args.model), float_path, external_data=True)
    # 2 + 3. compile and gate
    result, gate = gated_compile(
        str(float_path), max_ppl_increase=args.max_ppl_increase, eval_text=args.eval_text,
        tokenizer=args.tokenizer, target=args.target, preset=args.preset,
        calibration=args.calib, group_size=args.group_size, eval_tokens=args.eval_tokens,
        seq_len=args.eval_seq_len,
        auto_fallback=args.auto_fallback, progress=False, command=sys.argv)
    # 4. artefacts, report, manifest
    written = result.save(out / "model.onnx", report_path=out / "report.json")
    inputs = {"model": args.model, "calibration": args.calib, "eval_text": args.eval_text,
              "tokenizer": args.tokenizer}
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "status": "passed" if gate["passed"] else "gate-missed",
        "target": args.target, "preset": args.preset,
        "inputs": {k: describe(Path(v)) for k, v in inputs.items() if v is not None},
        "artefacts": [describe(p, out) for p in [float_path, *written, out / "report.json"]
                      if p.is_file()]
        + [describe(p, out) for p in sorted(out.glob("model.float.onnx*.data"))],
        "accuracy_gate": gate,
        "versions": versions(),
    }
    write_json_atomic(out / "manifest.json", manifest)
    print(gate_message(gate), file=sys.stderr)
    print(f"wrote {out}/: " + ", ".join(a["path"] for a in manifest["artefacts"])
          + ", manifest.json")
    return 0 if gate["passed"] else 3


def main(argv: list[str] | None = None) -> int:
    from lbcc.errors import LbccError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--target", default="ort-int8")
    ap.add_argument("--preset", default="w4a16")
    ap.add_argument("--group-size", type=int)
    ap.add_argument("--calib")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--eval-text", required=True)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--max-ppl-increase", type=float, required=True)
    ap.add_argument("--auto-fallback", action="store_true")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except LbccError as exc:
        print(f"error: {exc.message}" + (f"\n{exc.hint}" if exc.hint else ""), file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
