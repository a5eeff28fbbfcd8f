"""The compile report: JSON (with a schema version) and a readable table.

It says what each pass did (time, peak memory, op diff, notes), how every MatMul/Gemm/Gather was
quantized (bits, granularity, scales, activation mode, what it was lowered to) or why it was not,
sizes before and after, versions and the exact command.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
_PACKAGES = ("lbcc", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy", "torch",
             "transformers")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclasses.dataclass
class Report:
    data: dict[str, Any]

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.data["layers"]

    @property
    def float_nodes(self) -> list[dict[str, Any]]:
        return [row for row in self.layers if row["status"] == "float"]

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=False, default=_jsonable)

    def write_json(self, path: str | os.PathLike) -> Path:
        """Atomic write (temp file + rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(self.to_json() + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            from lbcc.errors import BadInputError

            raise BadInputError(f"cannot write report {str(path)!r}: {exc.strerror}.",
                                "Choose a writable path for --report.") from None
        return path

    def render(self, console: Any = None, max_layers: int | None = 40) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console(stderr=True)
        d = self.data
        passes = Table(title=f"lbcc {d['target']} / {d['recipe']['name']}: passes")
        for col in ("#", "pass", "s", "peak MB", "op diff"):
            passes.add_column(col, justify="right" if col in ("#", "s", "peak MB") else "left")
        for p in d["passes"]:
            diff = ", ".join(f"{k}{v:+d}" for k, v in list(p["op_diff"].items())[:6])
            passes.add_row(str(p["index"]), p["name"], f"{p['seconds']:.2f}",
                           f"{p['peak_rss_mb']:.0f}", diff)
        console.print(passes)
        layers = Table(title="quantized layers")
        for col in ("layer", "op", "weights", "activations", "rel err", "lowered to / reason"):
            layers.add_column(col)
        quantized = [r for r in self.layers if r["status"] == "quantized"]
        shown = quantized if max_layers is None else quantized[:max_layers]
        for r in shown:
            w = r.get("weight") or {}
            plan = r.get("plan") or {}
            gran = "channel" if not w.get("block_size") else f"g{w['block_size']}"
            wdesc = f"int{w.get('bits')} {gran} {'sym' if w.get('symmetric') else 'asym'}"
            err = f"{w.get('rel_error', 0):.4f}" if "rel_error" in w else ""
            tail = r.get("lowered_to", "")
            if plan.get("reason"):
                tail = f"{tail}; {plan['reason']}" if tail else plan["reason"]
            layers.add_row(r["layer"], r["op"], wdesc, plan.get("activation", ""), err, tail)
        console.print(layers)
        if max_layers is not None and len(quantized) > max_layers:
            console.print(f"... {len(quantized) - max_layers} more quantized layers in the JSON "
                          "report")
        reasons: dict[str, list[str]] = {}
        for r in self.float_nodes:
            reasons.setdefault(f"{r['op']}: {r.get('reason', '')}", []).append(r["layer"])
        if reasons:
            left = Table(title="left in float (every node, grouped by reason)")
            left.add_column("count", justify="right")
            left.add_column("op: reason")
            left.add_column("layers")
            for reason, names in reasons.items():
                shown_names = ", ".join(sorted(set(names))[:4])
                more = len(set(names)) - 4
                left.add_row(str(len(names)), reason,
                             shown_names + (f", ... (+{more})" if more > 0 else ""))
            console.print(left)
        s = d["summary"]
        console.print(
            f"quantized {s['quantized']} / {s['sites']} weight sites "
            f"({', '.join(f'{k}: {v}' for k, v in s['activation_modes'].items())}); "
            f"{s['float']} MatMul/Gather nodes left float (reasons in the table); "
            f"weights {d['sizes']['input_bytes'] / 1e6:.1f} MB -> "
            f"{d['sizes']['output_bytes'] / 1e6:.1f} MB; {d['seconds']:.1f} s, peak "
            f"{d['peak_rss_mb']:.0f} MB")


def _jsonable(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:
        pass
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def build_report(run: Any, recipe: Any, target: str, *, source: str, input_bytes: int,
                 seconds: float, command: list[str]) -> Report:
    from lbcc.irutils import initializer_bytes

    notes = run.context.notes
    layers = list(notes.get("layers", {}).values())
    quantized = [r for r in layers if r["status"] == "quantized"]
    modes: dict[str, int] = {}
    for r in quantized:
        m = (r.get("plan") or {}).get("activation", "none")
        modes[m] = modes.get(m, 0) + 1
    feed = run.context.calibration
    data = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "source": source,
        "target": target,
        "recipe": recipe.to_json(),
        "stopped_after": run.stopped_after,
        "calibration": feed.describe() if feed is not None else None,
        "passes": [r.to_json() for r in run.records],
        "summary": {"sites": sum(1 for r in layers if r.get("kind")), "quantized": len(quantized),
                    "float": len(layers) - len(quantized), "activation_modes": modes},
        "layers": layers,
        "outliers": notes.get("outliers"),
        "sizes": {"input_bytes": input_bytes, "output_bytes": initializer_bytes(run.model)},
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(max((r.peak_rss_mb for r in run.records), default=0.0), 1),
        "versions": versions(),
    }
    return Report(data)
