"""Demo 2 of the c target: stories260K (llama2.c format) as a w8a8 decode step in C, generating
text greedily with an int8 KV cache of 128 positions: tokens identical to ONNX Runtime on the same
int8 graph (host with sanitizers, emulated Cortex-M4), flash and RAM within a microcontroller's
budget, and the int8 build against a float32 C build of the same step (speed, perplexity)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lbcc
from lbcc.calibration import Feed
from lbcc.targets.c import toolchain
from lbcc.targets.c.check import ort_session

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples"))
import stories260k_c as S  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc"),
              pytest.mark.skipif(not S.MODEL.is_file(), reason=f"{S.MODEL} not found")]
CTX = 128
N_GEN = 64
FAST = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror"]


class _Feed(S.StepFeed, Feed):
    pass


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    m, tok = S.read_model(), S.Tokenizer.read()
    text = (S.SHARED / "tinystories" / "TinyStories-train.first-2MiB.txt").read_text()
    calib = tok.encode(text.split("<|endoftext|>")[0].strip())[:CTX]  # train text, not eval
    scales = S.kv_scales_for(m, calib)
    graph = S.step_graph(m, CTX, scales)
    feed = _Feed(m, calib, CTX, scales, stride=4)
    tmp = tmp_path_factory.mktemp("stories260k")
    int8 = lbcc.compile(graph, target="c", recipe=S.recipe(), calibration=feed, progress=False)
    int8.save(tmp / "int8")
    from lbcc.recipes import recipe_from_dict

    all_float = recipe_from_dict({"name": "float", "layers": [{"match": "*", "skip": True}]},
                                 default_base="w8a8")
    fp = lbcc.compile(graph, target="c", recipe=all_float, calibration=feed, progress=False)
    fp.save(tmp / "float")
    for d in ("int8", "float"):
        S.write_generate_harness(tmp / d, m, CTX, n_gen=N_GEN)
    return m, tok, int8, tmp


def _ort_greedy(m, model) -> list[int]:
    st = S.OrtStepper(ort_session(model), m, CTX)
    toks = [1]
    for pos in range(N_GEN):
        toks.append(int(st.step(toks[-1], pos).argmax()))
    return toks[1:]


def _run_host(d: Path, tokens: list[int] | None = None) -> tuple[list[int], float]:
    (d / "tokens.bin").unlink(missing_ok=True)
    if tokens is not None:
        np.asarray(tokens, np.int64).tofile(d / "tokens.bin")
    p = subprocess.run([str((d / "host.exe").resolve())], cwd=d, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    ids = [int(x) for x in lines[0].split()] if tokens is None else []
    nll = float(next(ln for ln in lines if ln.startswith("nll=")).split("=")[1])
    return ids, nll


def test_greedy_tokens_identical_to_ort_on_host(llm):
    m, tok, int8, tmp = llm
    toolchain.build_host(tmp / "int8")  # -fsanitize=address,undefined
    c_ids, _ = _run_host(tmp / "int8")
    ref = _ort_greedy(m, int8.model)
    print("C   :", tok.decode([1, *c_ids]))
    assert len(c_ids) == N_GEN and c_ids == ref
    assert tok.decode([1, *c_ids]).startswith("Once upon a time")


def test_perplexity_int8_vs_float32_c(llm):
    """Teacher-forced NLL on tinystories_sample.txt (each story with BOS, concatenated, windows
    of CTX tokens) for the int8 and the float32 C builds."""
    m, tok, int8, tmp = llm
    text = (S.SHARED / "tinystories" / "tinystories_sample.txt").read_text()
    ids = [t for s in text.split("<|endoftext|>") if s.strip() for t in tok.encode(s.strip())]
    windows = [ids[i:i + CTX] for i in range(0, len(ids), CTX) if len(ids[i:i + CTX]) > 1]
    ppl = {}
    for d in ("int8", "float"):
        toolchain.build_host(tmp / d, flags=FAST)
        nll = sum(_run_host(tmp / d, w)[1] for w in windows)
        ppl[d] = float(np.exp(nll / sum(len(w) - 1 for w in windows)))
    print(f"stories260K perplexity on tinystories_sample.txt (windows of {CTX}): "
          f"int8 {ppl['int8']:.3f}, float32 {ppl['float']:.3f}")
    assert ppl["float"] < 4.5  # the float model (int8 KV cache in both builds)
    assert ppl["int8"] < 1.1 * ppl["float"]


@pytest.mark.skipif(not toolchain.have_arm_tools(), reason="needs arm-none-eabi-gcc and "
                    f"qemu-system-arm (apt-get install {toolchain.APT_PACKAGES})")
def test_cortex_m4_greedy_identical_within_flash_and_ram_budget(llm):
    m, tok, int8, tmp = llm
    ref = _ort_greedy(m, int8.model)
    per_token = {}
    for d in ("int8", "float"):
        (tmp / d / "tokens.bin").unlink(missing_ok=True)  # greedy generation from BOS
        toolchain.build_arm(tmp / d, "cortex-m4")
        run = toolchain.run_qemu(tmp / d, b"", "cortex-m4")
        ids = [int(x) for x in run.stdout.splitlines()[0].split()]
        per_token[d] = run.instructions_per_inference
        if d == "int8":
            assert ids == ref, "Cortex-M4 tokens differ from ONNX Runtime"
    sizes = toolchain.measure(tmp / "int8", "cortex-m4")
    cache = 2 * m.n_layers * CTX * m.kv_dim  # int8 K and V, owned by the application
    ram = sizes["ram_bytes"] + cache
    print(f"stories260K w8a8 on cortex-m4: flash {sizes['flash_bytes']} B, RAM {ram} B (arena+data "
          f"{sizes['static_ram_bytes']}, stack {sizes['stack_bytes']}, KV cache {cache}), "
          f"{per_token['int8']:,.0f} instructions/token vs {per_token['float']:,.0f} float32 "
          f"({per_token['float'] / per_token['int8']:.2f}x)")
    assert sizes["flash_bytes"] <= 384 * 1024
    assert ram <= 128 * 1024
