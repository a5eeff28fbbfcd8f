"""Write a planned :class:`Program` as C99: model.h, model.c, weights.c and the kernel runtime.

- ``model.h``: the one entry point ``int <prefix>_run(inputs..., outputs...)``, the shapes of its
  arguments, the quantization parameters of the integer ops' inputs, the arena and weight sizes;
- ``model.c``: the arena (one static buffer, the only mutable state) and the network as
  straight-line kernel calls;
- ``weights.c``: every constant as a ``const`` array (the linker places them in flash); floats
  are written as hexadecimal literals, so the values are exact;
- ``lbcc_kernels.c`` / ``lbcc_kernels.h``: the kernels, copied from this package;
- ``lbcc_model.json``: the entry point's arguments, arena and weight sizes, kernel counts.

Files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from importlib import resources
from pathlib import Path

from lbcc.targets.c.cformat import c_float, c_values
from lbcc.targets.c.program import Program, Tensor

RUNTIME_FILES = ("lbcc_kernels.c", "lbcc_kernels.h")
#: what the generated code takes and holds, for tools (``lbcc measure-c``, test harnesses)
MANIFEST = "lbcc_model.json"


def atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def runtime_source(name: str) -> str:
    return resources.files("lbcc.targets.c").joinpath("runtime", name).read_text("utf-8")


def _ref(t: Tensor) -> str:
    r = t.root()
    if r.kind == "arena":
        return f"(({t.ctype} *)(lbcc_arena.bytes + {r.offset}))"
    if r is t:
        return t.symbol
    qual = "const " if r.kind in ("input", "const") else ""
    return f"(({qual}{t.ctype} *){r.symbol})"


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _params(program: Program) -> list[str]:
    return ([f"const {t.ctype} *{t.symbol}" for t in program.inputs]
            + [f"{t.ctype} *{t.symbol}" for t in program.outputs])


def model_h(program: Program, prefix: str, title: str) -> str:
    guard = f"{prefix.upper()}_H"
    P = prefix.upper()
    lines = [f"/* {title}",
             " *",
             f" * Entry point: int {prefix}_run({', '.join(_params(program))});",
             " * Returns 0. Row-major buffers owned by the caller:"]
    for t in program.inputs:
        lines.append(f" *   {t.symbol}: {t.ctype} {_shape(t)}  (input '{t.name}')")
    for t in program.outputs:
        lines.append(f" *   {t.symbol}: {t.ctype} {_shape(t)}  (output '{t.name}')")
    qsteps = [s for s in program.steps if s.op == "quantize"]
    if qsteps:
        lines.append(" * Activation quantization (uint8/int8 per tensor, q = round(x / scale) + "
                     "zero_point), done inside the network:")
        for s in qsteps:
            i = s.info
            lines.append(f" *   {i['tensor']}: {i['dtype']} scale {i['scale']!r} ({c_float(i['scale'])}), "
                         f"zero point {i['zero_point']}")
    lines += [" *",
              f" * Memory: {P}_ARENA_BYTES of static RAM in model.c (the only mutable state; one",
              " * inference at a time), weights in const arrays (flash). No heap, no libc I/O.",
              " * Integer ops are bit-exact with ONNX Runtime on the same QDQ graph; compile with",
              " * -std=c99 (or -ffp-contract=off) and never -ffast-math.",
              " */",
              f"#ifndef {guard}", f"#define {guard}", "", "#include <stdint.h>", "",
              f"#define {P}_ARENA_BYTES {program.arena_bytes}u",
              f"#define {P}_WEIGHT_BYTES {program.weight_bytes}u"]
    for t in [*program.inputs, *program.outputs]:
        lines.append(f"#define {P}_{t.symbol.upper()}_SIZE {t.size}u")
    lines += ["", f"int {prefix}_run({', '.join(_params(program))});", "", f"#endif /* {guard} */",
              ""]
    return "\n".join(lines)


def model_c(program: Program, prefix: str, title: str) -> str:
    lines = [f"/* {title}: the network as straight-line kernel calls. Generated; do not edit. */",
             f'#include "model.h"', '#include "lbcc_kernels.h"', "", "#include <math.h>",
             "#include <stddef.h>", "", "/* weights.c */"]
    for c in program.consts:
        lines.append(f"extern const {c.ctype} {c.symbol}[{c.size}];")
    if program.arena_bytes:
        lines += ["", "/* the arena: every intermediate tensor at an offset chosen by the planner */",
                  f"static union {{ double align_; uint8_t bytes[{program.arena_bytes}]; }} "
                  "lbcc_arena;"]
    lines += ["", f"int {prefix}_run({', '.join(_params(program))})", "{"]
    for t in [*program.inputs, *program.outputs]:
        lines.append(f"    (void){t.symbol};")
    for i, s in enumerate(program.steps):
        outs = ", ".join(f"{t.name} {_shape(t)}" for t in s.outputs)
        lines.append(f"    /* {i}: {s.op} ({s.node}) -> {outs} */")
        lines.append("    " + s.render(_ref))
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def weights_c(program: Program, title: str) -> str:
    lines = [f"/* {title}: constants ({program.weight_bytes} bytes). Generated; do not edit. */",
             "#include <math.h>", "#include <stdint.h>", ""]
    for c in program.consts:
        lines.append(f"extern const {c.ctype} {c.symbol}[{c.size}];")
        lines.append(f"const {c.ctype} {c.symbol}[{c.size}] = {{\n    {c_values(c.data)}\n}};")
    lines.append("")
    return "\n".join(lines)


def write(program: Program, out_dir: Path, prefix: str = "lbcc_model",
          title: str = "lbcc model") -> list[Path]:
    """Write the C sources into ``out_dir`` (created if missing); returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"model.h": model_h(program, prefix, title),
             "model.c": model_c(program, prefix, title),
             "weights.c": weights_c(program, title)}
    for name in RUNTIME_FILES:
        files[name] = runtime_source(name)
    files[MANIFEST] = json.dumps({"prefix": prefix, **summary(program), "args": [
        {"name": t.name, "symbol": t.symbol, "ctype": t.ctype, "shape": list(t.shape),
         "size": t.size, "direction": "in" if t.kind == "input" else "out"}
        for t in [*program.inputs, *program.outputs]]}, indent=1) + "\n"
    paths = []
    for name, text in files.items():
        atomic_write(out_dir / name, text)
        paths.append(out_dir / name)
    return paths


def summary(program: Program) -> dict:
    """What the report shows about the generated program."""
    ops = collections.Counter(s.op for s in program.steps)
    tol = sorted({f"{s.op}: {s.exactness}" for s in program.steps if s.exactness != "exact"})
    return {"steps": len(program.steps), "ops": dict(sorted(ops.items())),
            "arena_bytes": program.arena_bytes, "weight_bytes": program.weight_bytes,
            "inputs": {t.name: [t.ctype, list(t.shape)] for t in program.inputs},
            "outputs": {t.name: [t.ctype, list(t.shape)] for t in program.outputs},
            "float_tolerance": tol}
