"""Pictures of a model: a self-contained HTML page (no network), SVG and Graphviz DOT.

The graph is drawn per *layer* (nodes grouped by their layer name, ``lbcc.layer`` metadata), so a
compiled LLM reads like its module tree rather than thousands of Q/DQ nodes. Each layer box is
filled by its precision (what its ops say: ``MatMulNBits`` bits, ``DynamicQuantizeMatMul``,
Q/DQ around a MatMul, ...) and edged by its measured error when a ``lbcc debug compare`` JSON is
given (SQNR: red below 10 dB to green above 40 dB); clicking a box shows the layer's ops and its
rows from the compile report and the comparison. A bar chart shows the per-layer SQNR in graph
order (measured, else the report's estimate). The layout is computed here: rank = longest path
from the inputs over the layers in graph order, boxes of one rank side by side.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from lbcc.errors import BadInputError
from lbcc.irutils import layer_name

VIEW_SCHEMA_VERSION = 1
#: fill colors by precision class
COLORS = {
    "int4": "#7b61c9", "int8 static": "#2f7fd0", "int8 dynamic": "#3aa6a0",
    "int8 block": "#56b25a", "int8 weights": "#8cc6f0", "int4 weights": "#c3b4ee",
    "float": "#f0a03c", "no weights": "#d9d9d9", "input/output": "#ffffff",
}
_W, _H, _GX, _GY = 190, 30, 16, 22  # box width/height, horizontal/vertical gaps


def _op_key(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _precision(nodes: list[ir.Node]) -> str:
    ops = {_op_key(n) for n in nodes}
    for n in nodes:
        if n.op_type == "MatMulNBits":
            return "int4" if n.attributes.get_int("bits", 4) == 4 else "int8 block"
    if "com.microsoft::DynamicQuantizeMatMul" in ops or "DynamicQuantizeLinear" in ops:
        return "int8 dynamic"
    act_dq = any(n.op_type == "DequantizeLinear" and n.inputs[0] is not None
                 and n.inputs[0].const_value is None for n in nodes)
    if act_dq and ops & {"MatMul", "Gemm"}:  # a dequantized activation feeds the MatMul
        return "int8 static"
    for n in nodes:
        if n.op_type in ("DequantizeLinear", "GatherBlockQuantized") and n.inputs[0] is not None:
            dt = n.inputs[0].dtype
            if dt is not None and dt.name in ("INT4", "UINT4"):
                return "int4 weights"
            if n.op_type == "GatherBlockQuantized":
                return "int4 weights" if n.attributes.get_int("bits", 4) == 4 else "int8 weights"
            if dt is not None and dt.name in ("INT8", "UINT8") and \
                    n.inputs[0].const_value is not None:
                return "int8 weights"
    for n in nodes:  # an integer table read directly (int8 Gather of an embedding)
        if n.op_type in ("MatMul", "Gather"):
            for v in n.inputs:
                if v is not None and v.const_value is not None and \
                        len(v.const_value.shape) == 2 and v.const_value.dtype.name in (
                            "INT8", "UINT8", "INT4", "UINT4"):
                    return "int4 weights" if "4" in v.const_value.dtype.name else "int8 weights"
    for n in nodes:
        if n.op_type in ("MatMul", "Gemm", "Gather") and any(
                v is not None and v.const_value is not None and len(v.const_value.shape) == 2
                and v.const_value.dtype.is_floating_point() for v in n.inputs):
            return "float"
    return "no weights"


def layer_graph(model: ir.Model) -> dict[str, Any]:
    """Layers (graph inputs, node groups by layer name, graph outputs) and the edges between."""
    index: dict[str, int] = {}
    layers: list[dict[str, Any]] = []
    members: list[list[ir.Node]] = []
    owner: dict[int, int] = {}  # id(value) -> layer index producing it

    def add(name: str, kind: str) -> int:
        if name not in index:
            index[name] = len(layers)
            layers.append({"name": name, "kind": kind})
            members.append([])
        return index[name]

    for v in model.graph.inputs:
        owner[id(v)] = add(f"input:{v.name}", "io")
    edges: set[tuple[int, int]] = set()
    for node in model.graph:
        i = add(layer_name(node), "layer")
        members[i].append(node)
        for v in node.inputs:
            if v is not None and id(v) in owner and owner[id(v)] != i:
                edges.add((owner[id(v)], i))
        for v in node.outputs:
            if v is not None:
                owner[id(v)] = i
    for v in model.graph.outputs:
        j = add(f"output:{v.name}", "io")
        if id(v) in owner:
            edges.add((owner[id(v)], j))
    for layer, nodes in zip(layers, members):
        ops: dict[str, int] = {}
        for n in nodes:
            ops[_op_key(n)] = ops.get(_op_key(n), 0) + 1
        layer["ops"] = ops
        layer["precision"] = "input/output" if layer["kind"] == "io" else _precision(nodes)
        layer["weight_bytes"] = sum(v.const_value.nbytes for n in nodes for v in n.inputs
                                    if v is not None and v.const_value is not None)
    return {"layers": layers, "edges": sorted(edges)}


def _layout(n: int, edges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(rank, column) per layer: rank = longest path over forward edges (graph order)."""
    rank = [0] * n
    incoming: dict[int, list[int]] = {}
    for a, b in edges:
        if a < b:
            incoming.setdefault(b, []).append(a)
    for b in range(n):
        if b in incoming:
            rank[b] = max(rank[a] + 1 for a in incoming[b])
    col: dict[int, int] = {}
    pos = []
    for i in range(n):
        pos.append((rank[i], col.get(rank[i], 0)))
        col[rank[i]] = col.get(rank[i], 0) + 1
    return pos


