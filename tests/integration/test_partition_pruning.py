"""A statement over a short range is planned against the partitions of its own days, not every day's.

Rolled-up hours that must be read raw (dirty, or cut by a zone's day) are joined to ``usage_events`` per hour; the
statements also bound that join by the rolled-up range, so that the planner leaves the other days' partitions out.
Without it, a 2-hour spike window's statement was planned against all of a month's partitions (3.5 ms of planning
for 3 ms of execution)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re

from sqlalchemy.ext.asyncio import AsyncEngine

from db.partitions import ensure_usage_partitions
from db.reliability import compositions_statement, errors_statement, series_statement, window
from db.usage import UsageQuery, driver_connection, usage_statement
from kernel.hours import floor_hour

NOW = dt.datetime.now(dt.UTC)
DAY = floor_hour(NOW).replace(hour=0) - dt.timedelta(days=3)
START, END = DAY + dt.timedelta(hours=10), DAY + dt.timedelta(hours=12)  # two hours of one day
PARTITION = re.compile(r"usage_events_p(\d{8})")


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
