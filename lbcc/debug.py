"""Where did the accuracy go: per-layer float-vs-quantized comparison and snapshot diffs.

:func:`compare` runs the float and the quantized model side by side on real samples and, for every
layer both models have (matched by the original layer name in node metadata, ``lbcc.layer``),
folds the two activations into streaming sums; nothing is kept across samples, so memory is one
sample's activations however many samples there are. With r the float activation, q the
quantized one and e = q - r over all elements of all samples:

    SQNR   = 10 log10(sum r^2 / sum e^2)           (dB; higher is better)
    cosine = sum r q / sqrt(sum r^2 sum q^2)
    max_abs_error = max |e|,  rel_error = sqrt(sum e^2 / sum r^2)

The errors are *cumulative*: a layer's output carries the error of every layer before it.

Exposing a layer's activation as an output keeps ONNX Runtime from fusing across it (e.g. a
MatMul whose requantized uint8 output feeds the next layer becomes QLinearMatMul only when that
output is internal), so the per-layer rows measure the model with those fusions off. With
``check_fusions`` the ``output:*`` rows are measured on the unmodified model, as deployed; when
that is noticeably worse than the instrumented run (``instrumented_outputs``), the fused kernels
themselves lose accuracy, and ``warnings`` says so. ``numerics="qdq"`` runs the quantized model's
Q/DQ nodes as written, without integer kernels: the error of the quantization alone; a large gap
to the deployed numbers points at the kernels (e.g. int16 saturation of u8 x s8 products on
CPUs without VNNI). Rows
come worst first (lowest SQNR). :func:`diff` says what changed between two models (e.g. two
pipeline snapshots): ops added/removed, nodes, initializers (with how much a weight moved), and a
per-layer summary. :func:`bisect` (in :mod:`lbcc.bisect`) finds the pass and the layers to blame.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import onnx_ir as ir

from lbcc.errors import BadInputError
from lbcc.irutils import extra_graph_io, layer_name, op_histogram

#: schema of every JSON document ``lbcc debug`` / ``lbcc.debug`` writes
DEBUG_SCHEMA_VERSION = 1
#: ops that only (de)quantize: their outputs are not a layer's result
_QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
OUTPUT_PREFIX = "output:"


# ----------------------------------------------------------------------------- matching

def _is_float(value: ir.Value) -> bool:
    return value.type is None or value.dtype is None or value.dtype.is_floating_point()


def layer_outputs(model: ir.Model) -> dict[str, ir.Value]:
    """For every layer name: the value that carries its result out of the layer.

    That is the last output (in graph order) of a node of the layer that a node of another layer
    reads, or that is a graph output; outputs of (de)quantize nodes do not count. Graph outputs
    are also listed as ``output:<name>``.
    """
    result: dict[str, ir.Value] = {}
    graph_outputs = set(model.graph.outputs)
    for node in model.graph:
        if node.op_type in _QUANT_OPS:
            continue
        name = layer_name(node)
        for value in node.outputs:
            if value is None or not value.name or not _is_float(value):
                continue
            if value in graph_outputs or any(layer_name(u.node) != name for u in value.uses()):
                result[name] = value
    for value in model.graph.outputs:
        result[OUTPUT_PREFIX + value.name] = value
    return result


def site_layers(model: ir.Model) -> list[str]:
    """Layer names of the weight sites (MatMul / Gather with a weight) of a float model."""
    from lbcc.passes.sites import find_sites

    sites, _ = find_sites(model)
    return list(dict.fromkeys(s.layer for s in sites))


def normalize(model: Any, copy: bool = True) -> ir.Model:
    """``capture`` + the passes every compile starts with (capture-normalize, fuse-ort), so a
    float model's layers have the names and the form the compiled model's layers have.
    ``copy=False``: ``model`` is the caller's own private copy and may be changed in place."""
    from lbcc.capture import capture
    from lbcc.passes import CaptureNormalize, FuseORT
    from lbcc.pipeline import Pipeline, PipelineContext

    m = capture(model)
    if copy and isinstance(model, ir.Model):  # never change the caller's model
        m = ir.from_proto(ir.to_proto(m))
    return Pipeline([CaptureNormalize(), FuseORT()], PipelineContext(progress=False)).run(m).model


# ----------------------------------------------------------------------------- statistics