def _sqnr_color(sqnr: float | None) -> str:
    """Red (<= 10 dB) through yellow to green (>= 40 dB)."""
    if sqnr is None:
        return "#1a9c3a"
    t = min(1.0, max(0.0, (sqnr - 10.0) / 30.0))
    r, g = (int(220 * min(1.0, 2 - 2 * t)), int(180 * min(1.0, 2 * t)))
    return f"#{r:02x}{g:02x}28"


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def build_view(model: ir.Model | None = None, report: dict[str, Any] | None = None,
               compare: dict[str, Any] | None = None) -> dict[str, Any]:
    """The data every picture is drawn from: layers (with report / comparison rows), edges,
    positions."""
    if model is not None:
        g = layer_graph(model)
    elif report is not None:  # no graph: the report's layers as a chain, in its order
        names = list(dict.fromkeys(r["layer"] for r in report.get("layers", [])))
        g = {"layers": [{"name": n, "kind": "layer", "ops": {}, "weight_bytes": 0,
                         "precision": "no weights"} for n in names],
             "edges": [(i, i + 1) for i in range(len(names) - 1)]}
    else:
        raise BadInputError("nothing to draw: give a model and/or a report.", "")
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in (report or {}).get("layers", []):
        rows.setdefault(r["layer"], []).append(r)
    measured = {r["layer"]: r for r in (compare or {}).get("layers", [])}
    for layer in g["layers"]:
        rep = rows.get(layer["name"], [])
        layer["report"] = rep
        if model is None and rep:
            layer["precision"] = _report_precision(rep)
        m = measured.get(layer["name"])
        layer["compare"] = m
        est = next((r.get("plan", {}).get("sqnr_db") for r in rep
                    if (r.get("plan") or {}).get("sqnr_db") is not None), None)
        if m is not None:
            layer["sqnr_db"], layer["sqnr_source"] = m["sqnr_db"], "measured"
        elif est is not None:
            layer["sqnr_db"], layer["sqnr_source"] = est, "estimated (report)"
    g["positions"] = _layout(len(g["layers"]), g["edges"])
    return g


def _report_precision(rows: list[dict[str, Any]]) -> str:
    for r in rows:
        if r.get("status") != "quantized":
            continue
        plan = r.get("plan") or {}
        bits = (plan.get("weight") or {}).get("bits", 8)
        act = plan.get("activation")
        if act == "static":
            return "int8 static"
        if act == "dynamic":
            return "int8 dynamic"
        if act == "dynamic-block":
            return "int8 block" if bits == 8 else "int4"
        return "int4 weights" if bits == 4 else "int8 weights"
    return "float" if rows else "no weights"


