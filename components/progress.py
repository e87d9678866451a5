"""Progress of the steps that take more than a few seconds (eda's scan, the preprocess cache,
evaluate's predictions, sync --rebuild, pseudo-label, ...): a tqdm bar when stderr is a
terminal, and otherwise a plain line every `every` seconds (`eda digits: 900/1,797 images
(50 %), 4 s`), so a log file or CI console shows the step is alive without a bar's
carriage returns. A step that ends before the first line prints nothing.

The training engine keeps its own per-epoch bar. Import-light (tqdm only when a bar is shown).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from components.humanize import duration, plural

T = TypeVar("T")
EVERY_SEC = 10.0  # plain lines: one per this many seconds


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Progress:
    """`done` of `total` items, shown as a bar or as periodic lines; use as a context manager
    (or call `close`). `bar`: None = a bar only when stderr is a terminal."""

    def __init__(self, total: int, desc: str, unit: str = "item", *, bar: bool | None = None,
                 every: float = EVERY_SEC, log: Callable[[str], None] | None = None,
                 many: str | None = None) -> None:
        self.total, self.desc, self.unit, self.many, self.every = total, desc, unit, many, every
        self.log = log or _stderr
        self.done, self.lines, self.shown, self.closed = 0, 0, -1, False
        self.start = self.last = time.monotonic()
        self._bar: Any = None
        if sys.stderr.isatty() if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=many or unit + "s", file=sys.stderr,
                             mininterval=0.5, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line()

    def line(self) -> str:
        """`eda digits: 900/1,797 images (50 %), 4 s`."""
        share = f" ({100 * self.done / self.total:.0f} %)" if self.total else ""
        return (f"{self.desc}: {self.done:,}/{plural(self.total, self.unit, self.many)}{share}, "
                f"{duration(time.monotonic() - self.start)}")

    def _line(self) -> None:
        self.lines, self.shown = self.lines + 1, self.done
        self.log(self.line())

    def close(self) -> None:
        """Ends the bar; after periodic lines, one last line with the total (once)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.lines and not self.closed and self.done != self.shown:
            self._line()
        self.closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], total: int, desc: str, unit: str = "item", *,
          bar: bool | None = None, every: float = EVERY_SEC,
          log: Callable[[str], None] | None = None, weight: Callable[[T], int] | None = None
          ) -> Iterator[T]:
    """`items`, counted as they are consumed (`weight(item)` each, 1 by default: a batch
    counts its images)."""
    with Progress(total, desc, unit, bar=bar, every=every, log=log) as shown:
        for item in items:
            yield item
            shown.update(weight(item) if weight else 1)
