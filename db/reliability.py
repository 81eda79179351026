"""Reliability aggregates: requests, errors and latency sketches per bucket and model; errors by status code and
error type; the composition of a window's slow requests.

The plan is usage's (db/usage.py: rollups for whole hours below the watermark that are neither dirty nor cut
by a bucket boundary, raw events for everything else, in one statement and so one snapshot): an error counts
as soon as its batch commits, and late events are exact at once. Rollup rows come from
``reliability_hourly_model`` and ``errors_hourly``, or from ``usage_hourly`` when a project or API key filter
needs its dimensions; MINUTE buckets from ``reliability_minute_model`` for the rolled-up hours it keeps (from
``rollup_state.minute_from`` on, read in the same snapshot), raw events before. Sketches are returned packed
(db/sketch.py's layout: bytes that the client reads with numpy
as they are, no parsing; migration 0008 stores them so in ``reliability_hourly_model.latency_sketch_packed``),
one per row, and merged by the caller (reliability/sketch.py): a bucket's rows are consecutive. A ``ranked`` HOUR
series per model reads instead each rolled-up row's stored percentile bucket indexes (migration 0012), and, for the
range's totals, daily merged sketches (``reliability_daily_model``) for its whole days.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy.ext.asyncio import AsyncConnection

from db.sketch import index_sql, packed_agg_sql, ranks_wire_sql
from db.usage import BUCKET_SQL, UsageQuery, driver_connection, plan


class SeriesColumns(NamedTuple):
    """The rows of :func:`series_rows` as columns (row i is entry i of each), ordered by bucket and model."""

    bucket: Sequence[int | None]  # the bucket's start in Unix seconds (bucket starts are whole seconds): an integer
    # is decoded and placed on the report's grid in C loops, a datetime in Python objects
    model: Sequence[str | None]  # None on raw-event rows of a series not split by model (``per_model=False``)
    requests: Sequence[int]
    errors: Sequence[int]
    client_errors: Sequence[int]
    sketch: Sequence[bytes | None]  # packed: (bucket index, count) entries, db/sketch.py; None where ``ranks`` is
    ranks: Sequence[bytes | None]  # a rollup row's RANKED_PERCENTILES bucket indexes (``ranked`` statements), as
    # db/sketch.py's ``ranks_wire_sql`` sends them
    totals: Sequence[bytes] = ()  # packed sketches that count toward the range's totals only (``totals``)

    @classmethod
    def of(cls, records: Sequence[Any]) -> SeriesColumns:
        """Columns of records in the statement's column order (one pass in C: a 30-day HOUR series has
        thousands); the rows for the totals only come last."""
        if not records:
            return cls((), (), (), (), (), (), ())
        *columns, total_only = zip(*records, strict=True)
        if not total_only[-1]:
            return cls(*columns)
        cut = total_only.index(True)
        bucket, model, requests, errors, client_errors, sketch, ranks = columns
        return cls(bucket[:cut], model[:cut], requests[:cut], errors[:cut], client_errors[:cut], sketch[:cut],
                   ranks[:cut], sketch[cut:])  # fmt: skip


class ErrorRow(NamedTuple):
    model: str
    status_code: int
    error_type: str | None
    requests: int


@dataclass(frozen=True)
class _Shape:
    granularity: str | None
    by_models: bool
    by_projects: bool
    by_api_keys: bool

    @classmethod
    def of(cls, query: UsageQuery) -> _Shape:
        return cls(query.granularity, query.models is not None, query.project_ids is not None,
                   query.api_key_ids is not None)  # fmt: skip

    @property
    def per_key(self) -> bool:
        """A project or API key filter: rollup rows must come from ``usage_hourly``, which has those columns."""
        return self.by_projects or self.by_api_keys

    @property
    def by_minute_rollup(self) -> bool:
        """MINUTE buckets from ``reliability_minute_model`` (no project or key columns: else raw events)."""
        return self.granularity == "MINUTE" and not self.per_key

    def filters(self, alias: str, first_param: int = 8) -> str:
        """The filter clauses, their lists being parameters ``first_param`` to ``first_param + 2``."""
        present = (("model", self.by_models), ("project_id", self.by_projects), ("api_key_id", self.by_api_keys))
        return " ".join(
            f"AND {alias}.{column} = ANY(${first_param + offset}::text[])"
            for offset, (column, given) in enumerate(present)
            if given
        )


# Parameters: $1 org_id, $2 start, $3 end, $4 rollup_from, $5 rollup_to, $6 split hours, $7 time zone,
# $8-$10 filters; then per statement: $11 minimum status (errors), $12 row limit / $11 latency threshold.
_COMMON = """
WITH params AS (
    SELECT $7::text AS time_zone, $8::text[] AS models, $9::text[] AS project_ids, $10::text[] AS api_key_ids
), raw_hours AS (
    SELECT hour FROM rollup_dirty d WHERE d.org_id = $1 AND d.hour >= $4 AND d.hour < $5
    UNION
    SELECT unnest($6::timestamptz[]){older_than_minutes}
), events AS (
    SELECT e.* FROM usage_events e
    WHERE e.org_id = $1 AND ((e.event_time >= $2 AND e.event_time < $4) OR (e.event_time >= $5 AND e.event_time < $3))
      {filters_e}
    UNION ALL
    SELECT e.* FROM raw_hours r
    -- One index range per raw hour: LATERAL, and OFFSET 0 so that the planner cannot flatten it into a join
    -- (which it did, scanning all of the org's events against an empty list of raw hours). Raw hours lie in
    -- [$4, $5): saying so lets the planner leave out the other days' partitions (a 2-hour window's statement
    -- was planned against every partition of the table, 3.5 of its 7 ms).
    CROSS JOIN LATERAL (
        SELECT * FROM usage_events e
        WHERE e.org_id = $1 AND e.event_time >= r.hour AND e.event_time < r.hour + interval '1 hour' {filters_e}
          AND e.event_time >= $4 AND e.event_time < $5
        OFFSET 0
    ) AS e
)"""

_SERIES = (
    _COMMON
    + """{whole_days}