def render_svg(view: dict[str, Any]) -> str:
    """The layer graph as standalone SVG (boxes with ``data-layer`` attributes for the page)."""
    layers, pos = view["layers"], view["positions"]
    ranks = max((r for r, _ in pos), default=0) + 1
    cols = max((c for _, c in pos), default=0) + 1
    width, height = cols * (_W + _GX) + _GX, ranks * (_H + _GY) + _GY

    def xy(i: int) -> tuple[int, int]:
        r, c = pos[i]
        return _GX + c * (_W + _GX), _GY + r * (_H + _GY)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">']
    for a, b in view["edges"]:
        (x1, y1), (x2, y2) = xy(a), xy(b)
        x1, y1, x2 = x1 + _W // 2, y1 + _H, x2 + _W // 2
        mid = (y1 + y2) / 2
        out.append(f'<path d="M{x1},{y1} C{x1},{mid} {x2},{mid} {x2},{y2}" fill="none" '
                   f'stroke="#9aa" stroke-width="1"/>')
    for i, layer in enumerate(layers):
        x, y = xy(i)
        fill = COLORS.get(layer["precision"], "#ccc")
        sqnr = layer.get("sqnr_db")
        has_err = "sqnr_db" in layer
        stroke = _sqnr_color(sqnr) if has_err else "#555"
        tip = f"{layer['name']} — {layer['precision']}"
        if has_err:
            tip += (f", SQNR {'inf' if sqnr is None else f'{sqnr:.1f}'} dB "
                    f"({layer['sqnr_source']})")
        out.append(f'<g class="layer" data-layer="{i}"><title>{html.escape(tip)}</title>'
                   f'<rect x="{x}" y="{y}" width="{_W}" height="{_H}" rx="5" fill="{fill}" '
                   f'stroke="{stroke}" stroke-width="{4 if has_err else 1}"/>'
                   f'<text x="{x + 6}" y="{y + 19}">{html.escape(_short(layer["name"]))}</text>'
                   '</g>')
    out.append("</svg>")
    return "\n".join(out)


def render_bars(view: dict[str, Any]) -> str:
    """Per-layer SQNR bars in graph order (0..60 dB; infinite drawn full height)."""
    rows = [(i, l) for i, l in enumerate(view["layers"]) if "sqnr_db" in l]
    if not rows:
        return "<p>No per-layer error: pass a compare JSON (lbcc debug compare ... -o C.json) " \
               "or a report of a calibrated compile.</p>"
    bw, h, top = 8, 180, 10
    width = len(rows) * bw + 60
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h + 40}" '
           f'font-family="sans-serif" font-size="10" id="bars">']
    for db in (0, 20, 40, 60):
        y = top + h - h * db / 60
        out.append(f'<line x1="40" x2="{width}" y1="{y}" y2="{y}" stroke="#ddd"/>'
                   f'<text x="2" y="{y + 3}">{db} dB</text>')
    for k, (i, layer) in enumerate(rows):
        s = layer["sqnr_db"]
        v = 60.0 if s is None else max(0.0, min(60.0, s))
        bh = h * v / 60
        tip = f"{layer['name']}: {'inf' if s is None else f'{s:.1f}'} dB ({layer['sqnr_source']})"
        out.append(f'<rect class="bar" data-layer="{i}" x="{40 + k * bw}" y="{top + h - bh}" '
                   f'width="{bw - 1}" height="{bh}" '
                   f'fill="{COLORS.get(layer["precision"], "#ccc")}"><title>'
                   f'{html.escape(tip)}</title></rect>')
    out.append("</svg>")
    return "\n".join(out)


def render_dot(view: dict[str, Any]) -> str:
    """Graphviz DOT of the layer graph (fill = precision, border = measured error)."""
    lines = ["digraph lbcc {", '  rankdir=TB; node [shape=box, style="rounded,filled", '
             'fontname="sans-serif", fontsize=10];']
    for i, layer in enumerate(view["layers"]):
        label = layer["name"] + "\\n" + layer["precision"]
        if "sqnr_db" in layer:
            s = layer["sqnr_db"]
            label += f"\\nSQNR {'inf' if s is None else f'{s:.1f}'} dB"
        color = _sqnr_color(layer["sqnr_db"]) if "sqnr_db" in layer else "#555555"
        lines.append(f'  n{i} [label="{_dot_escape(label)}", '
                     f'fillcolor="{COLORS.get(layer["precision"], "#cccccc")}", '
                     f'color="{color}", penwidth={3 if "sqnr_db" in layer else 1}];')
    for a, b in view["edges"]:
        lines.append(f"  n{a} -> n{b};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_escape(s: str) -> str:
    return s.replace('"', '\\"')


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lbcc view: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 0; display: flex; height: 100vh; }}
#left {{ flex: 1; overflow: auto; padding: 8px; }}
#side {{ width: 380px; border-left: 1px solid #ccc; padding: 8px; overflow: auto;
        font-size: 12px; background: #fafafa; }}
