"""Text generation over a KV-cache graph (:mod:`lbcc.kvcache`) in ONNX Runtime.

One prefill runs the prompt ``ids[0:n]`` with an empty cache; each decode step feeds the last
token at position ``n + i``. Two ways to carry the cache between steps, both through I/O binding
(no step copies a cache through numpy):

- shared buffer (every ``present.N.*`` is a ``GroupQueryAttention`` output, i.e. a fused graph;
  onnxruntime-genai's ``past_present_share_buffer``): one buffer a cache, sized for ``prompt + new
  tokens`` (up to 1024 positions beyond the prompt at first, doubled when full), bound as ``past``
  and as ``present``; the kernel finds the valid length from ``seqlens_k`` and writes the new
  entries in place, so a step copies and allocates nothing. The binding, the caches and the step's
  small inputs are made once a generation (in the timed prefill step).
- concatenation (any other graph): ``present = concat(past, new)`` is a new value each step and
  becomes the next ``past``.

A graph with the optional ``logits_to_keep`` input (lbcc's fused graphs) is fed 1: the prefill
computes the lm_head for the prompt's last position only.

Next-token choice from the last position's logits ``z``:
- greedy: ``argmax z``;
- top-p (nucleus, Holtzman et al. 2020): ``p = softmax(z / T)``, sorted descending; keep the
  smallest prefix whose mass is >= P, renormalize, draw with a seeded generator (reproducible).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from lbcc.errors import BadInputError
from lbcc.kvcache import (KVLayout, keeps_last_logits, kv_layout, max_positions,
                          presents_from_gqa)


@dataclasses.dataclass
class GenerationStats:
    """Timing of the last generation: prefill (prompt) and decode (one token a step)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by decode steps (the first new token comes from the prefill)."""
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "decode_tokens_per_s": self.decode_tokens_per_s}


def sample_top_p(logits: np.ndarray, top_p: float, temperature: float,
                 rng: np.random.Generator) -> int:
    """Draw from the smallest set of most likely tokens whose probability mass is >= top_p."""
    z = logits.astype(np.float64) / max(temperature, 1e-6)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    keep = order[: int(np.searchsorted(cum, top_p)) + 1]
    q = p[keep] / p[keep].sum()
    return int(keep[rng.choice(len(keep), p=q)])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Generator:
    """Generate from an lbcc (or onnxruntime-genai) KV-cache ONNX model.

    ``model``: path to the .onnx file. ``tokenizer``: a tokenizer.json or a HF directory (needed
    for text prompts; token-id generation works without). ``max_context``: the longest sequence
    (prompt + new tokens); by default the context length lbcc's capture recorded in the model
    (at most that: it sizes the rotary caches), else ``context_length`` of a genai_config.json
    beside the model, else ``max_position_embeddings`` of the tokenizer directory's config.json.
    ``share_buffer``: keep the cache in one fixed-size buffer a layer (see the module docstring);
    by default when the graph allows it.
    """

    def __init__(self, model: str | os.PathLike, tokenizer: Any = None, *, threads: int = 2,
                 max_context: int | None = None, session: Any = None,
                 share_buffer: bool | None = None):
        from lbcc.evaluate import make_session

        self.model_path = Path(model)
        self.session = session if session is not None else make_session(self.model_path, threads)
        layout = kv_layout(self.session)
        if layout is None:
            raise BadInputError(
                f"{str(self.model_path)!r} has no KV cache (no past_key_values.N.key/value "
                "inputs), so it cannot generate one token at a time.",
                "Compile it with a cache: lbcc compile HF_DIR --kv-cache -o OUT.onnx ...")
        self.layout: KVLayout = layout
        self.tokenizer = self._load_tokenizer(tokenizer)
        recorded = max_positions(self.session.get_modelmeta().custom_metadata_map)
        if max_context and recorded and max_context > recorded:
            raise BadInputError(
                f"max_context {max_context} is beyond the {recorded} positions "
                f"{str(self.model_path)!r} holds (its max_position_embeddings, which sizes its "
                "rotary caches).", f"Pass --max-context {recorded} or less.")
        self.max_context = max_context or recorded or self._find_context()
        self.eos_ids = self._find_eos()
        self.stats = GenerationStats()
        self._out_names = [o.name for o in self.session.get_outputs()]
        missing = set(layout.output_names()) - set(self._out_names)
        if missing:
            raise BadInputError(f"{str(self.model_path)!r} lacks the outputs {sorted(missing)} a "
                                "KV-cache graph returns.",
                                "Export it with lbcc's KV-cache capture (--kv-cache).")
        can_share = presents_from_gqa(self.model_path)
        if share_buffer and not can_share:
            raise BadInputError(f"{str(self.model_path)!r} cannot share past and present cache "
                                "buffers: not every present.N.* is a GroupQueryAttention output.",
                                "Compile it with lbcc (fuse-ort makes GroupQueryAttention), or "
                                "pass share_buffer=False.")
        self.share_buffer = can_share if share_buffer is None else share_buffer
        #: fed to a graph with the optional ``logits_to_keep`` input: the prefill computes the
        #: logits of the prompt's last position only (the only ones a generator reads)
        self._keep_last = None
        if keeps_last_logits(self.session):
            import onnxruntime as ort

            self._keep_last = ort.OrtValue.ortvalue_from_numpy(np.array(1, np.int64))

    def _bind_keep_last(self, binding: Any) -> None:
        """Bind ``logits_to_keep`` = 1 where the graph has it (as an OrtValue: ONNX Runtime's
        ``bind_cpu_input`` does not find overridable initializers by name)."""
        if self._keep_last is not None:
            binding.bind_ortvalue_input("logits_to_keep", self._keep_last)

    # ------------------------------------------------------------------ set-up helpers
    def _load_tokenizer(self, spec: Any) -> Any:
        if spec is None or not isinstance(spec, (str, os.PathLike)):
            return spec
        from lbcc.calibration import load_tokenizer

        self._tokenizer_dir = Path(spec) if Path(spec).is_dir() else Path(spec).parent
        return load_tokenizer(spec)

    def _config_dirs(self) -> list[Path]:
        dirs = [self.model_path.parent]
        if getattr(self, "_tokenizer_dir", None) is not None:
            dirs.append(self._tokenizer_dir)
        return dirs

    def _find_context(self) -> int | None:
        for d in self._config_dirs():
            genai = _read_json(d / "genai_config.json").get("model", {})
            if isinstance(genai.get("context_length"), int):
                return genai["context_length"]
            cfg = _read_json(d / "config.json")
            if isinstance(cfg.get("max_position_embeddings"), int):
                return cfg["max_position_embeddings"]
        return None

    def _find_eos(self) -> set[int]:
        for d in self._config_dirs():
            for name in ("generation_config.json", "config.json"):
                eos = _read_json(d / name).get("eos_token_id")
                if eos is not None:
                    return set(eos if isinstance(eos, list) else [eos])
            genai = _read_json(d / "genai_config.json").get("model", {}).get("eos_token_id")
            if genai is not None:
                return set(genai if isinstance(genai, list) else [genai])
        return set()

    # ------------------------------------------------------------------ generation
    def encode(self, prompt: str) -> np.ndarray:
        if self.tokenizer is None:
            raise BadInputError("generating from a text prompt needs a tokenizer.",
                                "Pass --tokenizer PATH (tokenizer.json or the HF model "
                                "directory), or token ids.")
        if not prompt or not prompt.strip():
            raise BadInputError("the prompt is empty.", "Pass a non-empty --prompt.")
        return np.asarray(self.tokenizer.encode(prompt).ids, dtype=np.int64)

    def _check_prompt(self, ids: np.ndarray) -> None:
        if ids.ndim != 1 or ids.size == 0:
            raise BadInputError("the prompt has no tokens.", "Pass a non-empty prompt.")
        if self.max_context is not None and ids.size >= self.max_context:
            raise BadInputError(
                f"the prompt has {ids.size} tokens, and the model's context holds "
                f"{self.max_context} (prompt + new tokens).",
                "Shorten the prompt.")

    def generate_ids(self, prompt_ids: Sequence[int] | np.ndarray, max_new_tokens: int = 64, *,
                     greedy: bool = True, top_p: float = 0.9, temperature: float = 1.0,
                     seed: int = 0, stop_at_eos: bool = True) -> Iterator[int]:
        """Yield new token ids one at a time (greedy, or top-p sampling with ``seed``)."""
        ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        self._check_prompt(ids)
        if max_new_tokens < 1:
            raise BadInputError(f"max_new_tokens is {max_new_tokens}.", "Ask for at least 1.")
        if not greedy and not 0.0 < top_p <= 1.0:
            raise BadInputError(f"top_p {top_p} is outside (0, 1].", "Pass e.g. --top-p 0.9.")
        if self.max_context is not None:
            max_new_tokens = min(max_new_tokens, self.max_context - ids.size)
        rng = np.random.default_rng(seed)
        self.stats = stats = GenerationStats(prompt_tokens=int(ids.size))
        run = self._shared_steps(ids, max_new_tokens) if self.share_buffer \
            else self._concat_steps(ids)
        token: int | None = None
        for step in range(max_new_tokens):
            start = time.perf_counter()
            logits = run(token)
            token = int(np.argmax(logits)) if greedy else sample_top_p(logits, top_p,
                                                                       temperature, rng)
            elapsed = time.perf_counter() - start
            if step == 0:
                stats.prefill_s = elapsed
            else:
                stats.decode_s += elapsed
            stats.new_tokens += 1
            yield token
            if stop_at_eos and token in self.eos_ids:
                return

    #: positions a shared cache holds beyond the prompt at first; it doubles when full, so a
    #: large ``max_new_tokens`` does not allocate its whole cache up front
    initial_room = 1024

    def _shared_steps(self, ids: np.ndarray, max_new_tokens: int) -> Any:
        """``run(token)``: the prefill (``token`` None), then one decode step a token; returns the
        last position's logits. Past and present share one buffer a cache (``len(ids) +
        max_new_tokens - 1`` positions, or :attr:`initial_room` beyond the prompt, doubled when
        full); the binding is built once and only the step's token, position and attention-mask
        length change."""
        import onnxruntime as ort

        layout, sess = self.layout, self.session
        needed = int(ids.size) + max_new_tokens - 1  # the last new token is never fed back
        binding = sess.io_binding()
        keep: dict[str, Any] = {}  # numpy buffers behind the bound OrtValues: alive while we run
        state: dict[str, Any] = {"past": 0, "capacity": 0}

        def bind_caches(capacity: int) -> None:
            """(Re)allocate the caches at ``capacity`` positions, keeping the valid ones."""
            shape = (1, layout.kv_heads, capacity, layout.head_dim)
            for past, present in zip(layout.past_names(), layout.output_names()[1:]):
                buf = np.zeros(shape, layout.dtype)
                if past in keep:
                    buf[:, :, :state["past"]] = keep[past][:, :, :state["past"]]
                value = ort.OrtValue.ortvalue_from_numpy(buf)
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
                keep[past], keep[present] = buf, value
            keep["ones"] = np.ones(capacity, np.int64)
            state["capacity"] = capacity

        token_buf = np.zeros((1, 1), np.int64)
        pos_buf = np.zeros((1, 1), np.int64)

        def run(token: int | None) -> np.ndarray:
            if token is None:  # prefill: the prompt at positions 0 .. n-1
                bind_caches(min(needed, int(ids.size) + self.initial_room))
                for name, value in layout.token_inputs(ids[None, :], 0).items():
                    binding.bind_cpu_input(name, value)
                self._bind_keep_last(binding)
                binding.bind_output("logits", "cpu")
                sess.run_with_iobinding(binding)
                logits = binding.get_outputs()[-1].numpy()  # bound last: the newest output
                # decode steps write their [1, 1, vocab] logits into one preallocated buffer
                keep["logits"] = np.empty((1, 1, logits.shape[-1]), logits.dtype)
                binding.bind_ortvalue_output(
                    "logits", ort.OrtValue.ortvalue_from_numpy(keep["logits"]))
                binding.bind_ortvalue_input("input_ids",
                                            ort.OrtValue.ortvalue_from_numpy(token_buf))
                if layout.has_position_ids:
                    binding.bind_ortvalue_input("position_ids",
                                                ort.OrtValue.ortvalue_from_numpy(pos_buf))
                state["past"] = int(ids.size)
                return logits[0, -1]
            past = state["past"]
            if past + 1 > state["capacity"]:
                bind_caches(min(max(2 * state["capacity"], past + 1), max(needed, past + 1)))
            token_buf[0, 0] = token
            pos_buf[0, 0] = past
            if layout.has_attention_mask:
                binding.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(
                    keep["ones"][: past + 1].reshape(1, past + 1)))
            sess.run_with_iobinding(binding)
            state["past"] = past + 1
            return keep["logits"][0, -1]

        return run

    def _concat_steps(self, ids: np.ndarray) -> Any:
        """``run(token)`` for a graph whose ``present`` is ``concat(past, new)``: each step's
        presents (ONNX Runtime values, not copied) become the next step's pasts."""
        import onnxruntime as ort

        layout, sess = self.layout, self.session
        out_names = layout.output_names()
        state: dict[str, Any] = {"past": layout.empty_past(1), "len": 0}

        def run(token: int | None) -> np.ndarray:
            feed_ids = ids[None, :] if token is None else np.array([[token]], np.int64)
            binding = sess.io_binding()
            for name, value in layout.token_inputs(feed_ids, state["len"]).items():
                binding.bind_cpu_input(name, value)
            self._bind_keep_last(binding)
            for name, value in zip(layout.past_names(), state["past"]):
                if isinstance(value, ort.OrtValue):
                    binding.bind_ortvalue_input(name, value)
                else:
                    binding.bind_cpu_input(name, value)
            for name in out_names:
                binding.bind_output(name, "cpu")
            sess.run_with_iobinding(binding)
            outs = binding.get_outputs()
            state["past"] = list(outs[1:])
            state["len"] += feed_ids.shape[1]
            return outs[0].numpy()[0, -1]

        return run

    def generate(self, prompt: str, max_new_tokens: int = 64, **kwargs: Any) -> Iterator[str]:
        """Yield the text of new tokens as it becomes printable (whole UTF-8 characters)."""
        ids = self.encode(prompt)
        new: list[int] = []
        shown = ""
        for token in self.generate_ids(ids, max_new_tokens, **kwargs):
            if token in self.eos_ids:
                break
            new.append(token)
            text = self.tokenizer.decode(new)
            if text.endswith("\ufffd"):
                continue  # a multi-byte character split across tokens: wait for the rest
            if text.startswith(shown):
                yield text[len(shown):]
                shown = text
        text = self.tokenizer.decode(new) if new else ""
        if text != shown and text.startswith(shown):
            yield text[len(shown):]