class PairStats:
    """Streaming sums of one float / quantized activation pair (float64 accumulators)."""

    __slots__ = ("count", "ref_sq", "err_sq", "cross", "q_sq", "max_abs_error", "max_abs_ref")

    def __init__(self) -> None:
        self.count = 0
        self.ref_sq = self.err_sq = self.cross = self.q_sq = 0.0
        self.max_abs_error = self.max_abs_ref = 0.0

    def update(self, ref: np.ndarray, q: np.ndarray) -> None:
        r = np.ascontiguousarray(ref, dtype=np.float32).reshape(-1)
        x = np.ascontiguousarray(q, dtype=np.float32).reshape(-1)
        e = x - r
        # np.dot runs in BLAS; float32 partial sums are ample for a dB figure
        self.ref_sq += float(np.dot(r, r))
        self.q_sq += float(np.dot(x, x))
        self.cross += float(np.dot(r, x))
        self.err_sq += float(np.dot(e, e))
        self.max_abs_error = max(self.max_abs_error, float(max(e.max(), -e.min())))
        self.max_abs_ref = max(self.max_abs_ref, float(max(r.max(), -r.min())))
        self.count += r.size

    def row(self) -> dict[str, Any]:
        sqnr = (math.inf if self.err_sq == 0 else
                10 * math.log10(max(self.ref_sq, 1e-300) / self.err_sq))
        denom = math.sqrt(self.ref_sq * self.q_sq)
        return {"sqnr_db": round(sqnr, 3) if math.isfinite(sqnr) else None,
                "cosine": round(self.cross / denom, 6) if denom else None,
                "max_abs_error": float(f"{self.max_abs_error:.6g}"),
                "rel_error": float(f"{math.sqrt(self.err_sq / self.ref_sq):.6g}")
                if self.ref_sq else None,
                "max_abs_float": float(f"{self.max_abs_ref:.6g}"), "elements": self.count}


def _sort_key(row: dict[str, Any]) -> tuple[float, str]:
    sqnr = row["sqnr_db"]
    return (math.inf if sqnr is None else sqnr, row["layer"])


