"""stories260K (llama2.c format) as a one-token decode step for the c target.

The model file and tokenizer are read here (formats in ``../shared/README.md``); the decode step
is written as an ONNX graph with fixed shapes, using only ops the c target runs:

- per layer, RMSNorm as ``x / sqrt((x*x) @ 1/D + eps) * w`` (a MatMul with a constant averaging
  vector, not ReduceMean), q/k/v projections, RoPE on adjacent pairs as
  ``x * cos[pos] + (x @ R) * sin[pos]`` (R the constant pair rotation, cos/sin rows gathered by
  position), grouped-query attention over an int8 KV cache of ``ctx`` rows (caller-owned, one
  QuantizeLinear'd row written per step: ``k_new``/``v_new``) plus the current row, an additive
  mask input (0 for the positions attended, -inf otherwise), Softmax, wo, SiLU-gated MLP;
- the tied embedding: Gather for the input token, MatMul with its transpose for the logits.

The averaging vector and the RoPE rotation are constants in MatMuls; :func:`recipe` keeps them in
float (a ``[[layers]] skip`` rule) so only the model's linear layers are quantized.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MODEL = SHARED / "stories260K" / "stories260K.bin"
TOKENIZER = SHARED / "stories260K" / "tok512.bin"
EPS = 1e-5


@dataclasses.dataclass
class Llama2C:
    dim: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv: int
    vocab: int
    seq_len: int
    w: dict[str, np.ndarray]

    @property
    def head(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv * self.head


def read_model(path: Path = MODEL) -> Llama2C:
    data = Path(path).read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", data[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    head = dim // n_heads
    kv = n_kv * head
    shapes = [("emb", (vocab, dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
              ("wk", (n_layers, kv, dim)), ("wv", (n_layers, kv, dim)),
              ("wo", (n_layers, dim, dim)), ("rms_ffn", (n_layers, dim)),
              ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
              ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)),
              ("freq_real", (seq_len, head // 2)), ("freq_imag", (seq_len, head // 2))]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    w, off = {}, 28
    for name, shape in shapes:
        n = int(np.prod(shape))
        w[name] = np.frombuffer(data, np.float32, n, off).reshape(shape).copy()
        off += 4 * n
    return Llama2C(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, w)


# ----------------------------------------------------------------------------- tokenizer

@dataclasses.dataclass
class Tokenizer:
    pieces: list[bytes]
    scores: list[float]

    @classmethod
    def read(cls, path: Path = TOKENIZER, vocab: int = 512) -> "Tokenizer":
        data = Path(path).read_bytes()
        off, pieces, scores = 4, [], []
        for _ in range(vocab):
            score, n = struct.unpack("<fi", data[off:off + 8])
            pieces.append(data[off + 8:off + 8 + n])
            scores.append(score)
            off += 8 + n
        return cls(pieces, scores)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """run.c's encoder: dummy-prefix space, code points (or byte fallback), greedy merges."""
        index = {p: i for i, p in enumerate(self.pieces)}
        ids = [1] if bos else []
        if not text:
            return ids
        toks = []
        for ch in " " + text:
            b = ch.encode("utf-8")
            if b in index:
                toks.append(index[b])
            else:
                toks.extend(x + 3 for x in b)
        while True:
            best, best_i = -1e10, -1
            for i in range(len(toks) - 1):
                j = index.get(self.pieces[toks[i]] + self.pieces[toks[i + 1]])
                if j is not None and self.scores[j] > best:
                    best, best_i, best_id = self.scores[j], i, j
            if best_i < 0:
                break
            toks[best_i:best_i + 2] = [best_id]
        return ids + toks

    def decode(self, ids: list[int]) -> str:
        out = b""
        for prev, t in zip([None, *ids], ids):
            p = self.pieces[t]
            if prev == 1 and p.startswith(b" "):
                p = p[1:]
            if p.startswith(b"<0x") and p.endswith(b">") and len(p) == 6:
                p = bytes([int(p[3:5], 16)])
            out += p if t > 2 else b""
        return out.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- the decode step

