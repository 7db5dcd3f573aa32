"""Progress where work is long, as lines: a SLURM log or a file has no terminal, and a bar shows
nothing there until it ends. One owner for how often a line is written and what it says."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("kalm_lightning")
Item = TypeVar("Item")
EVERY = 0.1  # a line per tenth of the work
AT_LEAST_S = 30.0  # ... or when this long has passed since the last line


class Progress:
    """Lines `what: done/total (p%), elapsed s, ~left s` at each tenth of `total` and at least
    every 30 s, and one at the end; nothing for work that ends within a second."""

    def __init__(self, what: str, total: int | None, unit: str = "") -> None:
        self.what, self.total, self.unit = what, total, f" {unit}" if unit else ""
        self.start = self.last = time.monotonic()
        self.next_share = EVERY
        self.done = 0

    def update(self, done: int) -> None:
        self.done, now = done, time.monotonic()
        share = done / self.total if self.total else 0.0
        if share >= self.next_share or now - self.last >= AT_LEAST_S:
            while self.next_share <= share:
                self.next_share += EVERY
            self.last = now
            if now - self.start >= 1.0 and (not self.total or done < self.total):
                log.info(self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self.start
        if not self.total:
            return f"{self.what}: {self.done}{self.unit}, {elapsed:.0f} s"
        left = elapsed * (self.total - self.done) / max(self.done, 1)
        return (
            f"{self.what}: {self.done}/{self.total}{self.unit} ({self.done / self.total:.0%}), "
            f"{elapsed:.0f} s, ~{left:.0f} s left"
        )

    def end(self) -> None:
        elapsed = time.monotonic() - self.start
        if elapsed >= 1.0:
            log.info(f"{self.what}: {self.done}{self.unit} done in {elapsed:.1f} s")


def progress(
    items: Iterable[Item], what: str, total: int | None = None, unit: str = ""
) -> Iterator[Item]:
    """items, with `Progress` lines as they are consumed."""
    counter = Progress(what, total if total is not None else _length(items), unit)
    for done, item in enumerate(items, 1):
        yield item
        counter.update(done)
    counter.end()


def _length(items: Iterable) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
