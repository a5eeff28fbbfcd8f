"""The model half of an emitted ``model.py``: a Llama-family decoder over the packed tensors.

This file is copied into ``OUT_DIR/model.py`` after ``kernels.py`` and ``ops.py`` (the lines
between the ``lbcc:strip`` markers are dropped there), so it needs only torch, triton and
safetensors at run time. The manifest says which fused linear groups exist (``qkv``,
``gate_up``) and how each is stored (``wq``: packed 4/8-bit groups, ``w8a8``: int8 per channel
with per-token int8 activations, RMSNorm fused into the activation quantization; ``fp8``: the
same with float8_e4m3fn weights and activations, s = max|x| / 448; ``fp16``).

Decoder step for layer l (h: residual stream):
    a = RMSNorm(h) ; q, k, v = split(a @ Wqkv^T) ; rotary(q, k) ; write k, v to the cache
    h = h + o_proj(SDPA(q, K[:pos], V[:pos]))
    m = RMSNorm(h) ; g, u = split(m @ Wgate_up^T) ; h = h + down_proj(silu(g) * u)
logits = RMSNorm(h) @ Wlm^T
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

# lbcc:strip-begin
from .ops import (linear_epilogue, rms_norm_fused, rope_and_cache, w8a8_linear_fp,
                  wq_linear)
# lbcc:strip-end


class Linear:
    """One stored linear layer (or a fused group of them, concatenated along N)."""

    def __init__(self, meta: dict, t: dict, name: str):
        self.kind, self.n, self.k = meta["kind"], meta["out"], meta["in"]
        self.splits = meta.get("splits", [self.n])
        self.bits, self.group = meta.get("bits"), meta.get("group")
        if self.kind == "wq":
            self.qweight, self.scales = t[name + ".qweight"], t[name + ".scales"]
            self.zeros = t.get(name + ".zeros")
        elif self.kind in ("w8a8", "fp8"):
            self.weight, self.wscale = t[name + ".weight"], t[name + ".wscale"]
            if self.kind == "fp8":  # stored as the E4M3 bytes
                self.weight = self.weight.view(torch.float8_e4m3fn)
        else:
            self.weight = t[name + ".weight"]

    def __call__(self, x: torch.Tensor, gamma: torch.Tensor | None = None, eps: float = 0.0,
                 residual: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
        """``y = (RMSNorm(x) * gamma if gamma is given else x) @ W^T``, then ``residual + y``
        or, with ``glu`` (W = [G; U]), ``silu(y_G) * y_U``. The GEMVs (weight-only and W8A8 /
        FP8 decode) apply these epilogues inside the kernel."""
        if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return linear_epilogue(self._torch(x, gamma, eps), residual, glu)
        if self.kind in ("w8a8", "fp8"):  # RMSNorm fused into the quantization
            return w8a8_linear_fp(x, self.weight, self.wscale, gamma=gamma, eps=eps,
                                  residual=residual, glu=glu)
        if self.kind == "wq":  # RMSNorm inside the decode GEMV
            return wq_linear(x, self.qweight, self.scales, self.zeros, self.bits, self.group,
                             residual=residual, glu=glu, gamma=gamma, eps=eps)
        if gamma is not None:
            x = rms_norm_fused(x, gamma, eps)
        return linear_epilogue(F.linear(x, self.weight), residual, glu)


    def _torch(self, x: torch.Tensor, gamma: torch.Tensor | None, eps: float) -> torch.Tensor:
        """The same function in plain torch (float32), for machines without a GPU."""
        if gamma is not None:
            x = rms_norm(x, gamma, eps)
        if self.kind in ("w8a8", "fp8"):
            xf = x.float()
            m = xf.abs().amax(-1, keepdim=True)
            m = torch.where(m > 0, m, torch.ones_like(m))
            qmax = 448.0 if self.kind == "fp8" else 127.0
            inv = torch.full_like(m, qmax) / m  # IEEE division, as the kernel's div_rn
            if self.kind == "fp8":
                q = (xf * inv).clamp(-qmax, qmax).to(torch.float8_e4m3fn).float()
            else:
                q = torch.round(xf * inv).clamp(-qmax, qmax)
            y = (q @ self.weight.float().t()) * (m / torch.full_like(m, qmax)) * \
                self.wscale.float()
            return y.to(x.dtype)
        if self.kind == "wq":
            if not hasattr(self, "_w"):
                self._w = torch_dequantize(self.qweight, self.scales, self.zeros, self.bits,
                                           self.group, self.k).float()
            return (x.float() @ self._w.t()).to(x.dtype)
        return (x.float() @ self.weight.float().t()).to(x.dtype)


def torch_dequantize(qw, scales, zeros, bits: int, group: int, k: int) -> torch.Tensor:
    """float16 ``(u - z) * s`` from packed words, in torch (the layout of ``packing.py``)."""
    shifts = torch.arange(0, 32, bits, device=qw.device, dtype=torch.int32)
    words = qw.reshape(*qw.shape[:-1], qw.shape[-1] // 16, 16, 1)  # [.., chunk, word i, 1]
    # bit field j of word i of a chunk is k = 16 j + i of that chunk: [.., chunk, j, i]
    u = ((words >> shifts) & ((1 << bits) - 1)).transpose(-1, -2).flatten(-3)
    s = scales.repeat_interleave(group, -1)
    z = (zeros.repeat_interleave(group, -1).to(torch.float16) if zeros is not None
         else torch.full_like(s, 1 << (bits - 1)))
    return ((u.to(torch.float16) - z) * s)[..., :k]


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * gamma.float()).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half form: x*cos + [-x2, x1]*sin (cos/sin [T, hd/2] per row)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h].float(), x[..., h:].float()
    c, s = cos[:, None, :].float(), sin[:, None, :].float()  # [B*T, 1, hd/2] against heads
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(x.dtype)


class KVCache:
    """Static cache ``[layers, 2, B, kv_heads, max_len, head_dim]`` and the next position."""

    def __init__(self, model: "Model", batch: int, max_len: int):
        c = model.config
        self.max_len = max_len
        self.kv = torch.zeros((c["layers"], 2, batch, c["kv_heads"], max_len, c["head_dim"]),
                              dtype=model.dtype, device=model.device)
        self.pos = torch.zeros((), dtype=torch.long, device=model.device)  # graph-safe

    @property
    def length(self) -> int:
        return int(self.pos.item())


class Model:
    def __init__(self, manifest: dict, tensors: dict, device: torch.device):
        self.manifest, self.config = manifest, manifest["config"]
        self.device, self.dtype = torch.device(device), torch.float16
        t = {k: v.to(self.device) for k, v in tensors.items()}
        self.t = t
        c = self.config
        self.layers = []
        for i in range(c["layers"]):
            p = f"layers.{i}."
            self.layers.append({
                "in_norm": t[p + "input_layernorm"], "post_norm": t[p + "post_attention_layernorm"],
                "qkv": Linear(manifest["linears"][p + "qkv"], t, p + "qkv"),
                "o": Linear(manifest["linears"][p + "o_proj"], t, p + "o_proj"),
                "gate_up": Linear(manifest["linears"][p + "gate_up"], t, p + "gate_up"),
                "down": Linear(manifest["linears"][p + "down_proj"], t, p + "down_proj")})
        self.norm = t["norm"]
        self.lm_head = Linear(manifest["linears"]["lm_head"], t, "lm_head")
        self.embed = manifest["embedding"]
        self.cos, self.sin = t.get("rope.cos"), t.get("rope.sin")
        self._graphs: dict = {}

    # --- embedding: rows of the stored table, dequantized when it is packed
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embed
        if e["kind"] == "fp16":
            return self.t["embed.weight"][ids]
        z = self.t.get(e["name"] + ".zeros")
        return torch_dequantize(self.t[e["name"] + ".qweight"][ids],
                                self.t[e["name"] + ".scales"][ids],
                                None if z is None else z[ids], e["bits"], e["group"],
                                self.config["hidden"])

    # --- one forward over T new tokens at positions pos .. pos+T-1
    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` (float16); appends to ``kv_cache`` (a fresh one if None)."""
        c = self.config
        b, t = input_ids.shape
        if kv_cache is None:
            kv_cache = KVCache(self, b, t)
        pos = kv_cache.pos
        positions = pos + torch.arange(t, device=self.device)
        h = self.embed_tokens(input_ids)
        nh, nkv, hd = c["heads"], c["kv_heads"], c["head_dim"]
        kernels = self.device.type != "cpu" or os.environ.get("TRITON_INTERPRET") == "1"
        cos = sin = None
        if self.cos is not None and not kernels:
            cos = self.cos.index_select(0, positions).repeat(b, 1)  # [B*T, hd/2]
            sin = self.sin.index_select(0, positions).repeat(b, 1)
        L = kv_cache.max_len
        keys = torch.arange(L, device=self.device)
        mask = keys[None, :] <= positions[:, None]  # [T, L]: causal over the cache
        eps = c["eps"]
        for i, lay in enumerate(self.layers):
            qkv = lay["qkv"](h, lay["in_norm"], eps).reshape(b * t, -1)
            cache = kv_cache.kv[i]
            if kernels:  # one launch: rotary on q, k; k, v into the cache
                q = rope_and_cache(qkv, positions, self.cos, self.sin, cache, t, nh, nkv, hd)
            else:
                q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
                q, k = q.reshape(b * t, nh, hd), k.reshape(b * t, nkv, hd)
                v = v.reshape(b * t, nkv, hd)
                if cos is not None:
                    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
                cache[0].index_copy_(2, positions, k.reshape(b, t, nkv, hd).transpose(1, 2))
                cache[1].index_copy_(2, positions, v.reshape(b, t, nkv, hd).transpose(1, 2))
            qh = q.reshape(b, t, nh, hd).transpose(1, 2)
            o = F.scaled_dot_product_attention(qh, cache[0], cache[1], attn_mask=mask,
                                               enable_gqa=nh != nkv)
            h = lay["o"](o.transpose(1, 2).reshape(b, t, nh * hd), residual=h)
            act = lay["gate_up"](h, lay["post_norm"], eps, glu=True)  # silu(gate) * up
            h = lay["down"](act, residual=h)
        kv_cache.pos.add_(t)
        return self.lm_head(h, self.norm, eps)

    __call__ = forward

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self, batch, max_len)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32,
                 cuda_graph: bool | None = None, max_len: int | None = None) -> torch.Tensor:
        """Greedy decoding; returns ``[B, T + max_new_tokens]`` token ids.

        The prefill runs eagerly; on CUDA each decode step replays one captured CUDA graph
        (one per batch size and cache length), since launch overhead would dominate otherwise.
        """
        ids = input_ids.to(self.device)
        b, t = ids.shape
        max_len = max_len or t + max_new_tokens
        cache = self.new_cache(b, max_len)
        logits = self.forward(ids, cache)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out = [ids, nxt]
        use_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        step = self._decode_graph(cache, nxt) if use_graph else None
        for _ in range(max_new_tokens - 1):
            if step is None:
                nxt = self.forward(nxt, cache)[:, -1].argmax(-1, keepdim=True)
            else:
                nxt = step(nxt)
            out.append(nxt)
        return torch.cat(out, 1)

    def _decode_graph(self, cache: KVCache, example: torch.Tensor):
        """A function ``ids[B, 1] -> next ids`` that replays a CUDA graph of one decode step."""
        ids_buf = example.clone()
        pos0 = cache.pos.clone()
        self.forward(ids_buf, cache)  # warm-up: compiles and tunes every kernel outside capture
        cache.pos.copy_(pos0)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out_buf = self.forward(ids_buf, cache)[:, -1].argmax(-1, keepdim=True)
        cache.pos.copy_(pos0)  # the capture advanced it once without running

        def step(ids: torch.Tensor) -> torch.Tensor:
            ids_buf.copy_(ids)
            g.replay()
            return out_buf.clone()
        step.graph = g
        return step


def load(path: str | os.PathLike = os.path.dirname(os.path.abspath(__file__)),
         device: str | torch.device = "cuda") -> Model:
    """The model stored in directory ``path`` (manifest.json + weights.safetensors)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("version") != 2:
        raise ValueError(f"{path}: packed-weight format version {manifest.get('version')}; this "
                         "module reads version 2 (recompile the model with this lbcc)")
    tensors = load_file(os.path.join(path, "weights.safetensors"))
    return Model(manifest, tensors, torch.device(device))
