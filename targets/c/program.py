"""The C program as data: tensors (where they live, their type and shape) and steps (kernel calls).

A :class:`Program` is what :mod:`lbcc.targets.c.lowering` builds from the QDQ graph and what
:mod:`lbcc.targets.c.planner` and :mod:`lbcc.targets.c.emit` consume. Tensors live in one of four
places: ``input`` / ``output`` (the caller's buffers, entry-point arguments), ``const`` (an array in
weights.c, placed in flash) and ``arena`` (an offset into the one static buffer, chosen by the
memory planner). A ``view`` tensor (Reshape, Flatten, Squeeze, Unsqueeze) shares its source's
bytes: no copy, no memory of its own.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

#: lbcc dtype name -> (C type, bytes, numpy dtype)
DTYPES: dict[str, tuple[str, int, type]] = {
    "f32": ("float", 4, np.float32),
    "u8": ("uint8_t", 1, np.uint8),
    "s8": ("int8_t", 1, np.int8),
    "s32": ("int32_t", 4, np.int32),
    "s64": ("int64_t", 8, np.int64),
}


@dataclasses.dataclass(eq=False)
class Tensor:
    name: str                 #: ONNX value name (for comments and the report)
    dtype: str                #: a key of DTYPES
    shape: tuple[int, ...]
    kind: str = "arena"       #: arena | input | output | const | view
    data: np.ndarray | None = None   #: the values of a const tensor
    base: "Tensor | None" = None     #: the tensor a view (or an in-place output) shares bytes with
    symbol: str = ""          #: C identifier (inputs, outputs, consts)
    offset: int = -1          #: byte offset in the arena (set by the planner)

    @property
    def ctype(self) -> str:
        return DTYPES[self.dtype][0]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.size * DTYPES[self.dtype][1]

    def root(self) -> "Tensor":
        """The tensor that owns the bytes (follows views and in-place outputs)."""
        t = self
        while t.base is not None:
            t = t.base
        return t


@dataclasses.dataclass(eq=False)
class Step:
    """One kernel call. ``render(ref)`` returns C statements; ``ref(t)`` is the C pointer of t."""

    op: str                   #: what it computes, e.g. "qmatmul u8xs8->f32" (comments, report)
    node: str                 #: the ONNX node it came from
    inputs: list[Tensor]
    outputs: list[Tensor]
    render: Callable[[Callable[[Tensor], str]], str]
    #: (output index, input index) pairs whose bytes may be shared when the input dies here: the
    #: kernel reads element i before it writes element i, and the output is no larger
    inplace: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    #: "exact" (bit-exact with ONNX Runtime) or a note on the float tolerance
    exactness: str = "exact"
    #: parameters worth showing in model.h and the report (e.g. a quantizer's scale)
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Program:
    inputs: list[Tensor]
    outputs: list[Tensor]
    consts: list[Tensor]
    steps: list[Step]
    arena_bytes: int = 0

    def tensors(self) -> list[Tensor]:
        seen: dict[int, Tensor] = {}
        for s in self.steps:
            for t in [*s.inputs, *s.outputs]:
                seen.setdefault(id(t), t)
        return list(seen.values())

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.consts)
