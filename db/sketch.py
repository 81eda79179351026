"""A mergeable latency sketch: counts per logarithmic bucket (DDSketch-style).

A value v > 0 falls in bucket ``ceil(log_gamma(v))`` with
``gamma = (1 + a) / (1 - a)``; reporting a bucket by ``2 gamma^i / (gamma + 1)``
is within relative error ``a`` (1 %) of every value in it. Sketches merge by
adding counts, so percentiles over any range come from the hourly rollups.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping

RELATIVE_ACCURACY = 0.01
GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
LN_GAMMA = math.log(GAMMA)
MIN_VALUE_MS = 0.001
ZERO_INDEX = -32768  # values under MIN_VALUE_MS


def index_sql(column: str) -> str:
    """The bucket index of ``column`` as a SQL expression (same as :func:`index_of`)."""
    return f"(CASE WHEN {column} < {MIN_VALUE_MS} THEN {ZERO_INDEX} ELSE ceil(ln({column}) / {LN_GAMMA!r})::int END)"


def index_of(value_ms: float) -> int:
    return ZERO_INDEX if value_ms < MIN_VALUE_MS else math.ceil(math.log(value_ms) / LN_GAMMA)


def value_of(index: int) -> float:
    return 0.0 if index == ZERO_INDEX else 2 * GAMMA**index / (GAMMA + 1)


class Sketch:
    """Bucket counts; ``merge`` adds another sketch (as stored: index -> count)."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()

    @classmethod
    def of(cls, values: Iterable[float]) -> Sketch:
        sketch = cls()
        sketch.counts.update(index_of(v) for v in values)
        return sketch

    def merge(self, stored: Mapping[str, int] | Mapping[int, int]) -> None:
        for index, count in stored.items():
            self.counts[int(index)] += int(count)

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    def quantile(self, q: float) -> float:
        """The value at quantile ``q`` in [0, 1] (0.0 for an empty sketch)."""
        total = self.count
        if total == 0:
            return 0.0
        rank = q * (total - 1)
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen > rank:
                return value_of(index)
        return value_of(max(self.counts))
