"""What explains a spike: rows of (model, status code, error type), ranked by excess over the reference.

Like Honeycomb's BubbleUp, a row is judged by how much more often it occurs in the spike than the reference
predicts, not by its raw count: a model that always fails 2 % of its requests is not the cause of a burst on
another. A row may leave a dimension open (None) when fixing it does not explain more: the most general row
that carries the most excess is refined to a more specific one only while that keeps nearly all of its excess.
The rule and its parameters: docs/spike-detection.md.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import product

Key = tuple[str, int, str | None]  # model, status_code, error_type
_Row = tuple[object, object, object]  # a Key with any dimension open (_OPEN)

REFINE = 0.9  # a more specific row replaces its parent when it keeps >= 90 % of the parent's excess
MIN_SHARE = 0.05  # rows that explain less of the excess than this are not listed
MIN_LIFT = 0.1  # a dimension is fixed only when its value holds >= 10 points more of the excess than by chance

_OPEN = object()  # a dimension left open, while building rows (None is a real error_type value)
_ROOT = (_OPEN, _OPEN, _OPEN)


@dataclass(frozen=True)
class Composition:
    requests: Mapping[str, int]  # requests per model in the window
    hits: Mapping[Key, int]  # errors (or, for latency spikes, slow requests) per (model, status_code, error_type)


@dataclass(frozen=True)
class Contribution:
    model: str | None
    status_code: int | None
    error_type: str | None
    count: int  # hits of this row in the spike window
    share: float  # 0..1: the part of the spike's excess (over what the reference predicts) it explains


def attribute(spike: Composition, reference: Composition, limit: int = 5) -> list[Contribution]:
    """Up to ``limit`` rows that explain the spike's excess hits, the best first; none when there is no excess.

    The expected hits of a row are the reference's hits of that row per request of the same model (or of all
    models, for a row with the model open, or when the reference has no requests of that model), times the
    spike's requests. No listed row is an ancestor or descendant of another, so each says something new.
    """
    counts = _rows(spike.hits)
    expected_total = _expected_total(spike, reference)
    total = sum(spike.hits.values()) - expected_total
    if not counts or total <= 0:
        return []
    table = _Table(counts, _expected(counts, spike, reference), spike, total, expected_total)
    # ties (e.g. one model that carries every hit) go to the model, then the status code
    starts = sorted((r for r in counts if _specificity(r) == 1), key=lambda r: (-table.excess[r], _first_fixed(r)))
    chosen: list[_Row] = []
    for row in starts:
        if len(chosen) == limit or table.excess[row] < MIN_SHARE * total:
            break
        if any(table.redundant(row, c) for c in chosen) or table.outshone(row, starts, chosen):
            continue
        best = table.refine(row)
        if not any(table.redundant(best, c) for c in chosen):
            chosen.append(best)
    chosen.sort(key=lambda r: -table.excess[r])
    return [_contribution(row, counts[row], table.excess[row] / total) for row in chosen]


@dataclass
class _Table:
    counts: Mapping[_Row, int]
    expected: Mapping[_Row, float]
    spike: Composition
    total: float  # the spike's excess hits over all rows
    expected_total: float  # the hits the reference predicts over all rows

    def __post_init__(self) -> None:
        self.excess = {row: self.counts[row] - self.expected[row] for row in self.counts}
        self.requests = sum(self.spike.requests.values())

    def distinctive(self, child: _Row, parent: _Row) -> bool:
        """The child holds a clearly larger part of the parent's excess than of what the parent would hold by
        chance: of its requests (the model dimension), or of its expected hits (status code, error type)."""
        parent_excess = self.total if parent == _ROOT else self.excess[parent]
        if parent_excess <= 0:
            return False
        added = next(i for i in range(3) if child[i] is not _OPEN and parent[i] is _OPEN)
        if added == 0:
            base = self.spike.requests.get(str(child[0]), 0) / self.requests if self.requests else 0.0
        else:
            parent_expected = self.expected_total if parent == _ROOT else self.expected[parent]
            base = self.expected[child] / parent_expected if parent_expected > 0 else 0.0
        return self.excess[child] / parent_excess - base >= MIN_LIFT

    def outshone(self, row: _Row, starts: list[_Row], chosen: list[_Row]) -> bool:
        """A row that is not distinctive gives way to a distinctive one that explains nearly as much."""
        if self.distinctive(row, _ROOT):
            return False
        return any(
            self.excess[other] >= REFINE * self.excess[row] and self.distinctive(other, _ROOT)
            for other in starts
            if other != row and not any(self.redundant(other, c) for c in chosen)
        )

    def redundant(self, a: _Row, b: _Row) -> bool:
        """Nearly all hits of one row are hits of the other (an ancestor, a descendant, or a row that names the
        same hits by another dimension, such as status 503 and error type service_unavailable)."""
        if any(x is not _OPEN and y is not _OPEN and x != y for x, y in zip(a, b, strict=True)):
            return False
        meet = (b[0] if a[0] is _OPEN else a[0], b[1] if a[1] is _OPEN else a[1], b[2] if a[2] is _OPEN else a[2])
        both = self.counts.get(meet, 0)
        return both >= REFINE * min(self.counts[a], self.counts[b])

    def refine(self, row: _Row) -> _Row:
        """The most specific descendant reached by distinctive steps that each keep >= REFINE of the excess."""
        while True:
            good = [
                c
                for c in self.counts
                if _specificity(c) == _specificity(row) + 1
                and _related(c, row)
                and self.excess[c] >= REFINE * self.excess[row]
                and self.distinctive(c, row)
            ]
            if not good:
                return row
            row = max(good, key=lambda c: (self.excess[c], repr(c)))


def _rows(hits: Mapping[Key, int]) -> dict[_Row, int]:
    """Hits of every row: each key with any of its dimensions opened (all open excluded)."""
    counts: dict[_Row, int] = defaultdict(int)
    for (model, status, error_type), n in hits.items():
        if n <= 0:
            continue
        for row in product((model, _OPEN), (status, _OPEN), (error_type, _OPEN)):
            if row != (_OPEN, _OPEN, _OPEN):
                counts[row] += n
    return counts


def _expected(counts: Mapping[_Row, int], spike: Composition, reference: Composition) -> dict[_Row, float]:
    ref = _rows(reference.hits)
    ref_total_requests = sum(reference.requests.values())
    spike_total_requests = sum(spike.requests.values())
    expected: dict[_Row, float] = {}
    for row in counts:
        model = row[0]
        if model is not _OPEN and reference.requests.get(str(model), 0) > 0:
            rate = ref.get(row, 0) / reference.requests[str(model)]
            expected[row] = rate * spike.requests.get(str(model), 0)
        elif ref_total_requests > 0:
            opened = (_OPEN, row[1], row[2])
            hits = sum(reference.hits.values()) if opened == (_OPEN, _OPEN, _OPEN) else ref.get(opened, 0)
            rate = hits / ref_total_requests
            share = spike.requests.get(str(model), 0) if model is not _OPEN else spike_total_requests
            expected[row] = rate * share
        else:
            expected[row] = 0.0
    return expected


def _expected_total(spike: Composition, reference: Composition) -> float:
    ref_requests = sum(reference.requests.values())
    if ref_requests <= 0:
        return 0.0
    return sum(reference.hits.values()) / ref_requests * sum(spike.requests.values())


def _first_fixed(row: _Row) -> int:
    return next(i for i, d in enumerate(row) if d is not _OPEN)


def _specificity(row: _Row) -> int:
    return sum(d is not _OPEN for d in row)


def _related(a: _Row, b: _Row) -> bool:
    """One row contains the other (an ancestor or descendant, or the same)."""
    a_in_b = all(y is _OPEN or x == y for x, y in zip(a, b, strict=True))
    b_in_a = all(x is _OPEN or x == y for x, y in zip(a, b, strict=True))
    return a_in_b or b_in_a


def _contribution(row: _Row, count: int, share: float) -> Contribution:
    model, status, error_type = (None if d is _OPEN else d for d in row)
    return Contribution(
        model=model if isinstance(model, str) else None,
        status_code=status if isinstance(status, int) else None,
        error_type=error_type if isinstance(error_type, str) else None,
        count=count,
        share=min(1.0, max(0.0, share)),
    )