def rope_tables(m: Llama2C, ctx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cos/sin rows [ctx, head] (each pair's angle twice) and the pair rotation R [head, head]:
    (x @ R)[2i] = -x[2i+1], (x @ R)[2i+1] = x[2i]."""
    cos = np.repeat(m.w["freq_real"][:ctx], 2, axis=1).astype(np.float32)
    sin = np.repeat(m.w["freq_imag"][:ctx], 2, axis=1).astype(np.float32)
    r = np.zeros((m.head, m.head), np.float32)
    for i in range(m.head // 2):
        r[2 * i + 1, 2 * i] = -1.0
        r[2 * i, 2 * i + 1] = 1.0
    return cos, sin, r


def step_graph(m: Llama2C, ctx: int, kv_scales: np.ndarray):
    """The decode step as an ONNX ModelProto; ``kv_scales[l] = (s_k, s_v)`` of the int8 cache."""
    from onnx import TensorProto, helper, numpy_helper

    f32, D, H, KV, HD, G = np.float32, m.dim, m.n_heads, m.n_kv, m.head, m.n_heads // m.n_kv
    cos, sin, rot = rope_tables(m, ctx)
    inits = {"emb": m.w["emb"], "cos": cos, "sin": sin, "rope_r": rot,
             "mean_d": np.full((D, 1), 1.0 / D, f32), "eps": np.array(EPS, f32),
             "attn_scale": np.array(1.0 / np.sqrt(HD), f32), "zp8": np.array(0, np.int8),
             "s_q": np.array([1, H, HD], np.int64), "s_k": np.array([1, KV, HD], np.int64),
             "s_qg": np.array([KV, G, HD], np.int64), "s_row": np.array([1, D], np.int64),
             "s_kv": np.array([1, m.kv_dim], np.int64),
             "s_cache": np.array([ctx, KV, HD], np.int64)}
    nodes = []

    def node(op, ins, name, **attrs):
        nodes.append(helper.make_node(op, ins, [name], name=name, **attrs))
        return name

    def rmsnorm(x, w, name):
        inits[f"{name}.weight"] = w.astype(f32)
        sq = node("Mul", [x, x], f"{name}.sq")
        ms = node("MatMul", [sq, "mean_d"], f"{name}.rms_mean")
        rs = node("Sqrt", [node("Add", [ms, "eps"], f"{name}.eps")], f"{name}.sqrt")
        return node("Mul", [node("Div", [x, rs], f"{name}.div"), f"{name}.weight"], f"{name}.out")

    def linear(x, w, name):
        inits[f"{name}.weight"] = np.ascontiguousarray(w.T).astype(f32)  # [in, out]
        return node("MatMul", [x, f"{name}.weight"], name)

    def rope(x, shape, name):
        x3 = node("Reshape", [x, shape], f"{name}.heads")
        rotated = node("MatMul", [x3, "rope_r"], f"{name}.rope_rot")
        a = node("Mul", [x3, "cos_row"], f"{name}.cos")
        b = node("Mul", [rotated, "sin_row"], f"{name}.sin")
        return node("Add", [a, b], f"{name}.rope")

    node("Gather", ["cos", "pos"], "cos_row", axis=0)
    node("Gather", ["sin", "pos"], "sin_row", axis=0)
    x = node("Reshape", [node("Gather", ["emb", "token"], "embed", axis=0), "s_row"], "x0")
    inputs = [helper.make_tensor_value_info("token", TensorProto.INT64, [1, 1]),
              helper.make_tensor_value_info("pos", TensorProto.INT64, [1]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, [ctx + 1])]
    outputs = []
    for li in range(m.n_layers):
        p = f"layers.{li}"
        h = rmsnorm(x, m.w["rms_att"][li], f"{p}.attention_norm")
        q = rope(linear(h, m.w["wq"][li], f"{p}.attention.wq"), "s_q", f"{p}.q")
        k = rope(linear(h, m.w["wk"][li], f"{p}.attention.wk"), "s_k", f"{p}.k")
        v = node("Reshape", [linear(h, m.w["wv"][li], f"{p}.attention.wv"), "s_k"], f"{p}.v")
        caches = []
        for kind, cur, s in (("k", k, kv_scales[li][0]), ("v", v, kv_scales[li][1])):
            inits[f"{p}.{kind}_scale"] = np.array(s, f32)
            new = node("QuantizeLinear", [cur, f"{p}.{kind}_scale", "zp8"], f"{kind}_new_{li}")
            cur_dq = node("DequantizeLinear", [new, f"{p}.{kind}_scale", "zp8"],
                          f"{p}.{kind}_cur")
            cache_dq = node("DequantizeLinear", [f"{kind}_cache_{li}", f"{p}.{kind}_scale",
                                                 "zp8"], f"{p}.{kind}_cache")
            caches.append(node("Concat", [cache_dq, cur_dq], f"{p}.{kind}_all", axis=0))
            inputs.append(helper.make_tensor_value_info(f"{kind}_cache_{li}", TensorProto.INT8,
                                                        [ctx, KV, HD]))
            outputs.append(helper.make_tensor_value_info(new, TensorProto.INT8, [1, KV, HD]))
        kt = node("Transpose", [caches[0]], f"{p}.k_t", perm=[1, 2, 0])   # [KV, HD, ctx+1]
        vt = node("Transpose", [caches[1]], f"{p}.v_t", perm=[1, 0, 2])   # [KV, ctx+1, HD]
        qg = node("Reshape", [q, "s_qg"], f"{p}.q_groups")                 # [KV, G, HD]
        sc = node("Mul", [node("MatMul", [qg, kt], f"{p}.scores"), "attn_scale"], f"{p}.scaled")
        att = node("Softmax", [node("Add", [sc, "mask"], f"{p}.masked")], f"{p}.probs", axis=-1)
        o = node("Reshape", [node("MatMul", [att, vt], f"{p}.context"), "s_row"], f"{p}.ctx_row")
        x = node("Add", [x, linear(o, m.w["wo"][li], f"{p}.attention.wo")], f"{p}.res1")
        h = rmsnorm(x, m.w["rms_ffn"][li], f"{p}.ffn_norm")
        g = linear(h, m.w["w1"][li], f"{p}.feed_forward.w1")
        silu = node("Mul", [g, node("Sigmoid", [g], f"{p}.sigmoid")], f"{p}.silu")
        u = linear(h, m.w["w3"][li], f"{p}.feed_forward.w3")
        d = linear(node("Mul", [silu, u], f"{p}.gated"), m.w["w2"][li], f"{p}.feed_forward.w2")
        x = node("Add", [x, d], f"{p}.res2")
    h = rmsnorm(x, m.w["rms_final"], "norm")
    et = node("Transpose", ["emb"], "emb_t", perm=[1, 0])
    node("MatMul", [h, et], "logits")
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, m.vocab]))
    graph = helper.make_graph(nodes, "stories260K_step", inputs, outputs,
                              initializer=[numpy_helper.from_array(np.asarray(v), k)
                                           for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def recipe():
    """w8a8 with the graph's constant helpers (RMS mean and RoPE rotation MatMuls, the cos/sin
    tables' Gathers) left in float."""
    from lbcc.recipes import recipe_from_dict

    return recipe_from_dict({"name": "w8a8-stories", "layers": [
        {"match": "*rms_mean", "skip": True}, {"match": "*rope_rot", "skip": True},
        {"match": "cos_row", "skip": True}, {"match": "sin_row", "skip": True}]},
        default_base="w8a8")


# ----------------------------------------------------------------------------- running steps

def mask_row(pos: int, ctx: int) -> np.ndarray:
    m = np.full(ctx + 1, -np.inf, np.float32)
    m[:pos] = 0.0
    m[ctx] = 0.0  # the current token's own row
    return m


class OrtStepper:
    """Runs the decode step in ONNX Runtime, keeping the int8 cache as the C harness does."""

    def __init__(self, session, m: Llama2C, ctx: int):
        self.sess, self.m, self.ctx = session, m, ctx
        self.names = [o.name for o in session.get_outputs()]
        shape = (ctx, m.n_kv, m.head)
        self.cache = {f"{k}_cache_{i}": np.zeros(shape, np.int8) for i in range(m.n_layers)
                      for k in "kv"}

    def step(self, token: int, pos: int) -> np.ndarray:
        feed = {"token": np.array([[token]], np.int64), "pos": np.array([pos], np.int64),
                "mask": mask_row(pos, self.ctx), **self.cache}
        outs = dict(zip(self.names, self.sess.run(None, feed)))
        for i in range(self.m.n_layers):
            for k in "kv":
                self.cache[f"{k}_cache_{i}"][pos] = outs[f"{k}_new_{i}"][0]
        return outs["logits"][0]


class StepFeed:
    """Calibration samples for the decode step: its inputs at every ``stride``-th position of
    ``tokens`` (teacher forcing through the float graph with the int8 cache)."""

    def __init__(self, m: Llama2C, tokens: list[int], ctx: int, kv_scales: np.ndarray,
                 stride: int = 1):
        import onnxruntime as ort

        sess = ort.InferenceSession(step_graph(m, ctx, kv_scales).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        st = OrtStepper(sess, m, ctx)
        self.rows: list[dict[str, np.ndarray]] = []
        for pos, tok in enumerate(tokens[:ctx]):
            if pos % stride == 0:
                self.rows.append({"token": np.array([[tok]], np.int64),
                                  "pos": np.array([pos], np.int64), "mask": mask_row(pos, ctx),
                                  **{k: v.copy() for k, v in st.cache.items()}})
            st.step(tok, pos)

    def samples(self, model):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self) -> dict:
        return {"kind": "stories260K decode steps", "samples": len(self.rows)}


def float_forward(m: Llama2C, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """run.c in numpy float32 (teacher forcing): logits per position and, per layer, the largest
    |k| (after RoPE) and |v| seen, i.e. the ranges of the KV cache."""
    D, HD, KV, G = m.dim, m.head, m.n_kv, m.n_heads // m.n_kv
    cos, sin, rot = rope_tables(m, len(tokens))
    kc = [[] for _ in range(m.n_layers)]
    vc = [[] for _ in range(m.n_layers)]
    amax = np.zeros((m.n_layers, 2), np.float32)
    all_logits = []

    def rms(x, w):
        return x / np.sqrt((x * x).mean() + EPS) * w

    for pos, tok in enumerate(tokens):
        x = m.w["emb"][tok].astype(np.float32)
        for li in range(m.n_layers):
            h = rms(x, m.w["rms_att"][li])
            q = (m.w["wq"][li] @ h).reshape(m.n_heads, HD)
            k = (m.w["wk"][li] @ h).reshape(KV, HD)
            v = (m.w["wv"][li] @ h).reshape(KV, HD)
            q = q * cos[pos] + (q @ rot) * sin[pos]
            k = k * cos[pos] + (k @ rot) * sin[pos]
            amax[li] = np.maximum(amax[li], [np.abs(k).max(), np.abs(v).max()])
            kc[li].append(k)
            vc[li].append(v)
            ks, vs = np.stack(kc[li]), np.stack(vc[li])           # [T, KV, HD]
            out = np.zeros((m.n_heads, HD), np.float32)
            for hh in range(m.n_heads):
                sc = ks[:, hh // G] @ q[hh] / np.sqrt(HD)
                p = np.exp(sc - sc.max())
                out[hh] = (p / p.sum()) @ vs[:, hh // G]
            x = x + m.w["wo"][li] @ out.reshape(-1)
            h = rms(x, m.w["rms_ffn"][li])
            g = m.w["w1"][li] @ h
            x = x + m.w["w2"][li] @ (g / (1 + np.exp(-g)) * (m.w["w3"][li] @ h))
        all_logits.append(m.w["emb"] @ rms(x, m.w["rms_final"]))
    return np.stack(all_logits), amax


def kv_scales_for(m: Llama2C, tokens: list[int]) -> np.ndarray:
    """Symmetric int8 scales of the KV cache per layer: max|k| / 127, max|v| / 127."""
    return (float_forward(m, tokens)[1] / 127.0).astype(np.float32)


# ----------------------------------------------------------------------------- C harness

def write_generate_harness(src_dir: Path, m: Llama2C, ctx: int, n_gen: int = 64,
                           prefix: str = "lbcc_model") -> Path:
    """``harness.c``: greedy generation from BOS (``tokens.bin`` absent) or teacher forcing
    over the int64 ids in ``tokens.bin`` (NLL per token summed in double); the int8 KV cache
    lives in the harness, as in a firmware application. Prints the token ids, the summed NLL and
    the harness statistics line."""
    from lbcc.targets.c.toolchain import SYSTICK_C

    kv = m.kv_dim
    L = m.n_layers
    caches = "\n".join(f"static int8_t k_cache_{i}[{ctx * kv}], v_cache_{i}[{ctx * kv}];\n"
                       f"static int8_t k_new_{i}[{kv}], v_new_{i}[{kv}];" for i in range(L))
    args = ", ".join(["token", "pos", "mask"]
                     + [f"{k}_cache_{i}" for i in range(L) for k in "kv"]
                     + ["logits"] + [f"{k}_new_{i}" for i in range(L) for k in "kv"])
    store = "\n        ".join(f"memcpy({k}_cache_{i} + (size_t)t * {kv}, {k}_new_{i}, {kv});"
                              for i in range(L) for k in "kv")
    text = f"""/* stories260K decode loop for the c target's model. Generated. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "model.h"

#define CTX {ctx}
#define VOCAB {m.vocab}
static int64_t token[1], pos[1];
static float mask[CTX + 1], logits[VOCAB];
static int64_t forced[CTX];
{caches}

#if defined(LBCC_SYSTICK)
{SYSTICK_C}
#else
static uint64_t lbcc_ticks(void) {{ return 0; }}
#endif

int main(void)
{{
    FILE *f = fopen("tokens.bin", "rb");
    int32_t n = 0, t, j, best;
    double nll = 0.0;
    uint64_t total = 0;
    if (f) {{
        n = (int32_t)fread(forced, sizeof forced[0], CTX, f);
        fclose(f);
    }}
#if defined(LBCC_SYSTICK)
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0u;
    SYST_CSR = 7u;
    while (SYST_CVR == 0u) {{
    }}
#endif
    token[0] = n ? forced[0] : 1;
    for (t = 0; t < (n ? n - 1 : {n_gen}); ++t) {{
        uint64_t t0;
        pos[0] = t;
        for (j = 0; j <= CTX; ++j)
            mask[j] = (j < t || j == CTX) ? 0.0f : -INFINITY;
        t0 = lbcc_ticks();
        {prefix}_run({args});
        total += lbcc_ticks() - t0;
        {store}
        best = 0;
        for (j = 1; j < VOCAB; ++j)
            if (logits[j] > logits[best])
                best = j;
        if (n) {{ /* teacher forcing: -log softmax(logits)[next] */
            double mx = logits[0], s = 0.0;
            for (j = 1; j < VOCAB; ++j)
                mx = logits[j] > mx ? logits[j] : mx;
            for (j = 0; j < VOCAB; ++j)
                s += exp((double)logits[j] - mx);
            nll += log(s) + mx - (double)logits[forced[t + 1]];
            token[0] = forced[t + 1];
        }} else {{
            printf("%d ", (int)best);
            token[0] = best;
        }}
    }}
    printf("\\nnll=%.9e\\n", nll);
    printf("lbcc-harness: samples=%d ticks_total=%lu ticks_max=0 stack_bytes=0\\n", (int)t,
           (unsigned long)total);
    return 0;
}}
"""
    path = Path(src_dir) / "harness.c"
    path.write_text(text, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    """python samples/stories260k_c.py OUT_DIR [--ctx 128] [--tokens 64]: compile stories260K
    w8a8 for the c target (calibrated on TinyStories train text) and write a generation harness;
    then build it for the host or, with the ARM toolchain, run it on an emulated Cortex-M4."""
    import argparse

    import lbcc
    from lbcc.calibration import Feed

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args(argv)
    m, tok = read_model(), Tokenizer.read()
    text = (SHARED / "tinystories" / "TinyStories-train.first-2MiB.txt").read_text()
    calib = tok.encode(text.split("<|endoftext|>")[0].strip())[:a.ctx]
    scales = kv_scales_for(m, calib)

    class _Feed(StepFeed, Feed):
        pass

    result = lbcc.compile(step_graph(m, a.ctx, scales), target="c", recipe=recipe(),
                          calibration=_Feed(m, calib, a.ctx, scales, stride=4), progress=False)
    result.save(a.out)
    write_generate_harness(a.out, m, a.ctx, n_gen=a.tokens)
    print(f"wrote {a.out}: model.h model.c weights.c lbcc_kernels.c harness.c\n"
          f"host:  cd {a.out} && gcc -std=c99 -O2 *.c -o gen -lm && ./gen\n"
          f"Cortex-M4: lbcc measure-c {a.out}  (or build harness.c with targets/c/arm/, see "
          "README)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