SELECT date_part('epoch', bucket)::int8 AS bucket, model, requests, errors, client_errors, sketch, ranks, total_only
FROM (
SELECT {bucket_h} AS bucket, h.model, h.requests, {errors_h} AS errors, {client_h} AS client_errors,
       {sketch_h} AS sketch, {ranks_h} AS ranks, false AS total_only
FROM {rollup} h
WHERE h.org_id = $1 AND h.hour >= $4 AND h.hour < $5 {filters_h}
  AND NOT EXISTS (SELECT 1 FROM raw_hours r WHERE r.hour = h.hour)
UNION ALL
SELECT bucket, model, sum(n)::bigint, sum(e)::bigint, sum(c)::bigint, {packed_agg}, NULL::bytea, false
FROM ({raw_entries}) AS per_index
GROUP BY 1, 2{totals}
) AS rows
ORDER BY total_only, rows.bucket, model COLLATE "C"
"""
)

# Daily rollups (migration 0012) stand in for the hourly rows of each UTC day wholly in [$4, $5) with no hour read raw
# (``whole_days``); the hourly rows of the other days' part of [$4, $5) are read an index range per day
# (``_PARTIAL_DAYS``, ``h``: the rows of whole days are not read).
_WHOLE_DAYS = """, whole_days AS (
    SELECT d.day
    FROM generate_series(date_trunc('day', $4 + interval '23 hours', 'UTC'), $5 - interval '24 hours',
                         interval '24 hours') AS d(day)
    WHERE NOT EXISTS (SELECT 1 FROM raw_hours r WHERE r.hour >= d.day AND r.hour < d.day + interval '24 hours')
)"""
_PARTIAL_DAYS = """generate_series(date_trunc('day', $4, 'UTC'), $5 - interval '1 microsecond',
                         interval '24 hours') AS d(day)
    CROSS JOIN LATERAL (
        SELECT * FROM {table} h
        WHERE h.org_id = $1 AND h.hour >= greatest(d.day, $4) AND h.hour < least(d.day + interval '24 hours', $5)
          {where}
        OFFSET 0
    ) AS h
    WHERE NOT EXISTS (SELECT 1 FROM whole_days w WHERE w.day = d.day)
      AND NOT EXISTS (SELECT 1 FROM raw_hours r WHERE r.hour = h.hour)"""

# A ranked series' rollup rows carry no sketch: the range's totals need the sketches of its rolled-up hours, as rows
# after the series (``total_only``): whole days' merged sketches, the other hours' own.
_TOTALS = """
UNION ALL
SELECT NULL, NULL, 0, 0, 0, s.latency_sketch_packed, NULL, true
FROM reliability_daily_model s JOIN whole_days w ON s.day = w.day
WHERE s.org_id = $1 {filters_s}
UNION ALL
SELECT NULL, NULL, 0, 0, 0, h.latency_sketch_packed, NULL, true
FROM """ + _PARTIAL_DAYS.format(table="reliability_hourly_model", where="{filters_h}")

# Requests with status >= $11 by model, status code and error type: rollups where whole, raw events elsewhere.
_ERROR_HITS = """
    SELECT h.model, h.status_code, h.error_type, h.requests AS n
    FROM errors_hourly h
    WHERE h.org_id = $1 AND h.hour >= $4 AND h.hour < $5 AND h.status_code >= $11 {filters_h}
      AND NOT EXISTS (SELECT 1 FROM raw_hours r WHERE r.hour = h.hour)
    UNION ALL
    SELECT ev.model, ev.status_code, ev.error_type, 1 FROM events ev WHERE ev.status_code >= $11
