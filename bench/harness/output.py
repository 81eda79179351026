"""Progress lines on stderr, stamped with the seconds since the benchmark started."""

from __future__ import annotations

import math
import sys
import time

_T0 = time.monotonic()


def say(message: str) -> None:
    """One progress line: ``[  12.3s] message``."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


class Progress:
    """Throttled progress lines with rate and ETA."""

    def __init__(self, what: str, total: int, every_s: float = 3.0) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.started = self.last = time.monotonic()
        self.done = 0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate else math.inf
            say(
                f"{self.what}: {self.done:,}/{self.total:,} ({100 * self.done / max(self.total, 1):5.1f}%)  "
                f"{rate:,.0f}/s  ETA {eta:,.0f} s"
            )