@dataclasses.dataclass
class CompareResult:
    """Per-layer rows, worst (lowest SQNR) first; a small DataFrame-like table."""

    rows: list[dict[str, Any]]
    samples: int
    seconds: dict[str, float]
    unmatched: dict[str, list[str]]
    #: graph outputs measured on the instrumented run (fusions across exposed layers off)
    instrumented_outputs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    numerics: str = "deployed"
    columns: tuple[str, ...] = ("layer", "order", "sqnr_db", "cosine", "max_abs_error",
                                "rel_error", "max_abs_float", "elements")

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, key: int | str) -> dict[str, Any]:
        if isinstance(key, int):
            return self.rows[key]
        for row in self.rows:
            if row["layer"] == key:
                return row
        raise KeyError(key)

    def column(self, name: str) -> list[Any]:
        return [row.get(name) for row in self.rows]

    def to_pandas(self) -> Any:
        try:
            import pandas as pd
        except ImportError:
            raise BadInputError("to_pandas() needs pandas.", "pip install pandas, or use .rows "
                                "(a list of dicts) / .to_json().") from None
        return pd.DataFrame(self.rows, columns=list(self.columns))

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": DEBUG_SCHEMA_VERSION, "kind": "compare",
                "numerics": self.numerics, "samples": self.samples, "seconds": self.seconds,
                "layers": self.rows,
                "instrumented_outputs": self.instrumented_outputs, "warnings": self.warnings,
                "unmatched": self.unmatched}

    def table(self, max_rows: int | None = 30, title: str | None = None) -> Any:
        from rich.table import Table

        table = Table(title=title or f"float vs quantized, {self.samples} samples, worst first "
                                     "(errors are cumulative)")
        for col in ("layer", "#", "SQNR dB", "cosine", "max |err|", "rel err", "max |float|"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for row in self.rows[:max_rows]:
            table.add_row(row["layer"], str(row["order"]),
                          "inf" if row["sqnr_db"] is None else f"{row['sqnr_db']:.2f}",
                          "-" if row["cosine"] is None else f"{row['cosine']:.5f}",
                          f"{row['max_abs_error']:.4g}",
                          "-" if row["rel_error"] is None else f"{row['rel_error']:.4g}",
                          f"{row['max_abs_float']:.4g}")
        return table

    def __repr__(self) -> str:
        head = ", ".join(f"{r['layer']} {r['sqnr_db']} dB" for r in self.rows[:3])
        return f"CompareResult({len(self.rows)} layers, {self.samples} samples; worst: {head})"


# ----------------------------------------------------------------------------- running

def _session_with_outputs(model: ir.Model, values: Iterable[ir.Value], path: Path,
                          threads: int | None, numerics: str = "deployed") -> Any:
    """Save ``model`` with ``values`` added as graph outputs (the model itself is restored) and
    open an ONNX Runtime session on the copy. ``numerics="qdq"`` keeps ONNX Runtime to its basic
    graph optimizations: QuantizeLinear/DequantizeLinear then run as written (float math on
    exactly quantized values) instead of being fused into integer kernels."""
    import onnxruntime as ort

    from lbcc.modelio import save_model

    extra = [v for v in dict.fromkeys(values) if v not in model.graph.outputs]
    for v in extra:
        if v.type is None:
            v.type = ir.TensorType(ir.DataType.FLOAT)
    with extra_graph_io(model.graph.outputs, extra):
        save_model(model, path, external_data=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if numerics == "qdq":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BadInputError(f"ONNX Runtime cannot run {path.stem!r} for the comparison: "
                            f"{str(exc)[:300]}", "Check that both models load in ONNX Runtime "
                            "(lbcc eval MODEL).") from None


def _float_for_sites(float_model: Any, qmodel: ir.Model) -> ir.Model:
    """The float model as captured when every weight site's layer is found in the quantized
    model by the exporter's names (no normalization needed: a large model's constant folding
    costs more than the comparison); else normalized like a compile."""
    from lbcc.capture import capture

    raw = capture(float_model)
    if isinstance(float_model, ir.Model):
        raw = ir.from_proto(ir.to_proto(raw))
    names = site_layers(raw)
    qnames = set(layer_outputs(qmodel))
    if names and all(n in qnames for n in names):
        return raw
    return normalize(raw, copy=False)  # raw is ours (a proto round trip would lose the
    # location of a path-loaded model's external data)


def compare(float_model: Any, quant_model: Any, data: Any, *, tokenizer: Any = None,
            layers: str | Iterable[str] = "sites", max_samples: int | None = None,
            threads: int | None = None, numerics: str = "deployed", check_fusions: bool = False,
            progress: bool = False) -> CompareResult:
    """Per-layer SQNR, cosine similarity and max error of the quantized model's activations
    against the float model's, on the samples of ``data``, worst layers first.

    ``float_model`` / ``quant_model``: paths, ``onnx_ir.Model`` s or anything ``lbcc.capture``
    takes; the float model is normalized like a compile does (layer names, fusions) unless its
    weight layers already match by name. ``data``: a Feed, a ``.txt`` (+ ``tokenizer``), an
    ``.npz`` or ``"random:VOCAB"``.
    ``layers``: ``"sites"`` (the float model's weight sites: MatMul / Gather with a weight, and the
    graph outputs), ``"all"`` (every layer name both models share; a norm that SmoothQuant rescaled
    legitimately differs) or an explicit list of layer names.
    ``numerics``: ``"deployed"`` runs the quantized model as ONNX Runtime deploys it (integer
    kernels); ``"qdq"`` runs its Q/DQ nodes as written (the quantization itself, without the
    kernels' own error). ``check_fusions`` runs the unmodified model once more per sample for the
    ``output:*`` rows (see the module docstring).
    """
    from lbcc.api import make_feed
    from lbcc.capture import capture
    from lbcc.progress import track

    if numerics not in ("deployed", "qdq"):
        raise BadInputError(f"numerics {numerics!r}: expected deployed or qdq.", "")
    t0 = time.perf_counter()
    qmodel = capture(quant_model)
    fmodel = normalize(float_model) if layers != "sites" else _float_for_sites(float_model,
                                                                                 qmodel)
    feed = make_feed(data, tokenizer, None, fmodel)
    if feed is None:
        raise BadInputError("compare needs samples to run the models on.",
                            "Pass --calib FILE.txt --tokenizer T, --calib FILE.npz or "
                            "--calib random:VOCAB.")
    fouts, qouts = layer_outputs(fmodel), layer_outputs(qmodel)
    if layers == "sites":
        wanted = site_layers(fmodel) + [k for k in fouts if k.startswith(OUTPUT_PREFIX)]
    elif layers == "all":
        wanted = list(fouts)
    else:
        wanted = list(layers)
    matched = [name for name in wanted if name in fouts and name in qouts]
    unmatched = {"missing_in_float": [n for n in wanted if n not in fouts],
                 "missing_in_quantized": [n for n in wanted if n in fouts and n not in qouts]}
    if not matched:
        raise BadInputError("no layer of the float model was found in the quantized model.",
                            "Compare a model with the float model it was compiled from (layer "
                            "names live in node metadata, lbcc.layer).")
    order = {name: i for i, name in enumerate(fouts)}
    stats = {name: PairStats() for name in matched}
    outputs = [n for n in matched if n.startswith(OUTPUT_PREFIX)]
    inner = [n for n in matched if not n.startswith(OUTPUT_PREFIX)]
    instrumented = {name: PairStats() for name in outputs}
    seconds = {"prepare": 0.0, "float": 0.0, "quantized": 0.0, "statistics": 0.0}
    shape_mismatch: list[str] = []

    def fold(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]],
             into: dict[str, PairStats]) -> None:
        for name, r, q in pairs:
            if r.shape != q.shape:
                if name not in shape_mismatch:
                    shape_mismatch.append(name)
                continue
            into[name].update(r, q)

    with tempfile.TemporaryDirectory(prefix="lbcc-compare-") as tmp:
        fsess = _session_with_outputs(fmodel, [fouts[n] for n in matched],
                                      Path(tmp) / "float.onnx", threads)
        qsess = _session_with_outputs(qmodel, [qouts[n] for n in matched],
                                      Path(tmp) / "quantized.onnx", threads, numerics)
        psess = (_session_with_outputs(qmodel, [], Path(tmp) / "deployed.onnx", threads,
                                       numerics) if check_fusions and inner and outputs else None)
        fnames = [fouts[n].name for n in matched]
        qnames = [qouts[n].name for n in matched]
        pnames = [qouts[n].name for n in outputs]
        qinputs = {i.name for i in qsess.get_inputs()}
        seconds["prepare"] = time.perf_counter() - t0
        count = 0
        samples = feed.samples(fmodel)
        for sample in track(samples, total=len(feed), description="comparing", enabled=progress):
            if max_samples is not None and count >= max_samples:
                break
            qsample = {k: v for k, v in sample.items() if k in qinputs}
            t = time.perf_counter()
            fvals = dict(zip(matched, fsess.run(fnames, sample)))
            t1 = time.perf_counter()
            qvals = dict(zip(matched, qsess.run(qnames, qsample)))
            pvals = dict(zip(outputs, psess.run(pnames, qsample))) if psess else {}
            t2 = time.perf_counter()
            fold(((n, fvals[n], qvals[n]) for n in inner), stats)
            if psess is None:
                fold(((n, fvals[n], qvals[n]) for n in outputs), stats)
            else:
                fold(((n, fvals[n], pvals[n]) for n in outputs), stats)
                fold(((n, fvals[n], qvals[n]) for n in outputs), instrumented)
            del fvals, qvals, pvals
            seconds["float"] += t1 - t
            seconds["quantized"] += t2 - t1
            seconds["statistics"] += time.perf_counter() - t2
            count += 1
        del fsess, qsess, psess
    if count == 0:
        raise BadInputError("the comparison data holds no samples.", "Give at least one sample.")
    unmatched["shape_mismatch"] = shape_mismatch
    rows = [{"layer": name, "order": order[name], **stats[name].row()}
            for name in matched if stats[name].count]
    rows.sort(key=_sort_key)
    seconds = {k: round(v, 3) for k, v in seconds.items()}
    seconds["total"] = round(time.perf_counter() - t0, 3)
    inst = {n: st.row() for n, st in instrumented.items() if st.count}
    warnings = []
    for name, row in inst.items():
        deployed = stats[name].row()["sqnr_db"]
        if deployed is not None and row["sqnr_db"] is not None and \
                row["sqnr_db"] - deployed > 1.0:
            warnings.append(
                f"{name}: the deployed model's SQNR is {deployed:.1f} dB but {row['sqnr_db']:.1f}"
                f" dB with the layer outputs exposed: ONNX Runtime's fused kernels (e.g. "
                "QLinearMatMul with a requantized output) lose accuracy the per-layer rows "
                "cannot show")
    return CompareResult(rows=rows, samples=count, seconds=seconds, unmatched=unmatched,
                         instrumented_outputs=inst, warnings=warnings, numerics=numerics)


