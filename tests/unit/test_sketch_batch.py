"""The batch path of reliability/sketch.py (packed sketches, numpy) answers exactly what the dict path answers.

``quantiles(merged(...))`` is the reference: its rank rule is the documented one and the percentile property test
(tests/integration/test_percentiles.py) holds it to the 1 % bound. Here every group of a :class:`Batch`, however
its sketches are spread, ordered or repeated, must give the same floats, and so must the merge of all of them.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from db.sketch import PACKED_ENTRY_BYTES, RANKED_PERCENTILES, ZERO_INDEX
from reliability.sketch import (
    _TABLE_FROM,
    _TABLE_TO,
    Batch,
    _values,
    merged,
    pack,
    pack_ranks,
    quantiles,
    rank,
    unpack,
    value_of,
)


def by_group(batch: Batch, qs: list[float]) -> list[list[float] | None]:
    """``Batch.quantile_table`` as a list by group: each group's percentiles, None for an empty group."""
    return [None if np.isnan(row[0]) else row for row in batch.quantile_table(qs).tolist()]


PERCENTILES = (0.001, 0.1, 0.5, 0.95, 0.99, 0.999)

# Valid latencies' indexes (the value table), ZERO_INDEX and indexes beyond the table (computed one by one).
index = st.one_of(st.integers(-400, 700), st.just(ZERO_INDEX), st.integers(-2000, 3000))
sketch = st.dictionaries(index, st.integers(1, 10**6), min_size=1, max_size=40)
percentile = st.one_of(st.sampled_from(PERCENTILES), st.floats(1e-9, 1 - 1e-9), st.just(1e-320))


@settings(max_examples=300, deadline=None)
@given(
    sketches=st.lists(sketch, min_size=1, max_size=30),
    groups=st.integers(1, 8),
    data=st.data(),
    qs=st.lists(percentile, min_size=1, max_size=5),
)
def test_every_group_and_the_total_match_the_dict_merge(
    sketches: list[dict[int, int]], groups: int, data: st.DataObject, qs: list[float]
) -> None:
    group_of = data.draw(st.lists(st.integers(0, groups - 1), min_size=len(sketches), max_size=len(sketches)))
    batch = Batch([pack(s) for s in sketches], group_of, groups)
    got = by_group(batch, qs)
    for group in range(groups):
        members = [s for s, g in zip(sketches, group_of, strict=True) if g == group]
        assert got[group] == (quantiles(merged(members), qs) if members else None), group
    assert batch.merged_quantiles(qs) == quantiles(merged(sketches), qs)


def shuffled_entries(entries: list[tuple[int, int]], order: list[int]) -> bytes:
    """A packed sketch of ``entries`` (repeats allowed) in the order given by sorting on ``order``."""
    ranked = [e for _, e in sorted(zip(order, entries, strict=True))]
    out = np.empty(len(ranked), dtype=[("index", ">i4"), ("count", ">i8")])
    out["index"], out["count"] = [i for i, _ in ranked], [c for _, c in ranked]
    return out.tobytes()


@settings(max_examples=300, deadline=None)
@given(
    sketches=st.lists(st.lists(st.tuples(index, st.integers(0, 10**6)), max_size=30), min_size=1, max_size=30),
    data=st.data(),
    qs=st.lists(percentile, min_size=1, max_size=5),
)
def test_one_sketch_a_group_in_any_entry_order_matches_the_dict_merge(
    sketches: list[list[tuple[int, int]]], data: st.DataObject, qs: list[float]
) -> None:
    """The path an HOUR series takes (each group one sketch, groups ascending, with gaps): some sketches come in
    order, others (query-time ones) in any order, with repeated indexes, zero counts and empty sketches."""
    gaps = data.draw(st.lists(st.integers(1, 3), min_size=len(sketches), max_size=len(sketches)))
    group_of = list(itertools.accumulate(gaps, initial=-1))[1:]
    packed = []
    for entries in sketches:
        in_order = data.draw(st.booleans())
        order = list(range(len(entries))) if not in_order else [i for i, _ in entries]
        packed.append(shuffled_entries(entries, data.draw(st.permutations(order)) if not in_order else order))
    batch = Batch(packed, group_of, group_of[-1] + 2)
    got = by_group(batch, qs)
    expected: list[list[float] | None] = [None] * (group_of[-1] + 2)
    for g, entries in zip(group_of, sketches, strict=True):
        expected[g] = quantiles(merged({i: c} for i, c in entries), qs)
    assert got == expected
    everything = merged({i: c} for entries in sketches for i, c in entries)
    assert batch.merged_quantiles(qs) == quantiles(everything, qs)
    assert by_group(batch, qs) == expected  # asked again: the sketches put in order in place answer the same


def test_repeated_indexes_and_unsorted_entries_merge() -> None:
    first, second = pack({5: 2, 9: 1}), pack({9: 3})
    reversed_entries = b"".join(reversed([first[i : i + PACKED_ENTRY_BYTES] for i in range(0, len(first), 12)]))
    batch = Batch([reversed_entries, second, pack({1: 100})], [0, 0, 1], 3)
    assert by_group(batch, [0.5])[0] == quantiles({5: 2, 9: 4}, [0.5])
    assert by_group(batch, [0.5])[2] is None
    assert unpack(reversed_entries + second) == {5: 2, 9: 4}