"""

# The same from errors_daily for whole days (no project or API key filter: it has neither column).
_ERROR_HITS_BY_DAY = (
    """
    SELECT s.model, s.status_code, s.error_type, s.requests AS n
    FROM errors_daily s JOIN whole_days w ON s.day = w.day
    WHERE s.org_id = $1 AND s.status_code >= $11 {filters_s}
    UNION ALL
    SELECT h.model, h.status_code, h.error_type, h.requests
    FROM """
    + _PARTIAL_DAYS.format(table="errors_hourly", where="AND h.status_code >= $11 {filters_h}")
    + """
    UNION ALL
    SELECT ev.model, ev.status_code, ev.error_type, 1 FROM events ev WHERE ev.status_code >= $11
"""
)

_ERRORS = (
    _COMMON
    + """{whole_days}
SELECT model, status_code, error_type, sum(n)::bigint AS requests FROM ({hits}) AS rows
GROUP BY 1, 2, 3
ORDER BY requests DESC, model COLLATE "C", status_code, error_type COLLATE "C" NULLS FIRST
LIMIT $12
"""
)

# A window's composition, for a spike's attribution, in one statement (so one snapshot): its requests by model
# (rows with ``total``), and its hits by model, status code and error type: errors (status >= $11, rollups where
# whole, as the breakdown) or requests slower than $11 ms (raw events only: rollups keep no status code or error
# type per latency bucket; callers bound the window).
_COMPOSITION = (
    _COMMON
    + """
SELECT true AS total, model, NULL::smallint AS status_code, NULL::text AS error_type, sum(n)::bigint AS requests
FROM (
    SELECT h.model, h.requests AS n
    FROM {rollup} h
    WHERE h.org_id = $1 AND h.hour >= $4 AND h.hour < $5 {filters_h}
      AND NOT EXISTS (SELECT 1 FROM raw_hours r WHERE r.hour = h.hour)
    UNION ALL
    SELECT ev.model, 1 FROM events ev
) AS requests
GROUP BY model
UNION ALL
SELECT false, model, status_code, error_type, sum(n)::bigint FROM ({hits}) AS hits
GROUP BY 2, 3, 4
"""
)
_SLOW_HITS = """
    SELECT e.model, e.status_code, CASE WHEN e.status_code >= 400 THEN e.error_type END AS error_type, 1 AS n
    FROM usage_events e
    WHERE e.org_id = $1 AND e.event_time >= $2 AND e.event_time < $3 AND e.latency_ms > $11 {filters_e}
