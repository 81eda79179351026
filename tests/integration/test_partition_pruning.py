"""A statement over a short range is planned against the partitions of its own days, not every day's.

Rolled-up hours that must be read raw (dirty, or cut by a zone's day) are joined to ``usage_events`` per hour; the
statements also bound that join by the rolled-up range, so that the planner leaves the other days' partitions out.
Without it, a 2-hour spike window's statement was planned against all of a month's partitions (3.5 ms of planning
for 3 ms of execution)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import zoneinfo
from collections import Counter

from opentelemetry.metrics import get_meter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from db.partitions import ensure_usage_partitions
from db.reliability import (
    compositions_statement,
    error_rows,
    errors_statement,
    series_rows,
    series_statement,
    window,
)
from db.rollup import run_cycle
from db.usage import UsageQuery, bucket_start, driver_connection, plan, usage_statement
from ingest.events import TimeWindow, UsageEvent, validate
from ingest.metrics import IngestMetrics
from ingest.writer import EventWriter
from kernel.hours import floor_hour

NOW = dt.datetime.now(dt.UTC)
DAY = floor_hour(NOW).replace(hour=0) - dt.timedelta(days=3)
START, END = DAY + dt.timedelta(hours=10), DAY + dt.timedelta(hours=12)  # two hours of one day
PARTITION = re.compile(r"usage_events_p(\d{8})")
HALF_HOUR = dt.timedelta(minutes=30)


async def _partitions_planned(engine: AsyncEngine, sql: str, args: list[object] | tuple[object, ...]) -> set[str]:
    async with engine.connect() as connection:
        raw = await driver_connection(connection)
        plan = "\n".join(row[0] for row in await raw.fetch("EXPLAIN " + sql, *args))
    assert "usage_events" in plan  # the raw hours' join and the edges are in the plan
    return set(PARTITION.findall(plan))


async def test_a_short_range_is_planned_against_its_own_days_partitions(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        made = await ensure_usage_partitions(connection, (NOW - dt.timedelta(days=20)).date(), NOW.date())
    assert len(made) == 21
    through = floor_hour(NOW)  # every hour of the range rolled up: the raw-hour join covers all of it
    query = window(UsageQuery(org_id="org_pruning", start=START, end=END, granularity=None, time_zone="UTC",
                              group_by=frozenset(), models=["m1"]), START, END)  # fmt: skip
    hourly = dataclasses.replace(query, granularity="HOUR")
    own_day = {DAY.strftime("%Y%m%d")}
    statements = {
        "usage": usage_statement(hourly, through),
        "series": series_statement(hourly, through),
        "breakdown": errors_statement(query, through, limit=10),
        "compositions": compositions_statement([(query, None), (query, 250.0)], through)[:2],
    }
    planned = {name: await _partitions_planned(engine, sql, args) for name, (sql, args) in statements.items()}
    assert planned == dict.fromkeys(statements, own_day)


async def test_the_bound_never_drops_a_raw_hour(engine: AsyncEngine) -> None:
    """An outsider's late events where the bound sits: in the first and the last rolled-up hour of a range and in
    an hour that a +05:30 day cuts. They are read raw (dirty or split hours) and counted at once, exactly, by the
    series and the breakdown."""
    org, zone = "org_pruning_late", zoneinfo.ZoneInfo("Asia/Kolkata")
    now = floor_hour(NOW)
    start, end = now - dt.timedelta(hours=50, minutes=-7), now  # off the hour grid at the start
    writer = EventWriter(engine, None, None, IngestMetrics(get_meter("test_partition_pruning")))
    await writer.write(_events(org, "base", [start + dt.timedelta(minutes=23 * i) for i in range(130)]), channel="http")
    assert (await run_cycle(engine, NOW)).ran
    query = UsageQuery(org_id=org, start=start, end=end, granularity="DAY", time_zone="Asia/Kolkata",
                       group_by=frozenset({"model"}))  # fmt: skip
    steps = plan(query, now)
    assert steps.split_hours  # a local midnight (18:30 UTC) inside the rolled-up range
    late_at = [steps.rollup_from, steps.rollup_to - dt.timedelta(minutes=1), steps.split_hours[0] + HALF_HOUR]
    await writer.write(_events(org, "late", [t + dt.timedelta(seconds=s) for t in late_at for s in (-1, 0, 1)]),
                       channel="http")  # fmt: skip
    async with engine.connect() as connection:
        assert await connection.scalar(text("SELECT count(*) FROM rollup_dirty WHERE org_id = :o"), {"o": org}) >= 2
        columns = await series_rows(connection, query, now)
        breakdown = await error_rows(connection, dataclasses.replace(query, granularity=None, time_zone="UTC"), now)
        events = (
            await connection.execute(
                text(
                    "SELECT event_time, model, status_code, error_type FROM usage_events "
                    "WHERE org_id = :o AND event_time >= :s AND event_time < :e"
                ),
                {"o": org, "s": start, "e": end},
            )
        ).all()
    served: Counter[tuple[dt.datetime, str]] = Counter()
    for bucket, model, requests in zip(columns.bucket, columns.model, columns.requests, strict=True):
        assert bucket is not None and model is not None
        served[(dt.datetime.fromtimestamp(bucket, dt.UTC), model)] += requests  # (Unix seconds)
    assert served == Counter((bucket_start(e.event_time, "DAY", zone), e.model) for e in events)
    errors = Counter((e.model, e.status_code, e.error_type) for e in events if e.status_code >= 500)
    assert errors and {(r.model, r.status_code, r.error_type): r.requests for r in breakdown} == errors


def _events(org: str, tag: str, times: list[dt.datetime]) -> list[UsageEvent]:
    window_ = TimeWindow.around(NOW, retention_days=30)
    return [validate({"specversion": "1.0", "id": f"{tag}-{i}", "source": "//partition/pruning",
                      "type": "ai.usage.request.v1", "time": t.isoformat(),
                      "data": {"org_id": org, "model": f"m{i % 2}", "input_tokens": 1, "output_tokens": 1,
                               "latency_ms": 100.0 + i, "status_code": 503 if i % 3 == 0 else 200,
                               **({"error_type": "overloaded"} if i % 3 == 0 else {})}},
                     window_) for i, t in enumerate(times)]  # fmt: skip
