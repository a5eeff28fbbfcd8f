"""C99 source formatting: identifiers, exact float literals, const array definitions."""

from __future__ import annotations

import math
import re

import numpy as np


def c_float(x: float) -> str:
    """An exact C99 float literal: hexadecimal (``0x1.8p-3f``), or INFINITY / NAN (math.h)."""
    v = float(np.float32(x))
    if math.isnan(v):
        return "NAN"
    if math.isinf(v):
        return "INFINITY" if v > 0 else "(-INFINITY)"
    return v.hex() + "f"


def c_ident(name: str, taken: set[str], prefix: str = "") -> str:
    """A unique C identifier derived from an ONNX name; records it in ``taken``."""
    base = prefix + re.sub(r"[^0-9A-Za-z_]", "_", name).strip("_")
    if not base or base[0].isdigit():
        base = "t_" + base
    base = base[:60]
    ident, i = base, 1
    while ident in taken:
        ident = f"{base}_{i}"
        i += 1
    taken.add(ident)
    return ident


def c_values(array: np.ndarray, per_line: int = 16) -> str:
    """The initializer list body of a C array holding ``array`` (flattened, row-major)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype == np.float32:
        items = [c_float(v) for v in flat.tolist()]
        per_line = 6
    else:
        items = [str(int(v)) for v in flat.tolist()]
        if flat.dtype == np.int64:
            items = [f"INT64_C({s})" for s in items]
            per_line = 6
        elif flat.dtype == np.int32:
            items = [s if int(s) > -2**31 else "INT32_MIN" for s in items]
    lines = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
    return ",\n    ".join(lines)


def c_int_list(values: list[int] | tuple[int, ...]) -> str:
    return "{" + ", ".join(str(int(v)) for v in values) + "}"
