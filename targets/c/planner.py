"""Static memory planning: every intermediate tensor gets an offset in one fixed arena.

1. Buffers. A view (Reshape and friends) shares its source's buffer. An elementwise step may write
   its output over an input (``Step.inplace``) when that input's buffer has no use after the step
   and the output is no larger: the buffer then lives on as the output.
2. Lifetimes. A buffer is live over the closed step interval [first definition, last use].
3. Offsets, greedy by size with best fit (as TFLite Micro's planner): buffers in decreasing size;
   each goes into the smallest gap, among the buffers already placed whose lifetimes overlap its
   own, that holds it, or after the last of them. Offsets are aligned to ``ALIGN`` bytes.

The arena size is the largest end offset. :func:`check_plan` verifies that no two buffers that are
live at the same step overlap in memory (the tests call it on every plan).
"""

from __future__ import annotations

from lbcc.targets.c.program import Program, Tensor

ALIGN = 16


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _intervals(program: Program) -> dict[int, tuple[Tensor, int, int]]:
    """root id -> (root tensor, first step, last step) for arena buffers."""
    out: dict[int, tuple[Tensor, int, int]] = {}
    for i, step in enumerate(program.steps):
        for t in [*step.outputs, *step.inputs]:
            r = t.root()
            if r.kind != "arena":
                continue
            root, lo, hi = out.get(id(r), (r, i, i))
            out[id(r)] = (root, min(lo, i), max(hi, i))
    return out


def _apply_inplace(program: Program) -> int:
    """Share buffers where a step declares it may write over a dying input; returns the count."""
    shared = 0
    for i, step in enumerate(program.steps):
        for oi, ii in step.inplace:
            out, inp = step.outputs[oi], step.inputs[ii]
            root = inp.root()
            if out.kind != "arena" or out.base is not None or root.kind != "arena":
                continue
            if out.nbytes > root.nbytes:
                continue
            if _intervals(program)[id(root)][2] != i:
                continue  # the input is read after this step
            if any(o is not out and o.root() is root for o in step.outputs):
                continue
            out.base = root
            shared += 1
    return shared


def plan(program: Program) -> dict[str, int]:
    """Assign arena offsets in place; returns a summary for the report."""
    inplace = _apply_inplace(program)
    live = sorted(_intervals(program).values(), key=lambda x: (-x[0].nbytes, x[1]))
    placed: list[tuple[int, int, int, int]] = []  # (offset, size, first, last)
    for root, first, last in live:
        size = _align(root.nbytes)
        busy = sorted((o, o + s) for o, s, a, b in placed if not (b < first or a > last))
        best, best_gap, cursor = None, None, 0
        for start, end in busy:
            gap = start - cursor
            if gap >= size and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, end)
        offset = best if best is not None else cursor
        root.offset = offset
        placed.append((offset, size, first, last))
    program.arena_bytes = max((o + s for o, s, _, _ in placed), default=0)
    naive = sum(_align(r.nbytes) for r, _, _ in live)
    return {"arena_bytes": program.arena_bytes, "buffers": len(live), "in_place": inplace,
            "no_reuse_bytes": naive}


def check_plan(program: Program) -> None:
    """AssertionError if two buffers live at the same step overlap in the arena."""
    spans = list(_intervals(program).values())
    for i, (a, a0, a1) in enumerate(spans):
        assert a.offset >= 0 and a.offset % ALIGN == 0, a.name
        assert a.offset + a.nbytes <= program.arena_bytes, a.name
        for b, b0, b1 in spans[i + 1:]:
            if a1 < b0 or b1 < a0:
                continue
            assert a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset, \
                f"{a.name} and {b.name} overlap while both are live"
