"""Latency percentiles from mergeable log-bucket sketches (DDSketch), with the rank rule they answer to.

A sketch maps a bucket index to a count (db/sketch.py puts a latency ``v`` in bucket ``ceil(log_gamma(v))``,
``gamma = (1 + a) / (1 - a)``, ``a`` = 1 %). Merging adds counts, so a sketch of any range and grouping is
exact as a histogram, whatever hours and rows it was merged from.

The rank rule: the exact q-percentile of n latencies sorted ascending ``x_1 <= ... <= x_n`` is ``x_k`` with
``k = max(1, ceil(q * n))`` (nearest rank), q taken as the decimal the caller wrote (0.95, not the binary
double 0.94999...). The sketch finds the bucket holding rank k and reports its representative value
``2 * gamma**i / (gamma + 1)``, which is within ``a`` of every value in the bucket, so of ``x_k``: the answer
is within 1 % of the exact percentile. Latencies under MIN_VALUE_MS (1 microsecond) share one bucket reported
as 0 (an absolute error under 0.001 ms). ``sketch_quantile`` in SQL (migration 0006) applies the same rule.

Two ways in, one rule: ``parse``/``merged``/``quantiles`` take jsonb sketches one at a time (dicts; tests and
small callers), and :class:`Batch` takes many packed sketches (db/sketch.py's layout) at once, each tagged with
the group it belongs to (a series bucket), and answers every group's percentiles in a few numpy passes: one stable
sort by (group, index), one cumulative sum, one binary search per (group, percentile). A 30-day HOUR report has
thousands of sketches of hundreds of entries; merging them as dicts cost a third of a second.
"""

from __future__ import annotations

import bisect
import decimal
import fractions
import functools
import itertools
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, cast

import numpy as np
import numpy.typing as npt
import orjson

from db.sketch import GAMMA, INT4_OID, PACKED_ENTRY_BYTES, RANKED_PERCENTILES, RANKS_HEADER_WORDS, ZERO_INDEX

Sketch = dict[int, int]

_REPRESENTATIVE = 2 / (GAMMA + 1)


def parse(text: str | bytes) -> Sketch:
    """A sketch as stored (jsonb text: bucket index as a string key, count)."""
    loaded: dict[str, int] = orjson.loads(text)
    return dict(zip(map(int, loaded), loaded.values(), strict=True))  # (C loops: twice as fast as a comprehension)


def merge_into(target: Sketch, other: Mapping[int, int]) -> Sketch:
    """Adds ``other`` to ``target`` (in place) and returns ``target``."""
    get = target.get
    for index, count in other.items():
        target[index] = get(index, 0) + count
    return target


def merged(sketches: Iterable[Mapping[int, int]]) -> Sketch:
    total: Sketch = {}
    for sketch in sketches:
        merge_into(total, sketch)
    return total


def value_of(index: int) -> float:
    """The representative latency (ms) of a bucket."""
    return 0.0 if index == ZERO_INDEX else _REPRESENTATIVE * GAMMA**index


def rank(q: float, n: int) -> int:
    """The nearest rank of the q-percentile among n values: ``max(1, ceil(q * n))``, in exact decimal
    arithmetic on the q the caller wrote."""
    return max(1, math.ceil(_as_written(q) * n))


@functools.lru_cache(maxsize=256)
def _as_written(q: float) -> decimal.Decimal:
    return decimal.Decimal(repr(q))


def quantiles(sketch: Mapping[int, int], qs: Sequence[float]) -> list[float] | None:
    """The q-percentiles (ms) of the values a sketch counts, in the order of ``qs``; None when it is empty."""
    if not sketch:
        return None
    indexes = sorted(sketch)
    cumulative = list(itertools.accumulate(map(sketch.__getitem__, indexes)))
    n = cumulative[-1]
    if n <= 0:
        return None
    return [value_of(indexes[bisect.bisect_left(cumulative, rank(q, n))]) for q in qs]


def exact_percentile(values: Sequence[float], q: float) -> float:
    """The exact q-percentile by the rank rule above (for tests and documentation)."""
    ordered = sorted(values)
    return ordered[rank(q, len(ordered)) - 1]


# --- many packed sketches at once --------------------------------------------------------------------------------

PACKED = np.dtype([("index", ">i4"), ("count", ">i8")])
assert PACKED.itemsize == PACKED_ENTRY_BYTES
_INDEX_SHIFT = 2**31  # index + this is in [0, 2**32): the low half of the (group, index) sort key
_DENSE_SPAN = 1 << 20  # a merge of all sketches is a histogram over at most this many indexes (else a sort)
_SAFE = 2**62  # rank arithmetic stays in int64 while numerator * n is below this

