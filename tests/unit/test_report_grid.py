"""The report's bucket grid (reliability/report.py): positions of row buckets, bucket ends and the history before a
range, against the definitions they shortcut (a dict of starts, ``bucket_start`` and ``bucket_end``)."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from db.usage import UsageQuery, bucket_end, bucket_start
from reliability.report import EARLIEST, Grid, _grid, _history

UTC = zoneinfo.ZoneInfo("UTC")
ZONES = [UTC, zoneinfo.ZoneInfo("Asia/Kolkata"), zoneinfo.ZoneInfo("America/New_York"),
         zoneinfo.ZoneInfo("Australia/Lord_Howe")]  # fmt: skip
START = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def grid_of(granularity: str, zone: zoneinfo.ZoneInfo, size: int) -> list[dt.datetime]:
    starts = [bucket_start(START, granularity, zone)]
    while len(starts) < size:
        starts.append(bucket_end(starts[-1], granularity, zone))
    return starts


@settings(max_examples=200, deadline=None)
@given(
    granularity=st.sampled_from(["MINUTE", "HOUR", "DAY", "MONTH"]),
    zone=st.sampled_from(ZONES),
    picks=st.lists(st.integers(0, 59), max_size=80),
    off=st.lists(st.integers(1, 10**6), max_size=5),
    runs=st.integers(1, 4),
)
def test_positions_are_those_of_a_dict_of_starts_and_off_grid_starts_come_after(
    granularity: str, zone: zoneinfo.ZoneInfo, picks: list[int], off: list[int], runs: int
) -> None:
    starts = grid_of(granularity, zone, 60)
    grid = Grid(starts, granularity, zone)
    # Rows as the database sends them (Unix seconds), each bucket a few times in a row, in any order; some off the
    # grid (a second after a start), each asked for twice.
    rows = [round(starts[p].timestamp()) for p in picks for _ in range(runs)]
    strays = [round(starts[0].timestamp()) + s for s in off if s % 60]
    rows += strays + strays
    expected_index = {round(start.timestamp()): index for index, start in enumerate(starts)}
    for stray in dict.fromkeys(strays):
        expected_index.setdefault(stray, len(expected_index))
    assert grid.positions(rows).tolist() == [expected_index[row] for row in rows]
    # the strays appended once, in order, as the instants they are
    assert grid.starts == [dt.datetime.fromtimestamp(s, dt.UTC) for s in expected_index]
    positions = np.array([*range(len(grid.starts))] * 2, dtype=np.int64)  # each twice (a bucket per model)
    bounds, start_at, end_at = grid.bounds(positions)
    assert [bounds[i] for i in start_at.tolist()] == grid.starts * 2
    assert [bounds[i] for i in end_at.tolist()] == [bucket_end(s, granularity, zone) for s in grid.starts] * 2
    assert len(bounds) == len(grid.starts) + 1 + len(grid.off_grid)  # the grid's starts and end, each stray's two


def test_positions_of_no_rows_and_of_one() -> None:
    grid = Grid(grid_of("HOUR", UTC, 3), "HOUR", UTC)
    assert grid.positions([]).tolist() == []
    assert grid.positions([round((START + dt.timedelta(hours=2)).timestamp())]).tolist() == [2]


@pytest.mark.parametrize("granularity", ["MINUTE", "HOUR", "DAY", "MONTH"])
@pytest.mark.parametrize("zone", ZONES, ids=str)
def test_history_steps_back_bucket_by_bucket(granularity: str, zone: zoneinfo.ZoneInfo) -> None:
    first = bucket_start(dt.datetime(2026, 4, 5, 12, 30, tzinfo=dt.UTC), granularity, zone)
    history = _history(first, granularity, zone, 200)
    assert len(history) == 200
    # Each bucket ends where the next starts, the last where the range's first starts: the grid is contiguous.
    assert [bucket_end(s, granularity, zone) for s in history] == [*history[1:], first]


@settings(max_examples=200, deadline=None)
@given(
    granularity=st.sampled_from(["MINUTE", "HOUR", "DAY", "MONTH"]),
    zone=st.sampled_from(ZONES),
    start=st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1)),
    seconds=st.integers(1, 40 * 86400),
)
def test_the_grid_is_bucket_end_stepped_from_the_first_start(
    granularity: str, zone: zoneinfo.ZoneInfo, start: dt.datetime, seconds: int
) -> None:
    """Fixed steps (MINUTE, HOUR) are added in a C loop: the same starts as stepping with bucket_end, which DAY and
    MONTH still do (whatever the zone: half-hour offsets, DST)."""
    begin = start.replace(tzinfo=dt.UTC)
    query = UsageQuery(org_id="o", start=begin, end=begin + dt.timedelta(seconds=seconds), granularity=granularity,
                       time_zone=str(zone))  # fmt: skip
    expected = [bucket_start(begin, granularity, zone)]
    while (following := bucket_end(expected[-1], granularity, zone)) < query.end:
        expected.append(following)
    assert _grid(query, zone) == expected


@pytest.mark.parametrize("granularity", ["MINUTE", "HOUR", "DAY", "MONTH"])
def test_history_stops_32_days_after_the_earliest_instant(granularity: str) -> None:
    first = bucket_start(EARLIEST + dt.timedelta(days=100), granularity, UTC)
    history = _history(first, granularity, UTC, 100_000)
    assert history and history[0] >= EARLIEST + dt.timedelta(days=32)
    assert bucket_start(history[0] - dt.timedelta(microseconds=1), granularity, UTC) < EARLIEST + dt.timedelta(days=32)
    assert _history(EARLIEST + dt.timedelta(days=10), granularity, UTC, 5) == []