# ----------------------------------------------------------------------------- diff

def _weights_of(model: ir.Model) -> dict[str, dict[str, Any]]:
    """Per layer: its ops and the bytes of the initializers its nodes read."""
    out: dict[str, dict[str, Any]] = {}
    for node in model.graph:
        entry = out.setdefault(layer_name(node), {"ops": {}, "weight_bytes": 0, "_seen": set()})
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        entry["ops"][key] = entry["ops"].get(key, 0) + 1
        for v in node.inputs:
            if v is not None and v.const_value is not None and v.name not in entry["_seen"]:
                entry["_seen"].add(v.name)
                entry["weight_bytes"] += v.const_value.nbytes
    for entry in out.values():
        del entry["_seen"]
    return out


def diff(a: ir.Model, b: ir.Model, max_names: int = 50) -> dict[str, Any]:
    """What changed from model ``a`` to model ``b`` (e.g. two snapshots of one pipeline run).

    ``initializers.changed`` lists same-named tensors whose bytes differ, with, when both are
    float arrays of one shape, ``rel_change = ||b - a|| / ||a||`` and the max absolute change.
    ``layers`` lists each layer whose ops or weight bytes changed.
    """
    ha, hb = op_histogram(a), op_histogram(b)
    ops = {k: hb.get(k, 0) - ha.get(k, 0) for k in sorted(set(ha) | set(hb))}
    na = {n.name for n in a.graph if n.name}
    nb = {n.name for n in b.graph if n.name}
    ia, ib = a.graph.initializers, b.graph.initializers
    changed = []
    for name in sorted(set(ia) & set(ib)):
        ta, tb = ia[name].const_value, ib[name].const_value
        if ta is None or tb is None:
            continue
        if ta.dtype != tb.dtype or tuple(ta.shape) != tuple(tb.shape):
            changed.append({"name": name, "from": f"{ta.dtype.name}{list(ta.shape)}",
                            "to": f"{tb.dtype.name}{list(tb.shape)}"})
            continue
        xa, xb = ta.numpy(), tb.numpy()
        if np.array_equal(xa, xb):
            continue
        row: dict[str, Any] = {"name": name}
        if ta.dtype.is_floating_point():
            fa, fb = xa.astype(np.float64), xb.astype(np.float64)
            row["max_abs_change"] = float(np.abs(fb - fa).max())
            row["rel_change"] = float(np.linalg.norm(fb - fa) / max(np.linalg.norm(fa), 1e-30))
        changed.append(row)
    la, lb = _weights_of(a), _weights_of(b)
    layers = []
    for name in sorted(set(la) | set(lb)):
        ea, eb = la.get(name), lb.get(name)
        if ea == eb:
            continue
        layers.append({"layer": name, "ops_before": (ea or {}).get("ops", {}),
                       "ops_after": (eb or {}).get("ops", {}),
                       "weight_bytes_before": (ea or {}).get("weight_bytes", 0),
                       "weight_bytes_after": (eb or {}).get("weight_bytes", 0)})
    return {
        "schema_version": DEBUG_SCHEMA_VERSION, "kind": "diff",
        "ops": {k: v for k, v in ops.items() if v},
        "nodes": {"added": len(nb - na), "removed": len(na - nb),
                  "added_names": sorted(nb - na)[:max_names],
                  "removed_names": sorted(na - nb)[:max_names]},
        "initializers": {"added": sorted(set(ib) - set(ia))[:max_names],
                         "removed": sorted(set(ia) - set(ib))[:max_names],
                         "changed": changed},
        "layers": layers,
    }


def bisect(*args: Any, **kwargs: Any) -> Any:
    """See :func:`lbcc.bisect.bisect`."""
    from lbcc.bisect import bisect as _bisect

    return _bisect(*args, **kwargs)
