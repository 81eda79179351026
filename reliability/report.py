"""The reliability report of one org and range: series, totals, breakdown and spikes with their causes.

Rows come from db/reliability.py (rollups where complete, raw events elsewhere). The packed sketches of all
buckets are merged per bucket and read in one batch (reliability/sketch.py ``Batch``), and once more all together
for the totals; an HOUR series per model asked for the usual percentiles reads none (:func:`ranked_series`: each
bucket's percentile indexes are stored on its hourly row, and the totals merge daily sketches). Spike detection
(reliability/spikes.py) runs on every series over a contiguous grid of buckets that reaches ``lookback`` buckets
before the range, so the first buckets of the range have a baseline too; each spike found is explained
(reliability/attribution.py) by the composition of its window against its baseline's window.

Bounds: at most MAX_SPIKES spikes (the most severe, then the largest relative to their baseline) are reported
and explained; the slow-request composition of a latency spike reads raw events of at most COMPOSITION_SPAN
before and at its start; the breakdown has at most BREAKDOWN_ROWS rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import itertools
import math
import operator
import zoneinfo
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar, cast

import numpy as np
import numpy.typing as npt
from sqlalchemy.ext.asyncio import AsyncConnection

from db.reliability import (
    ErrorRow,
    SeriesColumns,
    Window,
    compositions,
    error_rows,
    rankable,
    series_rows,
    window,
)
from db.sketch import RANKED_PERCENTILES
from db.usage import UsageQuery, bucket_end, bucket_start
from kernel.hours import EARLIEST
from kernel.offload import Offload
from reliability import sketch as sketches
from reliability.attribution import Composition, Contribution, attribute
from reliability.spikes import Columns, Detection, Metric, Severity, detect_all, lookback

SEASON = {"MINUTE": None, "HOUR": 24, "DAY": 7, "MONTH": None}
DETECTION_PERCENTILES = (0.95, 0.99)
BREAKDOWN_ROWS = 50
MAX_SPIKES = 20
CONTRIBUTORS = 5
# The slow requests of a latency spike, and of its reference, come from raw events: at most this much of each
# (24 h cost the largest org's reference scan 35 ms, 6 h 7 ms; attribution quality at 3, 6, 12 and 24 h:
# docs/reliability.md, bench.detection_quality).
COMPOSITION_SPAN = dt.timedelta(hours=3)
ATTRIBUTION_STATEMENTS = 4  # at once, each on its own connection (class Attribution)
STARTING_PASSES = 10  # event loop passes that the attribution statements get to be sent
SPLIT_BUCKETS = 240  # a longer series is read in SERIES_PARTS parts at once
SERIES_PARTS = 2

_T = TypeVar("_T")
Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class Series:
    """The buckets of the answer, ordered by start, then model. Bucket i runs from ``bounds[start_at[i]]`` to
    ``bounds[end_at[i]]`` for the model ``names[model_at[i]]``, with entry i of each count and rate and row i of
    ``latency_table`` (the requested percentiles in their order; a row of NaN for a bucket without latencies).

    Arrays are what the report computes and what the JSON writer reads (resolvers/reliability_json.py: no Python
    value a bucket on that path); the per-bucket lists (``starts`` to ``latency``) are made from them on first use
    (the executor's path, tests), and two series are equal when their lists are."""

    bounds: Sequence[dt.datetime]
    start_at: Ints
    end_at: Ints
    names: Sequence[str | None]
    model_at: Ints
    request_counts: Ints
    error_counts: Ints
    client_error_counts: Ints
    error_rate_values: Floats  # errors / requests, 0 with no requests (error_rate)
    latency_table: Floats

    @classmethod
    def of(
        cls,
        starts: Sequence[dt.datetime],
        ends: Sequence[dt.datetime],
        models: Sequence[str | None],
        requests: Sequence[int],
        errors: Sequence[int],
        client_errors: Sequence[int],
        latency: Sequence[Sequence[float]],  # a bucket's percentiles, or none: all of one length
    ) -> Series:
        """A series from per-bucket values (tests, callers with few buckets)."""
        bounds = list(dict.fromkeys([*starts, *ends]))
        names = list(dict.fromkeys(models))
        width = max(map(len, latency), default=0)
        if any(len(values) not in (0, width) for values in latency):
            raise ValueError(f"buckets with latencies must all have {width} values")
        table = np.full((len(latency), width), math.nan)
        for row, values in zip(table, latency, strict=True):
            row[: len(values)] = values
        return cls(
            bounds, _codes(starts, bounds), _codes(ends, bounds), names, _codes(models, names),
            np.array(requests, dtype=np.int64), np.array(errors, dtype=np.int64),
            np.array(client_errors, dtype=np.int64),
            np.array([error_rate(e, n) for e, n in zip(errors, requests, strict=True)], dtype=np.float64), table,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.start_at)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Series):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in _LISTS)

    __hash__ = None  # type: ignore[assignment]

    @functools.cached_property
    def starts(self) -> list[dt.datetime]:
        return list(map(self.bounds.__getitem__, self.start_at.tolist()))

    @functools.cached_property
    def ends(self) -> list[dt.datetime]:
        return list(map(self.bounds.__getitem__, self.end_at.tolist()))

    @functools.cached_property
    def models(self) -> list[str | None]:
        return list(map(self.names.__getitem__, self.model_at.tolist()))

    @functools.cached_property
    def requests(self) -> list[int]:
        return self.request_counts.tolist()  # type: ignore[no-any-return]

    @functools.cached_property
    def errors(self) -> list[int]:
        return self.error_counts.tolist()  # type: ignore[no-any-return]

    @functools.cached_property
    def client_errors(self) -> list[int]:
        return self.client_error_counts.tolist()  # type: ignore[no-any-return]

    @functools.cached_property
    def error_rates(self) -> list[float]:
        return self.error_rate_values.tolist()  # type: ignore[no-any-return]

    @functools.cached_property
    def latency(self) -> list[list[float]]:
        """Each bucket's percentiles in the requested order; [] for a bucket without latencies."""
        table = self.latency_table
        rows: list[list[float]] = table.tolist()
        if table.shape[1] and np.isnan(table[:, 0]).any():
            rows = [[] if math.isnan(row[0]) else row for row in rows]
        return rows