#side pre {{ white-space: pre-wrap; word-break: break-all; }}
.layer {{ cursor: pointer; }} .layer.sel rect {{ stroke: #000 !important; stroke-width: 5; }}
.layer.dim {{ opacity: 0.25; }} .bar {{ cursor: pointer; }}
.legend span {{ display: inline-block; padding: 2px 6px; margin: 2px; border: 1px solid #888;
               border-radius: 4px; font-size: 11px; }}
h1 {{ font-size: 16px; margin: 4px 0; }} h2 {{ font-size: 14px; margin: 10px 0 4px; }}
</style></head><body>
<div id="left">
<h1>{title}</h1>
<div class="legend">{legend}</div>
<p style="font-size:12px">{summary}</p>
<h2>Per-layer error (SQNR, graph order)</h2>
{bars}
<h2>Layer graph <input id="search" placeholder="filter layers" style="font-size:12px"></h2>
{svg}
</div>
<div id="side"><b>Click a layer</b> for its ops, report row and measured error.
<pre id="details"></pre></div>
<script type="application/json" id="data">{data}</script>
<script>
const view = JSON.parse(document.getElementById('data').textContent);
const details = document.getElementById('details');
function show(i) {{
  document.querySelectorAll('.layer.sel').forEach(e => e.classList.remove('sel'));
  const g = document.querySelector('.layer[data-layer="' + i + '"]');
  if (g) {{ g.classList.add('sel'); g.scrollIntoView({{block: 'center', inline: 'center'}}); }}
  details.textContent = JSON.stringify(view.layers[i], null, 2);
}}
document.querySelectorAll('[data-layer]').forEach(e =>
  e.addEventListener('click', () => show(+e.dataset.layer)));
document.getElementById('search').addEventListener('input', ev => {{
  const q = ev.target.value.toLowerCase();
  document.querySelectorAll('.layer').forEach(e => e.classList.toggle('dim',
    q && !view.layers[+e.dataset.layer].name.toLowerCase().includes(q)));
}});
document.body.dataset.layers = view.layers.length;
</script></body></html>
"""


def render_html(view: dict[str, Any], title: str = "model") -> str:
    """One self-contained page: inline SVG, CSS and script, no external resource."""
    counts: dict[str, int] = {}
    for layer in view["layers"]:
        counts[layer["precision"]] = counts.get(layer["precision"], 0) + 1
    legend = "".join(f'<span style="background:{COLORS[k]}">{html.escape(k)}: {counts[k]}</span>'
                     for k in COLORS if k in counts)
    measured = sum(1 for l in view["layers"] if l.get("sqnr_source") == "measured")
    summary = (f"{len(view['layers'])} layers, {len(view['edges'])} edges; box fill = precision"
               + (f", border = measured SQNR of {measured} layers (red &le; 10 dB, green &ge; "
                  "40 dB)" if measured else ""))
    data = json.dumps({"schema_version": VIEW_SCHEMA_VERSION, **view}, default=str)
    data = data.replace("</", "<\\/")  # never close the script element early
    return _PAGE.format(title=html.escape(title), legend=legend, summary=summary,
                        bars=render_bars(view), svg=render_svg(view), data=data)


def _load_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{what} {str(path)!r} does not exist.", "Check the path.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{what} {str(path)!r} is not JSON ({exc}).",
                            "Pass the file lbcc wrote (--report / debug compare -o).") from None


def view(source: str | os.PathLike, report: str | os.PathLike | None = None,
         compare: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load MODEL_OR_REPORT (+ optional report and compare JSON) into the view data."""
    source = Path(source)
    model = rep = None
    if source.suffix.lower() == ".json":
        rep = _load_json(source, "report")
        if "layers" not in rep:
            raise BadInputError(f"{str(source)!r} is not an lbcc compile report (no layers).",
                                "Pass the JSON written by lbcc compile --report.")
    else:
        from lbcc.capture import capture

        model = capture(source)
    if report is not None:
        rep = _load_json(report, "report")
    cmp = _load_json(compare, "comparison") if compare is not None else None
    return build_view(model, rep, cmp)


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    from lbcc.modelio import check_output_path

    path = Path(path)
    check_output_path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def stats_line(v: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for layer in v["layers"]:
        counts[layer["precision"]] = counts.get(layer["precision"], 0) + 1
    worst = min((l for l in v["layers"] if l.get("sqnr_db") is not None),
                key=lambda l: l["sqnr_db"], default=None)
    text = f"{len(v['layers'])} layers (" + ", ".join(f"{k} {n}" for k, n in counts.items()) + ")"
    if worst is not None and not math.isnan(worst["sqnr_db"]):
        text += f"; lowest SQNR {worst['sqnr_db']:.1f} dB at {worst['name']}"
    return text