Ints = npt.NDArray[np.int64]


def pack(sketch: Mapping[int, int]) -> bytes:
    """A sketch in the packed layout (ascending by index), as ``sketch_pack`` in SQL makes it."""
    entries = np.array(sorted(sketch.items()), dtype=np.int64).reshape(-1, 2)
    out = np.empty(len(entries), dtype=PACKED)
    out["index"], out["count"] = entries[:, 0], entries[:, 1]
    return out.tobytes()


def unpack(packed: bytes) -> Sketch:
    """A packed sketch as a dict (repeated indexes add up)."""
    entries = np.frombuffer(packed, dtype=PACKED)
    return merged({i: c} for i, c in zip(entries["index"].tolist(), entries["count"].tolist(), strict=True))


_RANKS_WORDS = RANKS_HEADER_WORDS + 2 * len(RANKED_PERCENTILES)  # a row's ranks: header, then (length, value) pairs
_RANKS_HEADER = np.array([1, 0, INT4_OID, len(RANKED_PERCENTILES), 1])


def pack_ranks(indexes: Sequence[int]) -> bytes:
    """A row's RANKED_PERCENTILES bucket indexes as ``db.sketch.ranks_wire_sql`` sends them."""
    words = [1, 0, INT4_OID, len(indexes), 1, *itertools.chain.from_iterable((4, i) for i in indexes)]
    return np.array(words, dtype=">i4").tobytes()


def unpack_ranks(rows: Iterable[bytes], count: int) -> Ints:
    """``count`` rows' ranks (``db.sketch.ranks_wire_sql``) as a (count, len(RANKED_PERCENTILES)) array: one block
    for numpy; anything but an int4[] of that length without nulls is refused."""
    blob = b"".join(rows)
    if len(blob) != count * _RANKS_WORDS * 4:
        raise ValueError(f"{len(blob)} bytes of ranks for {count} rows of {len(RANKED_PERCENTILES)} ranks")
    words = np.frombuffer(blob, dtype=">i4")
    table = words.reshape(count, _RANKS_WORDS)
    if not bool(
        (table[:, :RANKS_HEADER_WORDS] == _RANKS_HEADER).all() and (table[:, RANKS_HEADER_WORDS::2] == 4).all()
    ):
        raise ValueError(f"ranks that are not {len(RANKED_PERCENTILES)} int4 bucket indexes")
    return table[:, RANKS_HEADER_WORDS + 1 :: 2].astype(np.int64)