_LISTS = ("starts", "ends", "models", "requests", "errors", "client_errors", "error_rates", "latency")


def _codes(values: Sequence[Any], distinct: Sequence[Any]) -> Ints:
    """Each value's index in ``distinct`` (which holds every value once)."""
    index = {value: i for i, value in enumerate(distinct)}
    return np.fromiter(map(index.__getitem__, values), dtype=np.int64, count=len(values))


@dataclass(frozen=True)
class Totals:
    requests: int
    errors: int
    client_errors: int
    latency: list[float]


@dataclass(frozen=True)
class Cause:
    model: str | None
    status_code: int | None
    error_type: str | None
    count: int
    share: float


@dataclass(frozen=True)
class FoundSpike:
    start: dt.datetime
    end: dt.datetime
    metric: Metric
    observed: float
    baseline: float
    severity: Severity
    model: str | None
    causes: list[Cause]


@dataclass(frozen=True)
class Report:
    totals: Totals
    series: Series
    spikes: list[FoundSpike]
    breakdown: list[Cause]


def error_rate(errors: int, requests: int) -> float:
    return errors / requests if requests else 0.0


def error_rates(errors: Ints, requests: Ints) -> Floats:
    """:func:`error_rate` of each pair (the same floats for counts below 2**53: one correctly rounded division)."""
    return np.divide(errors, requests, out=np.zeros(len(requests)), where=requests != 0)


Connect = Callable[[], AbstractAsyncContextManager[AsyncConnection]]
_HERE = Offload(0)  # every step in this process (no offload given)


