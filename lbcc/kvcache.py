"""KV-cache graph conventions: names, layout detection and the feeds of a prefill / decode step.

A KV-cache graph (the naming onnxruntime-genai uses) has the inputs

    input_ids[batch, seq] (int64), attention_mask[batch, past + seq] (int64),
    position_ids[batch, seq] (int64), past_key_values.N.key / .value[batch, kv_heads, past, head_dim]

(lbcc's fused graphs also take an optional ``logits_to_keep`` int64 scalar, an overridable
initializer of 0: fed ``k > 0``, ``logits`` holds the last ``k`` positions only) and the outputs
``logits[batch, seq, vocab]`` and ``present.N.key / .value[batch, kv_heads,
past + seq, head_dim]`` (``present = concat(past, new, axis=2)``). One graph serves prefill
(``past = 0``, ``seq = prompt length``) and decode (``seq = 1``). Everything here works on name /
shape / dtype triples, so it serves an ``ir.Model`` and an ONNX Runtime session alike.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")
#: ``logits_to_keep`` (optional, default all positions): the prefill of a generator feeds 1
AUX_INPUTS = ("attention_mask", "position_ids", "logits_to_keep")
#: ``metadata_props`` key of a KV-cache capture: the model's context length
#: (``max_position_embeddings``), which sizes constant rotary caches (:mod:`lbcc.passes.kv_fusions`)
MAX_POSITIONS_KEY = "lbcc.max_positions"


def max_positions(metadata: Mapping[str, str]) -> int | None:
    """The context length a KV-cache capture recorded, or None: ``metadata`` is an
    ``ir.Model``'s ``metadata_props`` or an ONNX Runtime session's ``custom_metadata_map``."""
    value = metadata.get(MAX_POSITIONS_KEY, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """What a KV-cache graph expects: layer count, cache shape per layer, optional inputs."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: Any  # numpy dtype of the cache
    has_attention_mask: bool
    has_position_ids: bool

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        """[key_0, value_0, key_1, ...] with past length 0 (a prefill)."""
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, self.dtype) for _ in range(2 * self.num_layers)]

    def token_inputs(self, ids: np.ndarray, past_len: int) -> dict[str, np.ndarray]:
        """input_ids, attention_mask (all ones) and position_ids of ``ids[batch, seq]`` at
        positions ``past_len .. past_len + seq - 1``."""
        ids = np.asarray(ids, dtype=np.int64)
        batch, seq = ids.shape
        feed: dict[str, np.ndarray] = {"input_ids": ids}
        if self.has_attention_mask:
            feed["attention_mask"] = np.ones((batch, past_len + seq), np.int64)
        if self.has_position_ids:
            feed["position_ids"] = np.broadcast_to(
                np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy()
        return feed

    def feed(self, ids: np.ndarray, past: Sequence[np.ndarray], past_len: int
             ) -> dict[str, np.ndarray]:
        """All inputs of one step: :meth:`token_inputs` and the cache ``past``."""
        feed = self.token_inputs(ids, past_len)
        for i in range(self.num_layers):
            feed[past_name(i, "key")] = past[2 * i]
            feed[past_name(i, "value")] = past[2 * i + 1]
        return feed

    def past_names(self) -> list[str]:
        return [past_name(i, kv) for i in range(self.num_layers) for kv in ("key", "value")]

    def output_names(self) -> list[str]:
        return ["logits"] + [present_name(i, kv) for i in range(self.num_layers)
                             for kv in ("key", "value")]


_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(bfloat16)": np.float32, "tensor(int8)": np.int8}


def _triples(source: Any) -> list[tuple[str, list, Any]]:
    """(name, shape, numpy dtype) of the inputs of an ir.Model / ORT session / list of triples."""
    if isinstance(source, list):
        return source
    if hasattr(source, "get_inputs"):  # onnxruntime.InferenceSession
        return [(i.name, list(i.shape), _NP_DTYPES.get(i.type, np.float32))
                for i in source.get_inputs()]
    graph = source.graph if hasattr(source, "graph") else source
    out = []
    for v in graph.inputs:
        shape = [d if isinstance(d, int) else None for d in v.shape] if v.shape is not None else []
        dtype = v.dtype.numpy() if v.dtype is not None and (
            v.dtype.is_floating_point() or v.dtype.name == "INT8") else np.float32
        out.append((v.name, shape, dtype))
    return out


def kv_layout(source: Any) -> KVLayout | None:
    """The KV layout of a graph's inputs, or None when it has no ``past_key_values.N.*`` input."""
    triples = _triples(source)
    layers: dict[int, dict[str, tuple]] = {}
    names = set()
    for name, shape, dtype in triples:
        names.add(name)
        m = PAST_RE.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = (shape, dtype)
    if not layers:
        return None
    from lbcc.errors import BadInputError

    n = max(layers) + 1
    if sorted(layers) != list(range(n)) or any(set(v) != {"key", "value"} for v in layers.values()):
        raise BadInputError(f"the model's past_key_values inputs are incomplete: layers "
                            f"{sorted(layers)}, each needs .key and .value.",
                            "Export the model with lbcc's KV-cache capture (--kv-cache).")
    shape, dtype = layers[0]["key"]
    if "input_ids" not in names or len(shape) != 4 or not isinstance(shape[1], int) \
            or not isinstance(shape[3], int):
        raise BadInputError(f"the model's KV-cache inputs do not follow the layout input_ids + "
                            f"past_key_values.N.key[batch, kv_heads, past, head_dim] "
                            f"(past_key_values.0.key has shape {shape}).",
                            "Export the model with lbcc's KV-cache capture (--kv-cache).")
    return KVLayout(num_layers=n, kv_heads=shape[1], head_dim=shape[3], dtype=np.dtype(dtype),
                    has_attention_mask="attention_mask" in names,
                    has_position_ids="position_ids" in names)


def is_cache_input(name: str) -> bool:
    """An input a KV-cache graph has besides ``input_ids``."""
    return name in AUX_INPUTS or PAST_RE.match(name) is not None


def prefill_inputs(source: Any, ids: np.ndarray) -> dict[str, np.ndarray]:
    """``{input_ids: ids}`` for a cache-free graph; the full prefill feed (empty past) otherwise.

    This is how calibration, evaluation and verification run a KV-cache graph: a prefill of the
    whole window computes the same logits as the cache-free graph.
    """
    layout = kv_layout(source)
    if layout is None:
        name = _triples(source)[0][0]
        return {name: ids}
    return layout.feed(ids, layout.empty_past(ids.shape[0]), 0)


def keeps_last_logits(session: Any) -> bool:
    """The session's graph takes the optional ``logits_to_keep`` input (see ``last_logits``)."""
    try:
        names = {i.name for i in session.get_overridable_initializers()}
    except AttributeError:
        return False
    return "logits_to_keep" in names | {i.name for i in session.get_inputs()}


def presents_from_gqa(source: Any) -> bool:
    """Every ``present.N.*`` output is a ``com.microsoft::GroupQueryAttention`` output: the one
    kernel that can write the new entries into a past buffer in place, so past and present may be
    one fixed-size buffer (onnxruntime-genai's ``past_present_share_buffer``). ``source``: an
    ``ir.Model`` or the path of an .onnx file (its external data is not read)."""
    if isinstance(source, (str, os.PathLike)):
        import onnx

        try:
            graph = onnx.load(str(source), load_external_data=False).graph
        except Exception:  # noqa: BLE001 - unreadable: the caller falls back to concatenation
            return False
        producer = {o: (n.domain, n.op_type) for n in graph.node for o in n.output}
        outputs = [o.name for o in graph.output]
    else:
        graph = source.graph if hasattr(source, "graph") else source
        producer = {o.name: (n.domain, n.op_type) for n in graph for o in n.outputs}
        outputs = [o.name for o in graph.outputs]
    presents = [o for o in outputs if PRESENT_RE.match(o)]
    return bool(presents) and all(producer.get(o) == ("com.microsoft", "GroupQueryAttention")
                                  for o in presents)
