"""Cross-table of a compile report: the outlier verdict of every layer (``detect-outliers``, before
smoothing) against the activation mode the compile chose for it.

    python benchmarks/outlier_choices.py .cache/bench/lbcc-auto.report.json [--markdown]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def cross_table(report: dict) -> tuple[dict[str, collections.Counter], list[tuple[str, str, str]]]:
    verdicts = {row["layer"]: row["verdict"] for row in report.get("outliers", [])}
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    rows = []
    for layer in report["layers"]:
        if layer.get("status") != "quantized" or layer["layer"] not in verdicts:
            continue
        mode = layer["plan"]["activation"]
        verdict = verdicts[layer["layer"]]
        table[verdict][mode] += 1
        rows.append((layer["layer"], verdict, mode))
    return table, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    table, rows = cross_table(json.loads(args.report.read_text()))
    modes = sorted({m for c in table.values() for m in c})
    print("| verdict (before smoothing) | " + " | ".join(modes) + " |")
    print("| --- | " + " | ".join("---:" for _ in modes) + " |")
    for verdict, counts in sorted(table.items()):
        print(f"| {verdict} | " + " | ".join(str(counts.get(m, 0)) for m in modes) + " |")
    if not args.markdown:
        for layer, verdict, mode in rows:
            if verdict != "fine for per-tensor int8" or mode != "static":
                print(f"{layer}: {verdict} -> {mode}")


if __name__ == "__main__":
    main()