async def build_report(
    connect: Connect,
    query: UsageQuery,
    percentiles: Sequence[float],
    materialized_through: dt.datetime | None,
    *,
    meanwhile: Callable[[Series], _T],
    offload: Offload | None = None,
) -> tuple[Report, _T]:
    """The report, and what ``meanwhile`` made of its series while its spikes were found (in a helper process of
    ``offload``, when one is free) or, when they were found here, while their attribution statements ran: the
    caller's own work on the series, e.g. writing it as JSON, overlaps with another core's or PostgreSQL's.

    ``query.group_by`` is ``{"model"}`` for one series per model, empty for one overall series.

    ``connect`` opens a connection (``engine.connect``): the range's series (in two parts when it is long), its
    history and the breakdown are independent statements, run at once on their own connections (each reads the
    rollups and raw events in its own snapshot, as they did one after the other; every event is in exactly one
    of them, so none counts twice); so are the few statements that read the windows that explain the spikes
    (:class:`Attribution`)."""
    assert query.granularity is not None
    by_model = "model" in query.group_by
    zone = zoneinfo.ZoneInfo(query.time_zone)
    grid = _grid(query, zone)
    history = _history(grid[0], query.granularity, zone, lookback(SEASON[query.granularity]))
    starts = history + grid
    earlier = dataclasses.replace(query, start=history[0], end=grid[0]) if history else None
    # The breakdown is not bucketed: whole hours come from errors_hourly whatever the granularity (a MINUTE
    # report's breakdown read every raw event of its day again).
    unbucketed = dataclasses.replace(query, granularity=None, time_zone="UTC")
    parts = _parts(query, grid)
    wanted = [*percentiles, *DETECTION_PERCENTILES]
    ranked = ranked_series(query, percentiles)
    # The breakdown is needed last: its statement runs while the series are read and their spikes found.
    breakdown_rows = asyncio.ensure_future(
        _with(connect, error_rows, unbucketed, materialized_through, limit=BREAKDOWN_ROWS)
    )
    explaining = Attribution(connect, materialized_through)
    plans: list[Coroutine[Any, Any, FoundSpike]] = []  # every spike's, closed at the end unless awaited

    def plan(model: str | None, detection: Detection) -> Coroutine[Any, Any, FoundSpike]:
        plans.append(_plan(explaining, query, starts, model, detection, zone))
        return plans[-1]

    try:
        series_parts, history_rows = await asyncio.gather(
            asyncio.gather(
                *(
                    _with(connect, series_rows, part, materialized_through, per_model=by_model, ranked=ranked,
                          totals=ranked)
                    for part in parts
                )
            ),
            _with(connect, series_rows, earlier, materialized_through, per_model=by_model, ranked=ranked)
            if earlier
            else _no_rows(),
        )  # fmt: skip
        grid_of = Grid(starts, query.granularity, zone)
        models: dict[str | None, int] = {}  # model -> its code, shared by the range and its history
        series = _collect(_joined(series_parts), by_model, grid_of, models)
        past = _collect(history_rows, by_model, grid_of, models)
        table, past_table = series.batch.quantile_table(wanted), past.batch.quantile_table(wanted)
        count = len(percentiles)
        columns_of = _detection_columns(grid_of, (series, past), (table[:, count:], past_table[:, count:]), models)
        season, explained = SEASON[query.granularity], len(history)

        def flat(found: list[list[Detection]]) -> list[tuple[str | None, Detection]]:
            """Each model's detections (error rate, p95, p99), models by name, as (series model, detection)."""
            return [(model if by_model else None, d) for (model, _), each in zip(columns_of, found, strict=True)
                    for d in each]  # fmt: skip

        async def explain(detected: list[list[Detection]]) -> list[Coroutine[Any, Any, FoundSpike]]:
            """The most severe MAX_SPIKES spikes, their attribution statements sent."""
            chosen = [plan(m, d) for m, d in _most_severe(flat(detected))]
            await explaining.start()
            return chosen

        # Spike detection in a helper process while this one writes the rest of the report; where it ran here (no
        # helper free), its spikes' statements go out first and PostgreSQL explains them meanwhile.
        detecting = (offload or _HERE).run(detect_all, [c for _, c in columns_of], explained, season)
        chosen = await explain(detecting.result()) if detecting.done() else None
        totals = Totals(
            requests=int(series.requests.sum()), errors=int(series.errors.sum()),
            client_errors=int(series.client_errors.sum()),
            latency=series.batch.merged_quantiles(percentiles, also=series.totals) or [],
        )  # fmt: skip
        columns = _series(series, table[:, :count], grid_of, models)
        made = meanwhile(columns)
        if chosen is None:
            chosen = await explain(await detecting)
        found = [await each for each in chosen]
        breakdown = await breakdown_rows
    except BaseException:
        breakdown_rows.cancel()
        await explaining.cancel()
        await asyncio.gather(breakdown_rows, return_exceptions=True)
        raise
    finally:
        for each in plans:
            each.close()  # those not awaited: not chosen, or not reached
    found.sort(key=lambda s: (s.start, s.metric, s.model or ""))
    total_errors = sum(r.requests for r in breakdown) or 1
    return Report(totals, columns, found, [_cause(r, r.requests / total_errors) for r in breakdown]), made