"""


# A raw-event bucket's sketch entries: per (bucket, model, index) with its count where buckets hold many events of
# one index (HOUR and longer), or one entry per event where they hold few (MINUTE: 59,000 events of a day in about
# 52,000 distinct (minute, index) pairs, so the extra grouping halved nothing and cost a hash aggregate that spilled
# to disk). The sketch reader adds up repeated indexes either way.
_ENTRIES_GROUPED = """
    SELECT {bucket_e} AS bucket, {model_e} AS model, {index} AS idx, count(*) AS n,
           count(*) FILTER (WHERE ev.status_code >= 500) AS e,
           count(*) FILTER (WHERE ev.status_code BETWEEN 400 AND 499) AS c
    FROM events ev GROUP BY 1, 2, 3
"""
_ENTRIES_PER_EVENT = """
    SELECT {bucket_e} AS bucket, {model_e} AS model, {index} AS idx, 1::bigint AS n,
           (ev.status_code >= 500)::int AS e, (ev.status_code BETWEEN 400 AND 499)::int AS c
    FROM events ev
"""

# Hours of the range before ``rollup_state.minute_from`` have no minute rows (the rollup keeps MINUTE_DAYS of them):
# raw events, read in the statement's own snapshot, so a concurrent prune cannot leave a hole.
_OLDER_THAN_MINUTES = """
    UNION
    SELECT generate_series($4, least(coalesce((SELECT minute_from FROM rollup_state), $5), $5) - interval '1 hour',
                           interval '1 hour')"""

# MINUTE and HOUR buckets are whole UTC minutes and hours: ``date_bin`` is plain arithmetic on the instant, the same
# bucket as BUCKET_SQL's ``date_trunc(..., 'UTC')`` (which converts every row to a zone first), about a third of
# the per-row cost of a 24-hour MINUTE scan.
_RAW_BUCKET = {
    "MINUTE": "date_bin('1 minute', ev.event_time, TIMESTAMPTZ '2000-01-01 00:00:00+00')",
    "HOUR": "date_bin('1 hour', ev.event_time, TIMESTAMPTZ '2000-01-01 00:00:00+00')",
}


def rankable(query: UsageQuery, *, per_model: bool) -> bool:
    """Whether :func:`series_rows` can be ``ranked``: HOUR buckets per model from ``reliability_hourly_model`` (one
    rolled-up row a bucket and model)."""
    shape = _Shape.of(query)
    return shape.granularity == "HOUR" and per_model and not shape.per_key


@functools.lru_cache(maxsize=64)
def _series_sql(shape: _Shape, per_model: bool, ranked: bool, totals: bool) -> str:
    bucket = BUCKET_SQL[shape.granularity] if shape.granularity else "NULL::timestamptz"
    per_key = shape.per_key
    entries = (_ENTRIES_PER_EVENT if shape.granularity == "MINUTE" else _ENTRIES_GROUPED).format(
        bucket_e=_RAW_BUCKET[shape.granularity]
        if shape.granularity in _RAW_BUCKET
        else bucket.replace("t,", "ev.event_time,"),
        model_e="ev.model" if per_model else "NULL::text",
        index=index_sql("ev.latency_ms"),
    )
    minutes = shape.by_minute_rollup
    return _SERIES.format(
        raw_entries=entries,
        older_than_minutes=_OLDER_THAN_MINUTES if minutes else "",
        filters_e=shape.filters("e"),
        filters_h=shape.filters("h"),
        rollup="usage_hourly" if per_key else "reliability_minute_model" if minutes else "reliability_hourly_model",
        errors_h="CASE WHEN h.status_class = 5 THEN h.requests ELSE 0 END" if per_key else "h.errors",
        client_h="CASE WHEN h.status_class = 4 THEN h.requests ELSE 0 END" if per_key else "h.client_errors",
        bucket_h="h.minute" if minutes
        else "h.hour" if shape.granularity == "HOUR"  # (an hourly row's hour is its bucket: no per-row date_trunc)
        else bucket.replace("t,", "h.hour,"),
        sketch_h="sketch_pack(h.latency_sketch)" if per_key
        else "CASE WHEN h.latency_ranks IS NULL THEN h.latency_sketch_packed END" if ranked
        else "h.latency_sketch_packed",
        ranks_h=ranks_wire_sql("h.latency_ranks") if ranked else "NULL::bytea",
        packed_agg=packed_agg_sql("idx", "n"),
        whole_days=_WHOLE_DAYS if totals else "",
        totals=_TOTALS.format(filters_s=shape.filters("s"), filters_h=shape.filters("h")) if totals else "",
    )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _errors_sql(shape: _Shape) -> str:
    by_day = not shape.per_key
    hits = (_ERROR_HITS_BY_DAY if by_day else _ERROR_HITS).format(filters_h=shape.filters("h"),
                                                                  filters_s=shape.filters("s"))  # fmt: skip
    return _ERRORS.format(hits=hits, filters_e=shape.filters("e"), filters_h=shape.filters("h"), older_than_minutes="",
                          whole_days=_WHOLE_DAYS if by_day else "")  # fmt: skip


@functools.lru_cache(maxsize=64)
def _composition_sql(shape: _Shape, slow: bool) -> str:
    hits = (_SLOW_HITS if slow else _ERROR_HITS).format(filters_e=shape.filters("e"), filters_h=shape.filters("h"))
    return _COMPOSITION.format(
        hits=hits, filters_e=shape.filters("e"), filters_h=shape.filters("h"), older_than_minutes="",
        rollup="usage_hourly" if shape.per_key else "reliability_hourly_model",
    )  # fmt: skip


def _args(query: UsageQuery, materialized_through: dt.datetime | None) -> tuple[object, ...]:
    assert query.org_id is not None
    # Minute rows cover whole rolled-up hours as hourly rows do: usage's plan for HOUR says which.
    hourly = _Shape.of(query).by_minute_rollup
    steps = plan(dataclasses.replace(query, granularity="HOUR") if hourly else query, materialized_through)
    return (
        query.org_id, query.start, query.end, steps.rollup_from, steps.rollup_to, steps.split_hours,
        query.time_zone, list(query.models or []), list(query.project_ids or []), list(query.api_key_ids or []),
    )  # fmt: skip


def series_statement(
    query: UsageQuery,
    materialized_through: dt.datetime | None,
    *,
    per_model: bool = True,
    ranked: bool = False,
    totals: bool = False,
) -> tuple[str, tuple[object, ...]]:
    """The SQL and arguments of :func:`series_rows` (benchmarks run it bare, as the floor)."""
    if ranked and not rankable(query, per_model=per_model):
        raise ValueError("ranked series are HOUR series per model without a project or API key filter")
    return _series_sql(_Shape.of(query), per_model, ranked, ranked and totals), _args(query, materialized_through)


def errors_statement(
    query: UsageQuery, materialized_through: dt.datetime | None, *, min_status: int = 500, limit: int | None = None
) -> tuple[str, tuple[object, ...]]:
    """The SQL and arguments of :func:`error_rows`."""
    return _errors_sql(_Shape.of(query)), (*_args(query, materialized_through), min_status, limit)


async def series_rows(
    connection: AsyncConnection,
    query: UsageQuery,
    materialized_through: dt.datetime | None,
    *,
    per_model: bool = True,
    ranked: bool = False,
    totals: bool = False,
) -> SeriesColumns:
    """Requests, errors, client errors and sketch rows by bucket (null when ``query.granularity`` is None)
    and model, ordered by bucket and model, as columns; several rows of one bucket and model are merged by the
    caller.

    ``per_model=False``: the caller merges a bucket's models anyway, so raw events are aggregated per bucket
    only (model None: fewer, larger rows); rollup rows stay per model.

    ``ranked`` (only where :func:`rankable`): rollup rows carry their RANKED_PERCENTILES bucket indexes (``ranks``)
    instead of a sketch; with ``totals``, the sketches of the range's rolled-up hours follow, for its totals
    (``SeriesColumns.totals``: a daily merge for each whole day rolled up)."""
    raw = await driver_connection(connection)
    sql, args = series_statement(query, materialized_through, per_model=per_model, ranked=ranked, totals=totals)
    return SeriesColumns.of(await raw.fetch(sql, *args))


async def error_rows(
    connection: AsyncConnection,
    query: UsageQuery,
    materialized_through: dt.datetime | None,
    *,
    min_status: int = 500,
    limit: int | None = None,
) -> list[ErrorRow]:
    """Requests with status >= ``min_status`` by model, status code and error type, largest first."""
    raw = await driver_connection(connection)
    sql, args = errors_statement(query, materialized_through, min_status=min_status, limit=limit)
    records = await raw.fetch(sql, *args)
    return [ErrorRow._make(record) for record in records]


COMPOSITION_PARAMS = 11  # parameters of one window's statement (_COMPOSITION)


class WindowComposition(NamedTuple):
    requests: dict[str, int]  # by model
    hits: list[ErrorRow]  # errors, or slow requests, by model, status code and error type


Window = tuple[UsageQuery, float | None]  # a window (``window``) and a latency threshold (ms), None for errors


async def compositions(
    connection: AsyncConnection, windows: Sequence[Window], materialized_through: dt.datetime | None
) -> list[WindowComposition]:
    """Each window's requests by model, and its errors (status >= 500) or, given a threshold, its requests slower
    than that (raw events: keep such windows short), by model, status code and error type; all windows in one
    statement (one snapshot, one round trip), in their order."""
    if not windows:
        return []
    sql, args, order = compositions_statement(windows, materialized_through)
    found = [WindowComposition({}, []) for _ in windows]
    raw = await driver_connection(connection)
    for position, total, model, status_code, error_type, count in await raw.fetch(sql, *args):
        window_ = found[order[position]]
        if total:
            window_.requests[model] = count
        else:
            window_.hits.append(ErrorRow(model, status_code, error_type, count))
    return found


def compositions_statement(
    windows: Sequence[Window], materialized_through: dt.datetime | None
) -> tuple[str, list[object], list[int]]:
    """The SQL and arguments of :func:`compositions` (windows given), and the window each position of its rows
    stands for."""
    order = sorted(range(len(windows)), key=lambda i: windows[i][1] is not None)  # errors, then slow: few SQL texts
    shapes = tuple((_Shape.of(windows[i][0]), windows[i][1] is not None) for i in order)
    args: list[object] = []
    for i in order:
        query, slower_than_ms = windows[i]
        args += [*_args(query, materialized_through), 500 if slower_than_ms is None else slower_than_ms]
    return _compositions_sql(shapes), args, order


_PARAMETER = re.compile(r"\$(\d+)")


def _renumbered(parameter: re.Match[str], offset: int) -> str:
    return f"${int(parameter.group(1)) + offset}"


@functools.lru_cache(maxsize=64)
def _compositions_sql(shapes: tuple[tuple[_Shape, bool], ...]) -> str:
    """The windows' statements side by side, each in its own subquery with its own parameters (COMPOSITION_PARAMS
    a window, numbered on), its rows tagged with its position."""
    parts = []
    for position, (shape, slow) in enumerate(shapes):
        sql = _PARAMETER.sub(functools.partial(_renumbered, offset=position * COMPOSITION_PARAMS),
                             _composition_sql(shape, slow))  # fmt: skip
        parts.append(f"SELECT {position} AS position, c.* FROM ({sql}) AS c")
    return "\nUNION ALL\n".join(parts)


def window(query: UsageQuery, start: dt.datetime, end: dt.datetime) -> UsageQuery:
    """The same filters over another range, unbucketed (for a spike's composition)."""
    return UsageQuery(
        org_id=query.org_id, start=start, end=end, granularity=None, time_zone="UTC", group_by=frozenset(),
        models=query.models, project_ids=query.project_ids, api_key_ids=query.api_key_ids,
    )  # fmt: skip


__all__: Sequence[str] = (
    "ErrorRow", "SeriesColumns", "Window", "WindowComposition", "compositions", "compositions_statement", "error_rows",
    "errors_statement", "rankable", "series_rows", "series_statement", "window",
)  # fmt: skip
