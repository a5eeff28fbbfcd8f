"""Target ``triton``: a Python module of fused low-bit Triton kernels for NVIDIA GPUs.

``lbcc compile MODEL --target triton --preset w4a16 -o OUT_DIR`` writes

* ``OUT_DIR/model.py``: the kernels (:mod:`kernels`), their launchers and autotuner (:mod:`ops`)
  and the decoder (:mod:`runtime`), in one file that imports only torch, triton, safetensors;
  ``load(path, device)`` returns a model with ``forward(input_ids, kv_cache)`` and ``generate``;
* ``OUT_DIR/weights.safetensors``: packed weights (:mod:`packing`), scales, zero points, norms,
  rotary tables; ``OUT_DIR/manifest.json``: the decoder's shape, each linear's storage and the
  fusion groups found on the IR (:mod:`extract`).

Numerics: weight-only layers compute ``x @ ((u - z) * s)^T`` with float16 weights and float32
accumulation (the HALF2 GEMV, which the tuner may pick for 4-bit decode, forms float16 products
of ``(u - z) / 16`` and x and sums four of them in float16 before float32 takes over: relative
error about 4e-4 against float32 math, within the tests' 2e-3); W8A8 layers quantize
activations per token at run time (int8, symmetric, from the RMSNorm output when one precedes
them), whatever activation mode the recipe calibrated for ONNX Runtime: static per-tensor
ranges are not used. Integer accumulation is exact. FP8 layers (``weights.format = "e4m3"``,
preset ``w8a8-fp8``) quantize activations to E4M3 per token (s = max|x| / 448) and multiply on
FP8 tensor cores (Ada / Hopper and newer) with float32 accumulation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lbcc.errors import BadInputError
from lbcc.target import Capabilities

GROUPS = frozenset({16, 32, 64, 128, 256})
SOURCES = ("kernels.py", "ops.py", "runtime.py")
FORMAT_VERSION = 2  # 2: the chunked-plane packing of packing.py (1: natural nibble order)


class TritonTarget:
    name = "triton"
    output_is_directory = True  # -o names OUT_DIR (model.py, weights.safetensors, manifest.json)
    capabilities = Capabilities(
        weight_bits=frozenset({4, 8}),
        weight_granularity={8: frozenset({None}) | GROUPS, 4: GROUPS},
        activation_modes={8: frozenset({"static", "dynamic", "dynamic-block", "none"}),
                          4: frozenset({"none"})},
        activation_dtype="int8",
        quantizable_ops=frozenset({"MatMul", "Gather"}),
        weight_layout_for_mode={"static": "channel", "dynamic": "channel",
                                "dynamic-block": "group"},
        # E4M3 x E4M3 tensor-core products (sm_89+), activations E4M3 per token
        fp8_activation_modes=frozenset({"dynamic-token"}),
    )

    def passes(self, recipe: Any) -> list:
        from lbcc.passes.cleanup import Cleanup

        return [Cleanup()]

    def emit(self, model: Any, path: Path, **_: Any) -> list[Path]:
        """Write OUT_DIR (atomically: a temporary directory renamed into place)."""
        import numpy as np
        from safetensors.numpy import save_file

        from .extract import extract

        out = Path(path)
        if out.exists() and not (out.is_dir() and (out / "manifest.json").exists()):
            raise BadInputError(f"cannot write {str(out)!r}: it exists and is not a directory "
                                "written by the triton target.",
                                "Choose a new output directory (the target writes model.py, "
                                "weights.safetensors and manifest.json into it).")
        if not out.parent.is_dir():
            raise BadInputError(f"cannot write {str(out)!r}: directory {str(out.parent)!r} "
                                "does not exist.", "Create it first.")
        manifest, tensors = extract(model, {})
        manifest = {"format": "lbcc-triton", "version": FORMAT_VERSION, **manifest}
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        try:
            save_file({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())},
                      str(tmp / "weights.safetensors"))
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
            (tmp / "model.py").write_text(render_module())
            for p in (tmp, *tmp.iterdir()):  # mkdtemp makes them private; use the umask
                os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
            if out.exists():
                old = out.with_name(out.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return [out / "model.py", out / "weights.safetensors", out / "manifest.json"]


HEADER = '''"""A low-bit LLM emitted by lbcc's ``triton`` target (do not edit: regenerate instead).

    import model                      # or importlib from this directory
    m = model.load(DIR, "cuda")       # DIR holds manifest.json and weights.safetensors
    ids = m.generate(input_ids, max_new_tokens=32)
    logits = m.forward(input_ids, m.new_cache(batch, max_len))

Needs torch, triton and safetensors. On a CPU, kernels run under TRITON_INTERPRET=1; without
it a torch path dequantizes the weights (for checks, not speed).
"""
'''


def render_module() -> str:
    """model.py: kernels, launchers and runtime concatenated; package imports removed."""
    here = Path(__file__).parent
    parts = [HEADER, "from __future__ import annotations\n",
             "import types as _types\n"]
    for name in SOURCES:
        text = (here / name).read_text()
        lines, skip = [], False
        for line in text.splitlines():
            if line.strip() == "# lbcc:strip-begin":
                skip = True
            elif line.strip() == "# lbcc:strip-end":
                skip = False
            elif not skip and line.strip() != "from __future__ import annotations":
                lines.append(line)
        parts.append(f"\n# {'=' * 30} {name} {'=' * 30}\n" + "\n".join(lines) + "\n")
        if name == "kernels.py":
            parts.append("K = _types.SimpleNamespace(**globals())  # ops.py calls kernels as K._x\n")
    return "".join(parts)
