"""Progress bars (rich) for anything that takes more than a second; silent when not a terminal."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def track(items: Iterable[T], total: int | None = None, description: str = "",
          enabled: bool = True) -> Iterator[T]:
    if not enabled or not sys.stderr.isatty():
        yield from items
        return
    from rich.progress import track as rich_track

    from rich.console import Console

    yield from rich_track(items, total=total, description=description,
                          console=Console(stderr=True), transient=True)
