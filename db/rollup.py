"""The rollup worker's database side: hourly rollups that stay exact.

Two watermarks live in ``rollup_state`` (see migration 0003):

- D, ``dirty_before``: ingest transactions (holding the watermark lock shared)
  mark the (org, hour) of every new event before D in ``rollup_dirty``;
- M, ``materialized_through``: rollups are complete before M, except dirty
  hours, which queries read from raw events until they are re-rolled.

A cycle (one process at a time, under an advisory lock):

1. re-roll dirty hours: claim marks (``DELETE … RETURNING``), recompute those
   hours from raw events, in one transaction;
2. advance: move D to the current hour under the exclusive watermark lock (so
   every write either committed before, or sees the new D and marks its late
   events), then roll [M, D) a day at a time, moving M with each day.

The daily tables (``reliability_daily_model``, ``errors_daily``) follow their
hourly tables by themselves: triggers rewrite the days each statement touches,
in its transaction (migration 0012).

Re-rolling recomputes whole hours, so it is idempotent; a writer that marks an
hour while it is being re-rolled waits for that transaction (the mark is an
upsert) and the hour is re-rolled again.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from db.locks import ROLLUP_WORKER_LOCK_KEY, WATERMARK_LOCK_KEY
from db.sketch import index_sql, packed_agg_sql

CHUNK = dt.timedelta(days=1)
DIRTY_CLAIM = 500

# One ``INSERT … SELECT … GROUP BY org_id, …`` per hourly table, each reading raw events on its own: on a database
# distributed by org_id (docs/scaling.md) each runs on every shard in parallel, where a CTE shared by several
# INSERTs would be planned on the coordinator. ``usage_hourly`` (per project, key and status class),
# ``reliability_hourly_model`` (per model: errors and the merged latency sketch), ``errors_hourly`` (status >= 400
# per status code and error type); ``usage_hourly_model`` follows from ``usage_hourly``. Each takes ``{join}``
# (joined to ``usage_events e``) and ``{where}`` (which events).
_HOUR = "date_trunc('hour', e.event_time, 'UTC')"
_USAGE = f"""
INSERT INTO usage_hourly (org_id, hour, model, project_id, api_key_id, status_class, requests, input_tokens,
                          cached_input_tokens, output_tokens, latency_sum_ms, latency_sketch)
SELECT org_id, hour, model, project_id, api_key_id, status_class, sum(n), sum(i), sum(c), sum(o), sum(l),
       jsonb_object_agg(idx::text, n)
FROM (
    SELECT e.org_id, {_HOUR} AS hour, e.model, e.project_id, e.api_key_id,
           (e.status_code / 100)::smallint AS status_class, {index_sql("e.latency_ms")} AS idx, count(*) AS n,
           sum(e.input_tokens) AS i, sum(e.cached_input_tokens) AS c, sum(e.output_tokens) AS o,
           sum(e.latency_ms) AS l
    FROM usage_events e {{join}}
    WHERE {{where}}
    GROUP BY 1, 2, 3, 4, 5, 6, 7
) AS per_bucket
GROUP BY 1, 2, 3, 4, 5, 6
"""
_ERRORS = f"""
INSERT INTO errors_hourly (org_id, hour, model, project_id, api_key_id, status_code, error_type, requests)
SELECT e.org_id, {_HOUR}, e.model, e.project_id, e.api_key_id, e.status_code, e.error_type, count(*)
FROM usage_events e {{join}}
WHERE {{where}} AND e.status_code >= 400
GROUP BY 1, 2, 3, 4, 5, 6, 7
"""


def _per_index(bucket: str) -> str:
    """Events per org, ``bucket`` and model and latency bucket index: counts, errors (status >= 500) and client
    errors (400-499), the rows that the reliability tables' sketches are aggregated from."""
    return f"""(
    SELECT e.org_id, {bucket} AS bucket, e.model, {index_sql("e.latency_ms")} AS idx, count(*) AS n,
           count(*) FILTER (WHERE e.status_code >= 500) AS server,
           count(*) FILTER (WHERE e.status_code BETWEEN 400 AND 499) AS client
    FROM usage_events e {{join}}
    WHERE {{where}}
    GROUP BY 1, 2, 3, 4
) AS per_index"""