class Batch:
    """Packed sketches, each tagged with a group (0 .. ``groups - 1``); the percentiles of each group's merge.

    A group may have any number of sketches, in any order, and sketches may repeat an index: entries are sorted
    by (group, index) and counted cumulatively, so a group's rank r is at the first entry whose running count
    (from the group's start) reaches r, as in :func:`quantiles`.

    The common case, one sketch per group with the groups in ascending order (an HOUR series: a bucket and model
    is one hourly row), skips the sort and the per-entry group ids: only the sketches whose entries do not ascend
    (query-time ones, from raw events) are sorted, each on its own. The quantile table of a 30-day HOUR report
    (430,000 entries) took 7.8 ms the general way and takes 3.7 ms this way (medians, docs/benchmarks.md).

    A group may instead be one ranked row: no sketch (None), and the bucket indexes of RANKED_PERCENTILES that a
    rollup row stores (``ranks``, migration 0012); its percentiles are those indexes' values, so only those
    percentiles can be asked of a batch with ranked rows. Ranked rows add nothing to :meth:`merged_quantiles`.
    """

    def __init__(
        self,
        packed: Sequence[bytes | None],
        group_of: Sequence[int] | Ints,
        groups: int,
        ranks: Sequence[bytes | None] = (),
    ) -> None:
        if len(packed) != len(group_of):
            raise ValueError(f"{len(packed)} sketches but {len(group_of)} group ids")
        self.groups = groups
        group_of = np.asarray(group_of, dtype=np.int64)
        self._ranked = _Ranked.of(packed, ranks, group_of)
        sketches = cast(Sequence[bytes], packed)
        if self._ranked is not None:  # the other rows' sketches (a ranked row has none; an empty sketch may be null)
            others = ~self._ranked.rows
            sketches, group_of = [p or b"" for p in itertools.compress(packed, others)], group_of[others]
        blob = b"".join(sketches)
        if len(blob) % PACKED.itemsize:
            raise ValueError(f"packed sketches of {len(blob)} bytes: not whole {PACKED.itemsize}-byte entries")
        entries = np.frombuffer(blob, dtype=PACKED)
        self._sizes: Ints = np.fromiter(map(len, sketches), dtype=np.int64, count=len(sketches)) // PACKED.itemsize
        self._group_of: Ints = group_of  # of each sketch
        # Native-endian copies (the packed layout is big-endian), one pass each; the batch's own, so a sketch's
        # entries may be put in order in place (no method depends on the order of entries)
        self.index: Ints = entries["index"].astype(np.int64)
        self.count: Ints = entries["count"].astype(np.int64)

    def quantile_table(self, qs: Sequence[float]) -> npt.NDArray[np.float64]:
        """Per group (a row by group id), the q-percentiles (ms) in the order of ``qs``; NaN for an empty group."""
        out = np.full((self.groups, len(qs)), np.nan)
        if self._ranked is not None:
            self._ranked.fill(out, qs)
        if not len(self.index) or not len(qs):
            return out
        group_of = self._group_of
        if bool(np.all(group_of[1:] > group_of[:-1])):
            groups, values = self._one_sketch_a_group(qs)
        else:
            index, count = self.index, self.count
            group = np.repeat(group_of, self._sizes)
            key = (group << 32) + (index + _INDEX_SHIFT)
            if not bool(np.all(key[1:] >= key[:-1])):  # often already in order: one sketch a group, ascending
                order = np.argsort(key, kind="stable")  # timsort: the sketches come as sorted runs
                index, count, group = index[order], count[order], group[order]
            groups, values = _group_quantiles(index, count, group, qs)
        out[groups] = values
        return out

    def _one_sketch_a_group(self, qs: Sequence[float]) -> tuple[Ints, npt.NDArray[np.float64]]:
        """:func:`_group_quantiles` when group i's entries are sketch i's: each sketch's entries put in ascending
        order (most already are; the rest are sorted in place, each on its own), then :func:`_run_quantiles`."""
        index, count, sizes = self.index, self.count, self._sizes
        ends = np.cumsum(sizes)
        starts = ends - sizes
        falls = np.flatnonzero(index[1:] < index[:-1]) + 1  # an entry below its predecessor...
        sketch_of = np.searchsorted(ends, falls, side="right")
        for sketch in np.unique(sketch_of[falls > starts[sketch_of]]).tolist():  # ...in its own sketch
            part = slice(int(starts[sketch]), int(ends[sketch]))
            order = np.argsort(index[part], kind="stable")
            index[part], count[part] = index[part][order], count[part][order]
        return _run_quantiles(index, count, starts, ends, self._group_of, qs)

    def merged_quantiles(self, qs: Sequence[float], also: Sequence[bytes] = ()) -> list[float] | None:
        """The q-percentiles (ms) of all sketches merged, whatever their groups, and of the packed sketches ``also``
        (ranked rows have none: a caller passes their sketches so); None when there are none."""
        index, count = self.index, self.count
        if also:
            more = np.frombuffer(b"".join(also), dtype=PACKED)
            index = np.concatenate((index, more["index"].astype(np.int64)))
            count = np.concatenate((count, more["count"].astype(np.int64)))
        if not len(index):
            return None
        low = int(index.min())
        span = int(index.max()) - low + 1
        if span <= _DENSE_SPAN and int(count.sum()) < 2**53:  # float64 sums are exact: one histogram pass
            histogram = np.bincount(index - low, weights=count, minlength=span)
            present = np.flatnonzero(histogram)
            index, count = present + low, histogram[present].astype(np.int64)
        else:
            order = np.argsort(index, kind="stable")
            index, count = index[order], count[order]
        _, values = _group_quantiles(index, count, np.zeros(len(index), dtype=np.int64), qs)
        return values[0].tolist() if len(values) else None


