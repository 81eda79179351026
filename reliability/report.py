"""The reliability report of one org and range: series, totals, breakdown and spikes with their causes.

Rows come from db/reliability.py (rollups where complete, raw events elsewhere). The packed sketches of all
buckets are merged per bucket and read in one batch (reliability/sketch.py ``Batch``), and once more all together
for the totals. Spike detection (reliability/spikes.py) runs on every
series over a contiguous grid of buckets that reaches ``lookback`` buckets before the range, so the first
buckets of the range have a baseline too; each spike found is explained (reliability/attribution.py) by the
composition of its window against its baseline's window.

Bounds: at most MAX_SPIKES spikes (the most severe, then the largest relative to their baseline) are reported
and explained; the slow-request composition of a latency spike reads raw events of at most COMPOSITION_SPAN
before and at its start; the breakdown has at most BREAKDOWN_ROWS rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import zoneinfo
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from db.reliability import ErrorRow, SeriesRow, error_rows, series_rows, slow_rows, window
from db.usage import UsageQuery, bucket_end, bucket_start
from kernel.hours import EARLIEST
from reliability import sketch as sketches
from reliability.attribution import Composition, Contribution, attribute
from reliability.spikes import Columns, Detection, Metric, Severity, detect, lookback

SEASON = {"MINUTE": None, "HOUR": 24, "DAY": 7, "MONTH": None}
DETECTION_PERCENTILES = (0.95, 0.99)
BREAKDOWN_ROWS = 50
MAX_SPIKES = 20
CONTRIBUTORS = 5
# The slow requests of a latency spike, and of its reference, come from raw events: at most this much of each
# (24 h cost the largest org's reference 35 ms; attribution quality: docs/reliability.md, bench.detection_quality).
COMPOSITION_SPAN = dt.timedelta(hours=6)
SPLIT_BUCKETS = 240  # a longer series is read in SERIES_PARTS parts at once
SERIES_PARTS = 2

_T = TypeVar("_T")


@dataclass
class Bucket:
    start: dt.datetime
    end: dt.datetime
    model: str | None
    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    latency: list[float] = field(default_factory=list)  # the requested percentiles, in their order
    detection: tuple[float, float] | None = None  # p95 and p99 (ms), for spike detection; None with no requests


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
    series: list[Bucket]
    spikes: list[FoundSpike]
    breakdown: list[Cause]


def error_rate(errors: int, requests: int) -> float:
    return errors / requests if requests else 0.0


Connect = Callable[[], AbstractAsyncContextManager[AsyncConnection]]


async def build_report(
    connect: Connect,
    query: UsageQuery,
    percentiles: Sequence[float],
    materialized_through: dt.datetime | None,
) -> Report:
    """``query.group_by`` is ``{"model"}`` for one series per model, empty for one overall series.

    ``connect`` opens a connection (``engine.connect``): the range's series (in two parts when it is long), its
    history and the breakdown are independent statements, run at once on their own connections (each reads the
    rollups and raw events in its own snapshot, as they did one after the other; every event is in exactly one
    of them, so none counts twice)."""
    assert query.granularity is not None
    by_model = "model" in query.group_by
    zone = zoneinfo.ZoneInfo(query.time_zone)
    grid = _grid(query, zone)
    history = _history(grid[0], query.granularity, zone, lookback(SEASON[query.granularity]))
    earlier = dataclasses.replace(query, start=history[0], end=grid[0]) if history else None
    # The breakdown is not bucketed: whole hours come from errors_hourly whatever the granularity (a MINUTE
    # report's breakdown read every raw event of its day again).
    unbucketed = dataclasses.replace(query, granularity=None, time_zone="UTC")
    parts = _parts(query, grid)
    series_parts, history_rows, breakdown = await asyncio.gather(
        asyncio.gather(
            *(_with(connect, series_rows, part, materialized_through, per_model=by_model) for part in parts)
        ),
        _with(connect, series_rows, earlier, materialized_through, per_model=by_model) if earlier else _no_rows(),
        _with(connect, error_rows, unbucketed, materialized_through, limit=BREAKDOWN_ROWS),
    )
    rows = [row for part in series_parts for row in part]  # the parts are consecutive ranges, each ordered
    series = _buckets(rows, by_model, query.granularity, zone)
    past = _buckets(history_rows, by_model, query.granularity, zone)
    _read_latency(series, percentiles)
    _read_latency(past, percentiles)
    totals = _totals(series, percentiles)

    spikes = _detect(history + grid, len(history), past.buckets + series.buckets, by_model, SEASON[query.granularity])
    spikes.sort(key=lambda s: (s[1].severity != Severity.CRITICAL, -_relative(s[1])))
    found: list[FoundSpike] = []
    if spikes:
        async with connect() as connection:
            found = [
                await _explain(connection, query, materialized_through, history + grid, model, detection, zone)
                for model, detection in spikes[:MAX_SPIKES]
            ]
    found.sort(key=lambda s: (s.start, s.metric, s.model or ""))
    total_errors = sum(r.requests for r in breakdown) or 1
    return Report(totals, series.buckets, found, [_cause(r, r.requests / total_errors) for r in breakdown])


async def _with(connect: Connect, fetch: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
    async with connect() as connection:
        return await fetch(connection, *args, **kwargs)


async def _no_rows() -> list[SeriesRow]:
    return []


def _parts(query: UsageQuery, grid: Sequence[dt.datetime]) -> list[UsageQuery]:
    """The range in SERIES_PARTS consecutive parts split at bucket starts (each bucket in one part), when it has
    more than SPLIT_BUCKETS buckets: the parts are read at once, on their own connections (a 30-day HOUR series
    moves 5 MB of sketches, most of its statement's time)."""
    if len(grid) <= SPLIT_BUCKETS:
        return [query]
    cuts = [grid[len(grid) * i // SERIES_PARTS] for i in range(1, SERIES_PARTS)]
    bounds = [query.start, *cuts, query.end]
    return [dataclasses.replace(query, start=a, end=b) for a, b in itertools.pairwise(bounds)]


def _grid(query: UsageQuery, zone: zoneinfo.ZoneInfo) -> list[dt.datetime]:
    """Bucket starts from the one holding ``query.start`` to the last before ``query.end``."""
    assert query.granularity is not None
    starts = [bucket_start(query.start, query.granularity, zone)]
    while (following := bucket_end(starts[-1], query.granularity, zone)) < query.end:
        starts.append(following)
    return starts


def _history(first: dt.datetime, granularity: str, zone: zoneinfo.ZoneInfo, count: int) -> list[dt.datetime]:
    """Up to ``count`` bucket starts before ``first``, oldest first."""
    starts: list[dt.datetime] = []
    current = first
    for _ in range(count):
        if current - dt.timedelta(days=32) < EARLIEST:
            break
        current = bucket_start(current - dt.timedelta(microseconds=1), granularity, zone)
        starts.append(current)
    return starts[::-1]


class Collected(NamedTuple):
    """A series' buckets and their packed sketches, each tagged with its bucket's position."""

    buckets: list[Bucket]
    batch: sketches.Batch


def _buckets(rows: Sequence[SeriesRow], by_model: bool, granularity: str, zone: zoneinfo.ZoneInfo) -> Collected:
    """One bucket per start (and model), rows added up; ordered by start, then model. Rows come ordered by bucket
    and model, so the rows of one bucket (and model) are consecutive."""
    buckets: list[Bucket] = []
    group_of: list[int] = []
    current: Bucket | None = None
    end = start = None
    for row in rows:
        assert row.bucket is not None
        model = row.model if by_model else None
        if current is None or current.start != row.bucket or current.model != model:
            if row.bucket != start:  # the models of one bucket share its end
                start, end = row.bucket, bucket_end(row.bucket, granularity, zone)
            assert end is not None
            current = Bucket(row.bucket, end, model)
            buckets.append(current)
        group_of.append(len(buckets) - 1)
        current.requests += row.requests
        current.errors += row.errors
        current.client_errors += row.client_errors
    return Collected(buckets, sketches.Batch([row.sketch for row in rows], group_of, len(buckets)))


def _read_latency(collected: Collected, wanted: Sequence[float]) -> None:
    """Each bucket's requested percentiles and its p95 and p99 for detection, from its merged sketches."""
    count = len(wanted)
    for bucket, values in zip(collected.buckets, collected.batch.quantiles([*wanted, *DETECTION_PERCENTILES]),
                              strict=True):  # fmt: skip
        if values:
            bucket.latency, bucket.detection = values[:count], (values[count], values[count + 1])


def _totals(series: Collected, percentiles: Sequence[float]) -> Totals:
    buckets = series.buckets
    return Totals(
        requests=sum(b.requests for b in buckets),
        errors=sum(b.errors for b in buckets),
        client_errors=sum(b.client_errors for b in buckets),
        latency=series.batch.merged_quantiles(percentiles) or [],
    )


def _detect(
    starts: Sequence[dt.datetime], evaluate_from: int, buckets: Sequence[Bucket], by_model: bool, season: int | None
) -> list[tuple[str | None, Detection]]:
    """Each model's (or the one) series as columns over the whole grid (no traffic: 0 requests, no latency)."""
    position = {start: index for index, start in enumerate(starts)}
    size = len(starts)
    requests: dict[str | None, list[int]] = {}
    errors: dict[str | None, list[int]] = {}
    p95: dict[str | None, list[float | None]] = {}
    p99: dict[str | None, list[float | None]] = {}
    last_start, index = None, -1
    for bucket in buckets:
        model = bucket.model
        if model not in requests:
            requests[model], errors[model], p95[model], p99[model] = (
                [0] * size,
                [0] * size,
                [None] * size,
                [None] * size,
            )
        if bucket.start != last_start:  # the models of one bucket share its position
            last_start, index = bucket.start, position.get(bucket.start, -1)
        if index < 0:  # pragma: no cover - every bucket start is on the grid
            continue
        requests[model][index] = bucket.requests
        errors[model][index] = bucket.errors
        if bucket.detection is not None:
            p95[model][index], p99[model][index] = bucket.detection
    series = {model: Columns(requests[model], errors[model], p95[model], p99[model]) for model in requests}
    found: list[tuple[str | None, Detection]] = []
    for model, columns in sorted(series.items(), key=lambda item: item[0] or ""):
        found += [(model if by_model else None, d) for d in detect(columns, evaluate_from, season)]
    return found


def _relative(detection: Detection) -> float:
    return detection.observed / detection.baseline if detection.baseline > 0 else float("inf")


async def _explain(
    connection: AsyncConnection,
    query: UsageQuery,
    materialized_through: dt.datetime | None,
    starts: Sequence[dt.datetime],
    model: str | None,
    detection: Detection,
    zone: zoneinfo.ZoneInfo,
) -> FoundSpike:
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
        spike = await _errors(connection, window(scope, start, end), materialized_through)
        reference = await _errors(connection, window(scope, ref_start, ref_end), materialized_through)
    else:
        spike_end = min(end, start + COMPOSITION_SPAN)
        ref_start = max(ref_start, ref_end - COMPOSITION_SPAN)
        spike = await _slow(connection, window(scope, start, spike_end), detection.baseline, materialized_through)
        reference = await _slow(connection, window(scope, ref_start, ref_end), detection.baseline, materialized_through)
    causes = [_contribution(c, model) for c in attribute(spike, reference, limit=CONTRIBUTORS)]
    return FoundSpike(
        start, end, detection.metric, detection.observed, detection.baseline, detection.severity, model, causes
    )


async def _requests_by_model(
    connection: AsyncConnection, scope: UsageQuery, materialized_through: dt.datetime | None
) -> dict[str, int]:
    if scope.start >= scope.end:
        return {}
    totals: dict[str, int] = {}
    for row in await series_rows(connection, scope, materialized_through):  # per model: every row names one
        assert row.model is not None
        totals[row.model] = totals.get(row.model, 0) + row.requests
    return totals


async def _errors(
    connection: AsyncConnection, scope: UsageQuery, materialized_through: dt.datetime | None
) -> Composition:
    if scope.start >= scope.end:
        return Composition(requests={}, hits={})
    rows = await error_rows(connection, scope, materialized_through)
    return Composition(requests=await _requests_by_model(connection, scope, materialized_through), hits=_hits(rows))


async def _slow(
    connection: AsyncConnection, scope: UsageQuery, threshold_ms: float, materialized_through: dt.datetime | None
) -> Composition:
    if scope.start >= scope.end:
        return Composition(requests={}, hits={})
    rows = await slow_rows(connection, scope, threshold_ms)
    return Composition(requests=await _requests_by_model(connection, scope, materialized_through), hits=_hits(rows))


def _hits(rows: Sequence[ErrorRow]) -> dict[tuple[str, int, str | None], int]:
    return {(r.model, r.status_code, r.error_type): r.requests for r in rows}


def _contribution(c: Contribution, series_model: str | None) -> Cause:
    """A cause; in a model's own series every hit is that model's, so its rows name it."""
    return Cause(c.model or series_model, c.status_code, c.error_type, c.count, c.share)


def _cause(row: ErrorRow, share: float) -> Cause:
    return Cause(row.model, row.status_code, row.error_type, row.requests, share)