def ranked_series(query: UsageQuery, percentiles: Sequence[float]) -> bool:
    """Whether the report reads its series ranked (``db.reliability.series_rows``): each bucket's percentiles from
    its hourly row's stored rank indexes, and the range's totals from daily sketches, so that no hourly sketch is
    read: an HOUR series per model, asked only for RANKED_PERCENTILES (and those of detection, among them)."""
    wanted = (*percentiles, *DETECTION_PERCENTILES)
    return rankable(query, per_model="model" in query.group_by) and all(q in RANKED_PERCENTILES for q in wanted)


async def _with(connect: Connect, fetch: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
    async with connect() as connection:
        return await fetch(connection, *args, **kwargs)


async def _no_rows() -> SeriesColumns:
    return SeriesColumns.of([])


def _joined(parts: Sequence[SeriesColumns]) -> SeriesColumns:
    """Consecutive ranges' columns as one (each part ordered, so the whole is)."""
    if len(parts) == 1:
        return parts[0]
    return SeriesColumns(*(tuple(itertools.chain.from_iterable(column)) for column in zip(*parts, strict=True)))


def _parts(query: UsageQuery, grid: Sequence[dt.datetime]) -> list[UsageQuery]:
    """The range in SERIES_PARTS consecutive parts split at bucket starts (each bucket in one part), when it has
    more than SPLIT_BUCKETS buckets: the parts are read at once, on their own connections (a 30-day HOUR series
    moves 5 MB of sketches, most of its statement's time)."""
    if len(grid) <= SPLIT_BUCKETS:
        return [query]
    cuts = [grid[len(grid) * i // SERIES_PARTS] for i in range(1, SERIES_PARTS)]
    bounds = [query.start, *cuts, query.end]
    return [dataclasses.replace(query, start=a, end=b) for a, b in itertools.pairwise(bounds)]


FIXED_STEPS = {"MINUTE": dt.timedelta(minutes=1), "HOUR": dt.timedelta(hours=1)}  # (bucket_end's)


def _grid(query: UsageQuery, zone: zoneinfo.ZoneInfo) -> list[dt.datetime]:
    """Bucket starts from the one holding ``query.start`` to the last before ``query.end``."""
    assert query.granularity is not None
    first = bucket_start(query.start, query.granularity, zone)
    step = FIXED_STEPS.get(query.granularity)
    if step is not None:  # a fixed step, as ``bucket_end`` has it: the count is known, the starts added in a C loop
        count = max(1, -((first - query.end) // step))  # ceil((end - first) / step), and the first in any case
        return list(itertools.accumulate(itertools.repeat(step, count - 1), operator.add, initial=first))
    starts = [first]
    while (following := bucket_end(starts[-1], query.granularity, zone)) < query.end:
        starts.append(following)
    return starts


def _history(first: dt.datetime, granularity: str, zone: zoneinfo.ZoneInfo, count: int) -> list[dt.datetime]:
    """Up to ``count`` bucket starts before ``first``, oldest first (none that starts within 32 days of EARLIEST)."""
    step = FIXED_STEPS.get(granularity)
    limit = EARLIEST + dt.timedelta(days=32)
    if step is not None:  # a fixed step, as ``bucket_end`` has it (and so the grid's): the starts in a C loop
        count = min(count, (first - limit) // step)
        if count <= 0:
            return []
        return list(itertools.accumulate(itertools.repeat(step, count - 1), operator.add, initial=first - count * step))
    starts: list[dt.datetime] = []
    current = first
    for _ in range(count):
        current = bucket_start(current - dt.timedelta(microseconds=1), granularity, zone)
        if current < limit:
            break
        starts.append(current)
    return starts[::-1]


class Grid:
    """The buckets' starts (history, then the range) and their positions; a start off the grid (none is, but for a
    caller's mistake) gets a position after it, so it is still answered, but never part of detection.

    Rows name their bucket by its start in Unix seconds (``SeriesColumns.bucket``): a position is found by binary
    search in the grid's starts as Unix seconds (exact: bucket starts are whole seconds), all rows at once."""

    def __init__(self, starts: Sequence[dt.datetime], granularity: str, zone: zoneinfo.ZoneInfo) -> None:
        self.starts = list(starts)
        self.size = len(self.starts)
        origin = self.starts[0] if self.starts else dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        # (subtracting datetimes of one zone is a C fast path; the origin's own Unix time is exact: whole seconds)
        self.seconds = _offsets(self.starts, origin).astype(np.int64) + round(origin.timestamp())
        self.off_grid: dict[int, int] = {}  # a start off the grid (Unix seconds) -> its position
        self.granularity, self.zone = granularity, zone

    def positions(self, starts: Sequence[int]) -> Ints:
        """Each start's position (``starts`` in Unix seconds)."""
        seconds = np.fromiter(starts, dtype=np.int64, count=len(starts))
        found = np.searchsorted(self.seconds, seconds)
        inside = np.minimum(found, max(self.size - 1, 0))
        on = (found < self.size) & (self.seconds[inside] == seconds) if self.size else np.zeros(len(seconds), bool)
        for index in np.flatnonzero(~on).tolist():  # off the grid (tests/unit/test_report_grid.py)
            start = int(seconds[index])
            if start not in self.off_grid:
                self.off_grid[start] = len(self.starts)
                self.starts.append(dt.datetime.fromtimestamp(start, dt.UTC))
            found[index] = self.off_grid[start]
        return found.astype(np.int64, copy=False)

    def bounds(self, positions: Ints) -> tuple[list[dt.datetime], Ints, Ints]:
        """The starts and ends of the buckets at ``positions``, as the distinct instants and each bucket's indexes
        into them: the grid's starts, then its end (the grid is contiguous: a bucket ends where the next one
        starts), then the starts off the grid (appended by :meth:`positions`) and then their ends."""
        off = self.starts[self.size :]
        last = [bucket_end(s, self.granularity, self.zone) for s in self.starts[self.size - 1 : self.size]]
        bounds = [*self.starts[: self.size], *last, *off, *(bucket_end(s, self.granularity, self.zone) for s in off)]
        if not off:
            return bounds, positions, positions + 1
        on = positions < self.size
        return bounds, np.where(on, positions, positions + 1), np.where(on, positions + 1, positions + 1 + len(off))


def _offsets(starts: Sequence[dt.datetime], origin: dt.datetime) -> npt.NDArray[np.float64]:
    """Each start's seconds after ``origin`` (C loops)."""
    differences = map(operator.sub, starts, itertools.repeat(origin))
    return np.fromiter(map(dt.timedelta.total_seconds, differences), dtype=np.float64, count=len(starts))


class Collected(NamedTuple):
    """A series' buckets as arrays (bucket i: ``position[i]`` on the grid, model code ``model[i]``), with their
    packed sketches, each tagged with its bucket."""

    position: Ints
    model: Ints
    requests: Ints
    errors: Ints
    client_errors: Ints
    batch: sketches.Batch
    totals: Sequence[bytes]  # sketches that count toward the totals only (ranked rows have none in the batch)


def _collect(rows: SeriesColumns, by_model: bool, grid: Grid, models: dict[str | None, int]) -> Collected:
    """One bucket per start (and model), rows added up; ordered by start, then model. Rows come ordered by bucket
    and model, so the rows of one bucket (and model) are consecutive."""
    size = len(rows.bucket)
    position = grid.positions(cast(Sequence[int], rows.bucket))  # (a report's series always has a granularity)
    if by_model:
        for name in dict.fromkeys(rows.model):  # (the distinct models in order: a C loop over the rows)
            models.setdefault(name, len(models))
        model = np.fromiter(map(models.__getitem__, rows.model), dtype=np.int64, count=size)
    else:
        models.setdefault(None, 0)
        model = np.zeros(size, dtype=np.int64)
    new = np.ones(size, dtype=bool)  # a row that starts a bucket
    new[1:] = (position[1:] != position[:-1]) | (model[1:] != model[:-1])
    first = np.flatnonzero(new)

    def summed(column: Sequence[int]) -> Ints:
        values = np.fromiter(column, dtype=np.int64, count=size)
        return np.add.reduceat(values, first) if size else values

    group_of = np.cumsum(new) - 1
    return Collected(position[first], model[first], summed(rows.requests), summed(rows.errors),
                     summed(rows.client_errors), sketches.Batch(rows.sketch, group_of, len(first), rows.ranks),
                     rows.totals)  # fmt: skip


def _series(collected: Collected, latency: Floats, grid: Grid, models: dict[str | None, int]) -> Series:
    """The answer's columns: bucket bounds as positions on the grid (a bucket ends where the next one starts)."""
    bounds, start_at, end_at = grid.bounds(collected.position)
    return Series(
        bounds=bounds, start_at=start_at, end_at=end_at, names=list(models), model_at=collected.model,
        request_counts=collected.requests, error_counts=collected.errors, client_error_counts=collected.client_errors,
        error_rate_values=error_rates(collected.errors, collected.requests), latency_table=latency,
    )  # fmt: skip


def _detection_columns(
    grid: Grid,
    series: Sequence[Collected],
    detection: Sequence[npt.NDArray[np.float64]],  # each bucket's p95 and p99 (NaN with no latencies)
    models: dict[str | None, int],
) -> list[tuple[str | None, Columns]]:
    """Each model's (or the one) series as columns over the whole grid (no traffic: 0 requests, no latency), by
    model name."""
    size = grid.size
    shape = (len(models), size)
    requests, errors = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    p95, p99 = np.full(shape, np.nan), np.full(shape, np.nan)
    for collected, values in zip(series, detection, strict=True):
        on = collected.position < size  # every bucket start is on the grid
        at = (collected.model[on], collected.position[on])
        requests[at], errors[at] = collected.requests[on], collected.errors[on]
        p95[at], p99[at] = values[on, 0], values[on, 1]
    return [
        (model, Columns(requests[c], errors[c], p95[c], p99[c]))
        for model, c in sorted(models.items(), key=lambda item: item[0] or "")
    ]


def _most_severe(spikes: list[tuple[str | None, Detection]]) -> list[tuple[str | None, Detection]]:
    """At most MAX_SPIKES: critical first, then the largest relative to their baseline."""
    return sorted(spikes, key=lambda s: (s[1].severity != Severity.CRITICAL, -_relative(s[1])))[:MAX_SPIKES]


def _relative(detection: Detection) -> float:
    return detection.observed / detection.baseline if detection.baseline > 0 else float("inf")


class Attribution:
    """The compositions that explain a report's spikes: windows are registered, then each :meth:`start` reads those
    registered since the last by at most ATTRIBUTION_STATEMENTS statements (``db.reliability.compositions``) at once,
    each on its own connection: the windows of error spikes (rollups, cheap) together, the slow-request windows of
    latency spikes (raw events) spread over the others. They are sent before the report's remaining Python work, so
    that PostgreSQL reads while Python works."""

    def __init__(self, connect: Connect, materialized_through: dt.datetime | None) -> None:
        self.connect, self.materialized_through = connect, materialized_through
        self.windows: list[Window] = []
        self.futures: list[asyncio.Future[Composition]] = []  # one per window, set by the statement that reads it
        self.tasks: list[asyncio.Future[None]] = []
        self.grouped = 0  # windows up to here have their statement
        self.sent = 0

    def composition(self, scope: UsageQuery, slower_than_ms: float | None = None) -> asyncio.Future[Composition]:
        """A window's errors (or, given a threshold, its requests slower than it) by model, status code and error
        type, and its requests by model: once :meth:`start` has read them."""
        future: asyncio.Future[Composition] = asyncio.get_running_loop().create_future()
        if scope.start >= scope.end:
            future.set_result(Composition(requests={}, hits={}))
        else:
            self.windows.append((scope, slower_than_ms))
            self.futures.append(future)
        return future

    async def start(self) -> None:
        """Sends the statements of the windows registered since the last call and returns once they are on their
        way (the event loop runs each task up to its first wait, connection checkout included: a few passes at
        most) or done."""
        new = range(self.grouped, len(self.windows))
        self.grouped = len(self.windows)
        errors = [i for i in new if self.windows[i][1] is None]
        slow = [i for i in new if self.windows[i][1] is not None]
        spread = ATTRIBUTION_STATEMENTS - (1 if errors else 0)
        for group in (g for g in (errors, *(slow[k::spread] for k in range(spread))) if g):
            self.tasks.append(asyncio.ensure_future(self._read(group)))
        for _ in range(STARTING_PASSES):
            if self.sent == len(self.tasks) or all(task.done() for task in self.tasks):
                return
            await asyncio.sleep(0)

    async def _read(self, group: list[int]) -> None:
        try:
            async with self.connect() as connection:
                self.sent += 1  # the statement goes out in this step (the driver writes it before it waits)
                found = await compositions(connection, [self.windows[i] for i in group], self.materialized_through)
        except BaseException as exc:
            for i in group:
                if not self.futures[i].done():
                    self.futures[i].set_exception(exc)
            raise
        for i, each in zip(group, found, strict=True):
            self.futures[i].set_result(Composition(requests=each.requests, hits=_hits(each.hits)))

    async def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for future in self.futures:
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: the report's own error is the one raised
            future.cancel()


def _plan(
    explaining: Attribution,
    query: UsageQuery,
    starts: Sequence[dt.datetime],
    model: str | None,
    detection: Detection,
    zone: zoneinfo.ZoneInfo,
) -> Coroutine[Any, Any, FoundSpike]:
    """A spike with its causes: its window's composition against its reference's (registered now, read by
    :meth:`Attribution.start`; the spike is assembled when they are read)."""
    assert query.granularity is not None
    start = starts[detection.first]
    end = min(bucket_end(starts[detection.last], query.granularity, zone), query.end)
    start = max(start, query.start)
    scope = dataclasses.replace(query, models=[model]) if model is not None else query
    if detection.reference:
        ref_start = starts[detection.reference.start]
        ref_end = bucket_end(starts[detection.reference[-1]], query.granularity, zone)
    else:
        ref_start = ref_end = start
    if detection.metric == Metric.ERROR_RATE:
        spike = explaining.composition(window(scope, start, end))
        reference = explaining.composition(window(scope, ref_start, ref_end))
    else:
        spike_end = min(end, start + COMPOSITION_SPAN)
        ref_start = max(ref_start, ref_end - COMPOSITION_SPAN)
        spike = explaining.composition(window(scope, start, spike_end), detection.baseline)
        reference = explaining.composition(window(scope, ref_start, ref_end), detection.baseline)
    return _assembled(FoundSpike(start, end, detection.metric, detection.observed, detection.baseline,
                                 detection.severity, model, []), spike, reference)  # fmt: skip


async def _assembled(found: FoundSpike, spike: Awaitable[Composition], reference: Awaitable[Composition]) -> FoundSpike:
    compositions = await spike, await reference
    causes = [_contribution(c, found.model) for c in attribute(*compositions, limit=CONTRIBUTORS)]
    return dataclasses.replace(found, causes=causes)


def _hits(rows: Sequence[ErrorRow]) -> dict[tuple[str, int, str | None], int]:
    return {(r.model, r.status_code, r.error_type): r.requests for r in rows}


def _contribution(c: Contribution, series_model: str | None) -> Cause:
    """A cause; in a model's own series every hit is that model's, so its rows name it."""
    return Cause(c.model or series_model, c.status_code, c.error_type, c.count, c.share)


def _cause(row: ErrorRow, share: float) -> Cause:
    return Cause(row.model, row.status_code, row.error_type, row.requests, share)