def test_ranks_are_exact_for_the_percentile_as_written() -> None:
    # 0.1 * 10 is 1 exactly (the double 0.1 is above 0.1, so float arithmetic would take rank 2).
    sketch = {i: 1 for i in range(10)}
    assert by_group(Batch([pack(sketch)], [0], 1), [0.1, 0.95]) == [quantiles(sketch, [0.1, 0.95])]
    assert rank(0.1, 10) == 1
    huge = {0: 3 * 10**15, 1: 10**15}  # numerator * n beyond int64: exact Python integers
    assert by_group(Batch([pack(huge)], [0], 1), [0.123456789012345678]) == [quantiles(huge, [0.123456789012345678])]


def test_no_sketches_and_malformed_input() -> None:
    assert by_group(Batch([], [], 2), [0.5]) == [None, None]
    assert Batch([], [], 0).merged_quantiles([0.5]) is None
    with pytest.raises(ValueError, match="whole 12-byte entries"):
        Batch([b"\x00" * 13], [0], 1)
    with pytest.raises(ValueError, match="group ids"):
        Batch([pack({1: 1})], [], 1)


def test_the_value_table_is_value_of_at_every_index_and_beyond() -> None:
    indexes = np.arange(_TABLE_FROM - 3, _TABLE_TO + 3)
    expected = [value_of(i) for i in indexes.tolist()]
    assert _values(indexes).tolist() == expected  # some outside the table: computed one by one
    inside = indexes[3:-3]
    assert _values(inside).tolist() == expected[3:-3]  # all from the table
    assert _values(np.array([ZERO_INDEX, 0, 914])).tolist() == [0.0, value_of(0), value_of(914)]


def rank_indexes(sketch: dict[int, int]) -> bytes:
    """A rollup row's stored ranks (migration 0012's ``sketch_rank_indexes``) as the API reads them: the bucket
    index of each of RANKED_PERCENTILES by the rank rule, packed (``pack_ranks``)."""
    indexes = sorted(sketch)
    cumulative = list(itertools.accumulate(sketch[i] for i in indexes))
    return pack_ranks([indexes[int(np.searchsorted(cumulative, rank(q, cumulative[-1])))] for q in RANKED_PERCENTILES])


@settings(max_examples=200, deadline=None)
@given(
    sketches=st.lists(sketch, min_size=1, max_size=20),
    data=st.data(),
    qs=st.lists(st.sampled_from(RANKED_PERCENTILES), min_size=1, max_size=4),
    also=st.lists(sketch, max_size=4),
)
def test_ranked_rows_answer_what_their_sketches_would(
    sketches: list[dict[int, int]], data: st.DataObject, qs: list[float], also: list[dict[int, int]]
) -> None:
    """Rows with stored ranks (no sketch) beside rows with sketches: every group as if all had sketches; the merge
    is of the sketches and ``also`` (the ranked rows' sketches, given apart, as the totals' rows are)."""
    ranked = data.draw(st.lists(st.booleans(), min_size=len(sketches), max_size=len(sketches)))
    order = data.draw(st.permutations(range(len(sketches))))  # a group a row, in any order
    packed = [None if r else pack(s) for s, r in zip(sketches, ranked, strict=True)]
    ranks = [rank_indexes(s) if r else None for s, r in zip(sketches, ranked, strict=True)]
    batch = Batch(packed, order, len(sketches), ranks)
    reference = Batch([pack(s) for s in sketches], order, len(sketches))
    assert by_group(batch, qs) == by_group(reference, qs)
    unranked = [s for s, r in zip(sketches, ranked, strict=True) if not r]
    assert batch.merged_quantiles(qs, also=[pack(s) for s in also]) == quantiles(merged([*unranked, *also]), qs)


def test_ranked_rows_refuse_what_they_cannot_answer() -> None:
    one, two = {3: 1, 9: 2}, {1: 5}
    with pytest.raises(ValueError, match=r"not among the ranked"):
        Batch([None], [0], 1, [rank_indexes(one)]).quantile_table([0.5, 0.42])
    with pytest.raises(ValueError, match=r"shares its group"):
        Batch([None, pack(two)], [0, 0], 1, [rank_indexes(one), None])
    with pytest.raises(ValueError, match=r"shares its group"):
        Batch([None, None], [0, 0], 1, [rank_indexes(one), rank_indexes(two)])
    with pytest.raises(ValueError, match=r"both a sketch and ranks"):
        Batch([pack(one)], [0], 1, [rank_indexes(one)])
    with pytest.raises(ValueError, match=r"rank lists"):
        Batch([pack(one), pack(two)], [0, 1], 2, [None])
    with pytest.raises(ValueError, match=r"bytes of ranks for 1 rows"):  # too few indexes, or a stray byte
        Batch([None], [0], 1, [pack_ranks([1, 2, 3])])
    with pytest.raises(ValueError, match=r"bytes of ranks"):
        Batch([None], [0], 1, [rank_indexes(one) + b"\x00"])
    null_element = bytearray(rank_indexes(one))
    null_element[4:8] = (1).to_bytes(4, "big")  # the has-nulls flag, and a NULL's length in place of an element's
    null_element[4 * 5 : 4 * 6] = (-1).to_bytes(4, "big", signed=True)
    with pytest.raises(ValueError, match=r"not 6 int4 bucket indexes"):
        Batch([None], [0], 1, [bytes(null_element)])
    int8_array = bytearray(rank_indexes(one))
    int8_array[8:12] = (20).to_bytes(4, "big")  # int8's type
    with pytest.raises(ValueError, match=r"not 6 int4 bucket indexes"):
        Batch([None], [0], 1, [bytes(int8_array)])
    # without ranked rows, any percentile
    assert by_group(Batch([pack(one)], [0], 1, [None]), [0.42]) == [quantiles(one, [0.42])]