_RELIABILITY = f"""
INSERT INTO reliability_hourly_model (org_id, hour, model, requests, errors, client_errors, latency_sketch)
SELECT org_id, bucket, model, sum(n), sum(server), sum(client), jsonb_object_agg(idx::text, n)
FROM {_per_index(_HOUR)}
GROUP BY 1, 2, 3
"""
# Per minute and model for MINUTE reliability reports (migration 0010), kept MINUTE_DAYS: rows for rolled-up
# hours from ``rollup_state.minute_from`` on, sketches packed as the API reads them (db/sketch.py).
_MINUTES = f"""
INSERT INTO reliability_minute_model (org_id, hour, minute, model, requests, errors, client_errors,
                                      latency_sketch_packed)
SELECT org_id, date_trunc('hour', bucket, 'UTC'), bucket, model, sum(n), sum(server), sum(client),
       {packed_agg_sql("idx", "n", ordered=True)}
FROM {_per_index("date_bin('1 minute', e.event_time, TIMESTAMPTZ '2000-01-01 00:00:00+00')")}
GROUP BY 1, 2, 3, 4
"""
MINUTE_DAYS = 7
HOURLY_TABLES = (
    "usage_hourly", "usage_hourly_model", "reliability_hourly_model", "errors_hourly", "reliability_minute_model",
)  # fmt: skip

_RANGE = {"join": "", "where": "e.event_time >= :start AND e.event_time < :end"}
_HOURS = {
    "join": "JOIN unnest(CAST(:orgs AS text[]), CAST(:hours AS timestamptz[])) AS d(org_id, hour) "
    "ON e.org_id = d.org_id",
    "where": "e.event_time >= d.hour AND e.event_time < d.hour + interval '1 hour'",
}
ROLL_RANGE = tuple(sql.format(**_RANGE) for sql in (_USAGE, _RELIABILITY, _ERRORS))
ROLL_HOURS = tuple(sql.format(**_HOURS) for sql in (_USAGE, _RELIABILITY, _ERRORS))
# Minute rows: in a range, from :minute_start (the retention's first hour) on; dirty hours from minute_from on.
MINUTES_RANGE = _MINUTES.format(join="", where="e.event_time >= :minute_start AND e.event_time < :end")
MINUTES_HOURS = _MINUTES.format(
    join=_HOURS["join"],
    where=_HOURS["where"] + " AND d.hour >= (SELECT minute_from FROM rollup_state)",
)
PRUNE_MINUTES = (
    "UPDATE rollup_state SET minute_from = :horizon WHERE minute_from < :horizon",
    "DELETE FROM reliability_minute_model WHERE hour < :horizon",
)
_BY_MODEL = """
INSERT INTO usage_hourly_model
SELECT h.org_id, h.hour, h.model, sum(h.requests), sum(h.input_tokens), sum(h.cached_input_tokens),
       sum(h.output_tokens)
FROM usage_hourly h {source}
GROUP BY 1, 2, 3
"""
BY_MODEL_RANGE = _BY_MODEL.format(source="WHERE h.hour >= :start AND h.hour < :end")
BY_MODEL_HOURS = _BY_MODEL.format(
    source="JOIN unnest(CAST(:orgs AS text[]), CAST(:hours AS timestamptz[])) AS d(org_id, hour) "
    "ON h.org_id = d.org_id AND h.hour = d.hour"
)
DELETE_HOURS = (
    "DELETE FROM {table} h USING unnest(CAST(:orgs AS text[]), CAST(:hours AS timestamptz[])) AS d(org_id, hour) "
    "WHERE h.org_id = d.org_id AND h.hour = d.hour"
)
CLAIM_DIRTY = """
DELETE FROM rollup_dirty WHERE (org_id, hour) IN (
    SELECT org_id, hour FROM rollup_dirty ORDER BY hour, org_id LIMIT :limit FOR UPDATE SKIP LOCKED
) RETURNING org_id, hour
"""


@dataclass(frozen=True)
class Watermarks:
    materialized_through: dt.datetime | None
    dirty_before: dt.datetime | None


@dataclass(frozen=True)
class CycleResult:
    ran: bool
    rerolled_hours: int = 0
    rolled_until: dt.datetime | None = None