class _Ranked(NamedTuple):
    """A batch's ranked rows: which rows they are, their groups, and their RANKED_PERCENTILES bucket indexes (a row
    each)."""

    rows: npt.NDArray[np.bool_]
    groups: Ints
    indexes: Ints

    @classmethod
    def of(
        cls, packed: Sequence[bytes | None], ranks: Sequence[bytes | None], group_of: Sequence[int] | Ints
    ) -> _Ranked | None:
        if not ranks:
            return None
        if len(ranks) != len(packed):
            raise ValueError(f"{len(packed)} sketches but {len(ranks)} rank lists")
        # (C loops: a 30-day HOUR series has thousands of rows)
        has = np.fromiter(map(operator.is_not, ranks, itertools.repeat(None)), dtype=bool, count=len(ranks))
        count = int(has.sum())
        if not count:
            return None
        if any(map(operator.is_not, itertools.compress(packed, has), itertools.repeat(None))):
            raise ValueError("a row has both a sketch and ranks")
        groups = np.asarray(group_of, dtype=np.int64)
        ranked = groups[has]
        if bool((np.bincount(groups)[ranked] != 1).any()):
            raise ValueError("a ranked row shares its group with another row (its percentiles cannot be merged)")
        return cls(has, ranked, unpack_ranks(cast(Iterable[bytes], itertools.compress(ranks, has)), count))

    def fill(self, out: npt.NDArray[np.float64], qs: Sequence[float]) -> None:
        """The ranked groups' rows of a quantile table."""
        missing = [q for q in qs if q not in RANKED_PERCENTILES]
        if missing:
            raise ValueError(f"percentiles {missing} are not among the ranked ones {RANKED_PERCENTILES}")
        columns = [RANKED_PERCENTILES.index(q) for q in qs]
        out[self.groups] = _values(self.indexes[:, columns])


def _group_quantiles(
    index: Ints, count: Ints, group: Ints, qs: Sequence[float]
) -> tuple[Ints, npt.NDArray[np.float64]]:
    """Entries sorted by (group, index): the groups with requests and, for each, its q-percentiles (a row)."""
    starts = np.flatnonzero(np.concatenate(([True], group[1:] != group[:-1]))) if len(group) else group
    ends = np.concatenate((starts[1:], [len(group)]))
    return _run_quantiles(index, count, starts, ends, group[starts], qs)


def _run_quantiles(
    index: Ints, count: Ints, starts: Ints, ends: Ints, ids: Ints, qs: Sequence[float]
) -> tuple[Ints, npt.NDArray[np.float64]]:
    """Runs of entries ``[starts[i], ends[i])``, each ascending by index, with ids ``ids[i]``: the ids of the runs
    with requests and, for each, its q-percentiles (a row): one cumulative sum, one search per (run, percentile)."""
    cumulative = np.empty(len(count) + 1, dtype=np.int64)  # cumulative[k + 1]: the count through entry k
    cumulative[0] = 0
    np.cumsum(count, out=cumulative[1:])
    before = cumulative[starts]
    totals = cumulative[ends] - before
    kept = totals > 0
    before, totals = before[kept], totals[kept]
    if not len(before):  # (no runs, or only zero counts)
        return np.zeros(0, dtype=np.int64), np.zeros((0, len(qs)))
    targets = np.stack([before + _ranks(q, totals) for q in qs], axis=1)
    # the first entry whose running count reaches the target
    at = index[np.searchsorted(cumulative, targets, side="left") - 1]
    return ids[kept], _values(at)


def _ranks(q: float, totals: Ints) -> Ints:
    """``rank(q, n)`` for every n in ``totals``: ``max(1, ceil(q * n))`` on the q as written, in exact integers."""
    exact = fractions.Fraction(_as_written(q))
    numerator, denominator = exact.numerator, exact.denominator
    if numerator * int(totals.max()) < _SAFE and denominator < _SAFE:
        return np.maximum(1, -((-numerator * totals) // denominator))
    return np.array([rank(q, n) for n in totals.tolist()], dtype=np.int64)


# ``value_of`` of every index a valid latency can have (ZERO_INDEX is 0.0; 1 µs .. 24 h, the event schema's
# bounds, is about -350 .. 915), computed once in Python's own arithmetic.
_TABLE_FROM, _TABLE_TO = -1024, 2048
_TABLE = np.array([value_of(i) for i in range(_TABLE_FROM, _TABLE_TO)], dtype=np.float64)


def _values(indexes: Ints) -> npt.NDArray[np.float64]:
    """``value_of`` of each index: from the table, or (an index outside it) computed once per distinct index."""
    inside = (indexes >= _TABLE_FROM) & (indexes < _TABLE_TO)
    if bool(inside.all()):
        values: npt.NDArray[np.float64] = _TABLE[indexes - _TABLE_FROM]
        return values
    distinct, position = np.unique(indexes, return_inverse=True)
    table = np.array([value_of(i) for i in distinct.tolist()], dtype=np.float64)
    return table[position.reshape(indexes.shape)]