def floor_hour(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


async def watermarks(connection: AsyncConnection) -> Watermarks:
    row = (await connection.execute(text("SELECT materialized_through, dirty_before FROM rollup_state"))).one()
    return Watermarks(row.materialized_through, row.dirty_before)


async def run_cycle(engine: AsyncEngine, now: dt.datetime) -> CycleResult:
    """One cycle, unless another process is running one (then ``ran`` is False)."""
    async with engine.connect() as connection:
        locked = await connection.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": ROLLUP_WORKER_LOCK_KEY})
        await connection.commit()
        if not locked:
            return CycleResult(ran=False)
        try:
            rerolled = await reroll_dirty(connection)
            rolled_until = await advance(connection, floor_hour(now))
            await prune_minutes(connection, floor_hour(now) - dt.timedelta(days=MINUTE_DAYS))
        finally:
            await connection.rollback()
            await connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ROLLUP_WORKER_LOCK_KEY})
            await connection.commit()
    return CycleResult(ran=True, rerolled_hours=rerolled, rolled_until=rolled_until)


async def reroll_dirty(connection: AsyncConnection) -> int:
    """Recompute every dirty hour below M; drop marks at or above M (not rolled yet)."""
    total = 0
    while True:
        # Lock order: usage_events before the marks. A writer creating a partition holds usage_events exclusively
        # and then marks hours; claiming marks first and reading events second would deadlock with it.
        await connection.execute(text("LOCK TABLE usage_events IN ACCESS SHARE MODE"))
        claimed = (await connection.execute(text(CLAIM_DIRTY), {"limit": DIRTY_CLAIM})).all()
        if not claimed:
            await connection.commit()
            return total
        through = (await watermarks(connection)).materialized_through
        pairs = [(r.org_id, r.hour) for r in claimed if through is not None and r.hour < through]
        if pairs:
            params = {"orgs": [p[0] for p in pairs], "hours": [p[1] for p in pairs]}
            for table in HOURLY_TABLES:
                await connection.execute(text(DELETE_HOURS.format(table=table)), params)
            for statement in (*ROLL_HOURS, MINUTES_HOURS):
                await connection.execute(text(statement), params)
            await connection.execute(text(BY_MODEL_HOURS), params)
        await connection.commit()
        total += len(pairs)


async def advance(connection: AsyncConnection, target: dt.datetime) -> dt.datetime | None:
    """Move D to ``target`` and roll [M, D) a day at a time; returns the new M."""
    marks = await watermarks(connection)
    await connection.commit()
    if marks.dirty_before is None or marks.dirty_before < target:
        await connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": WATERMARK_LOCK_KEY})
        await connection.execute(text("UPDATE rollup_state SET dirty_before = :d, updated_at = now()"), {"d": target})
        await connection.commit()
    start = marks.materialized_through or await _first_hour(connection)
    if start is None:  # nothing ingested yet: everything before target is (trivially) rolled
        await _set_materialized(connection, target)
        return target
    horizon = target - dt.timedelta(days=MINUTE_DAYS)  # minute rows are kept for hours from here on
    while start < target:
        end = min(start + CHUNK, target)
        span = {"start": start, "end": end}
        for table in HOURLY_TABLES:
            await connection.execute(text(f"DELETE FROM {table} WHERE hour >= :start AND hour < :end"), span)
        for statement in ROLL_RANGE:
            await connection.execute(text(statement), span)
        await connection.execute(text(BY_MODEL_RANGE), span)
        if end > horizon:
            minute_start = max(start, horizon)
            await connection.execute(text(MINUTES_RANGE), {"minute_start": minute_start, "end": end})
            # The first minute rows of a new database (else M, from which the range starts, is >= minute_from).
            await connection.execute(
                text("UPDATE rollup_state SET minute_from = :m WHERE minute_from IS NULL"), {"m": minute_start}
            )
        await _set_materialized(connection, end)
        start = end
    return start


async def prune_minutes(connection: AsyncConnection, horizon: dt.datetime) -> None:
    """Minute rows of hours before ``horizon`` are deleted and ``minute_from`` moved past them, in one transaction
    (a report reads ``minute_from`` in its snapshot and takes older hours from raw events)."""
    for statement in PRUNE_MINUTES:
        await connection.execute(text(statement), {"horizon": horizon})
    await connection.commit()


async def _first_hour(connection: AsyncConnection) -> dt.datetime | None:
    first = await connection.scalar(text("SELECT min(min_event_time) FROM ingestion_batches"))
    await connection.commit()
    return floor_hour(first) if first is not None else None


async def _set_materialized(connection: AsyncConnection, through: dt.datetime) -> None:
    await connection.execute(
        text("UPDATE rollup_state SET materialized_through = :m, updated_at = now()"), {"m": through}
    )
    await connection.commit()
