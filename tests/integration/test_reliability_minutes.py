"""MINUTE reliability series from ``reliability_minute_model`` stay exact: against the raw events, with late events
in rolled-up hours (dirty: raw until re-rolled) and after the rollup deletes minute rows past its retention
(``minute_from`` moves in the same transaction; older hours come from raw events)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from opentelemetry.metrics import get_meter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from db.engine import create_engine
from db.reliability import series_rows
from db.rollup import MINUTE_DAYS, floor_hour, run_cycle, watermarks
from db.sketch import index_sql
from db.usage import UsageQuery
from ingest.events import TimeWindow, UsageEvent, validate
from ingest.metrics import IngestMetrics
from ingest.writer import EventWriter
from reliability.sketch import PACKED

NOW = dt.datetime.now(dt.UTC)
START = floor_hour(NOW) - dt.timedelta(hours=5)
ORG = "org_minutes"
TRUTH = f"""
SELECT date_trunc('minute', event_time, 'UTC') AS minute, model, project_id, status_code,
       {index_sql("latency_ms")} AS idx
FROM usage_events WHERE org_id = :org AND event_time >= :start AND event_time < :end
"""


@pytest.fixture
async def own_engine(migrated_database: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(migrated_database, pool_size=4)
    yield engine
    await engine.dispose()


def _events(rng: random.Random, tag: str, count: int, start: dt.datetime, end: dt.datetime) -> list[UsageEvent]:
    window = TimeWindow.around(NOW, retention_days=30)
    span = int((end - start).total_seconds())
    return [
        validate(
            {"specversion": "1.0", "id": f"{tag}-{i}", "source": "//reliability/minutes", "type": "ai.usage.request.v1",
             "time": (start + dt.timedelta(seconds=rng.randrange(span))).isoformat(),
             "data": {"org_id": rng.choice((ORG, "org_other")), "model": f"m{rng.randint(0, 2)}", "input_tokens": 1,
                      "output_tokens": 1, "latency_ms": rng.lognormvariate(5, 1.5),
                      "project_id": rng.choice(("p1", "p2")),
                      "status_code": rng.choice((200, 200, 200, 404, 429, 500, 503))}},
            window,
        )
        for i in range(count)
    ]  # fmt: skip


def _query(start: dt.datetime, end: dt.datetime) -> UsageQuery:
    return UsageQuery(org_id=ORG, start=start, end=end, granularity="MINUTE", time_zone="UTC",
                      group_by=frozenset({"model"}))  # fmt: skip


async def _served(engine: AsyncEngine, query: UsageQuery, per_model: bool) -> dict[tuple[Any, ...], list[Any]]:
    """(minute, model) -> [requests, errors, client errors, sketch counts], rows of a bucket merged."""
    out: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, 0, 0, Counter()])
    async with engine.connect() as connection:
        through = (await watermarks(connection)).materialized_through
        rows = await series_rows(connection, query, through, per_model=per_model)
    for minute, model, requests, errors, client_errors, sketch in zip(*rows[:6], strict=True):
        bucket = out[(dt.datetime.fromtimestamp(minute, dt.UTC), model if per_model else None)]  # (Unix seconds)
        bucket[0] += requests
        bucket[1] += errors
        bucket[2] += client_errors
        entries = np.frombuffer(sketch, dtype=PACKED)
        for index, count in zip(entries["index"].tolist(), entries["count"].tolist(), strict=True):
            bucket[3][index] += count
    return dict(out)


async def _truth(engine: AsyncEngine, query: UsageQuery, per_model: bool) -> dict[tuple[Any, ...], list[Any]]:
    out: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, 0, 0, Counter()])
    async with engine.connect() as connection:
        events = (await connection.execute(text(TRUTH), {"org": ORG, "start": query.start, "end": query.end})).all()
    for e in events:
        if (query.models is not None and e.model not in query.models) or (
            query.project_ids is not None and e.project_id not in query.project_ids
        ):
            continue
        bucket = out[(e.minute, e.model if per_model else None)]
        bucket[0] += 1
        bucket[1] += e.status_code >= 500
        bucket[2] += 400 <= e.status_code <= 499
        bucket[3][e.idx] += 1
    return dict(out)


async def _check(engine: AsyncEngine, query: UsageQuery) -> None:
    for per_model in (True, False):
        served, truth = await _served(engine, query, per_model), await _truth(engine, query, per_model)
        assert truth and served == truth


async def _minute_rows(engine: AsyncEngine) -> tuple[int, dt.datetime | None]:
    async with engine.connect() as connection:
        count = await connection.scalar(text("SELECT count(*) FROM reliability_minute_model WHERE org_id = :o"),
                                        {"o": ORG})  # fmt: skip
        minute_from = await connection.scalar(text("SELECT minute_from FROM rollup_state"))
    return int(count), minute_from


async def _shift(engine: AsyncEngine, hour: dt.datetime, requests: int) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE reliability_minute_model SET requests = requests + :n WHERE org_id = :o AND hour = :h"),
            {"n": requests, "o": ORG, "h": hour},
        )


async def test_minute_series_is_exact_through_late_events_and_pruning(own_engine: AsyncEngine) -> None:
    rng = random.Random(7)  # noqa: S311 - test data
    writer = EventWriter(own_engine, None, None, IngestMetrics(get_meter("test_reliability_minutes")))
    await writer.write(_events(rng, "a", 3000, START, NOW), channel="http")
    assert (await run_cycle(own_engine, NOW)).ran
    rows, minute_from = await _minute_rows(own_engine)
    assert rows > 0 and minute_from == START
    # Off the minute grid at both ends; the hours before the current one come from minute rows.
    query = _query(START + dt.timedelta(minutes=17, seconds=5), NOW + dt.timedelta(minutes=1))
    await _check(own_engine, query)
    # Filtered: by model (still minute rows), by project (raw events: minute rows have no project).
    await _check(own_engine, dataclasses.replace(query, models=["m1", "m2"]))
    await _check(own_engine, dataclasses.replace(query, project_ids=["p2"]))
    await _check(own_engine, dataclasses.replace(query, models=["m0"], project_ids=["p1", "p2"]))

    # The minute rows are what the query reads: change one hour's and the answer changes by as much.
    hour = START + dt.timedelta(hours=1)
    await _shift(own_engine, hour, 1000)
    served, truth = await _served(own_engine, query, True), await _truth(own_engine, query, True)
    shifted = {key for key in served if floor_hour(key[0]) == hour}
    assert shifted and {k: v[0] - 1000 * (k in shifted) for k, v in served.items()} == {
        k: v[0] for k, v in truth.items()
    }
    await _shift(own_engine, hour, -1000)

    # Late events in rolled-up hours: exact at once (the dirty hours are read raw), and after the re-roll.
    await writer.write(_events(rng, "late", 400, START, floor_hour(NOW)), channel="amqp")
    async with own_engine.connect() as connection:
        assert await connection.scalar(text("SELECT count(*) FROM rollup_dirty WHERE org_id = :o"), {"o": ORG})
    await _check(own_engine, query)
    assert (await run_cycle(own_engine, NOW)).rerolled_hours > 0
    await _check(own_engine, query)

    # Past the retention: the minute rows of these hours are deleted and minute_from moves; still exact.
    later = NOW + dt.timedelta(days=MINUTE_DAYS, hours=3)
    assert (await run_cycle(own_engine, later)).ran
    rows, minute_from = await _minute_rows(own_engine)
    assert rows == 0 and minute_from == floor_hour(later) - dt.timedelta(days=MINUTE_DAYS) > START
    await _check(own_engine, query)
    await _check(own_engine, dataclasses.replace(query, end=floor_hour(NOW)))


async def test_a_cycle_that_fails_writing_minute_rows_leaves_nothing_half_done(own_engine: AsyncEngine) -> None:
    """The minute rows are written in each chunk's transaction with the hourly tables and the watermark: a cycle
    that dies there (here a trigger refuses the insert, as a killed backend would end it) moves nothing; the next
    cycle rolls the hours up exactly."""
    rng = random.Random(11)  # noqa: S311 - test data
    writer = EventWriter(own_engine, None, None, IngestMetrics(get_meter("test_reliability_minutes")))
    await writer.write(_events(rng, "k", 500, START, NOW), channel="http")
    async with own_engine.begin() as connection:
        await connection.execute(text(
            "CREATE FUNCTION refuse_minutes() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused for the test'; END $$"
        ))  # fmt: skip
        await connection.execute(text(
            "CREATE TRIGGER refuse BEFORE INSERT ON reliability_minute_model FOR EACH STATEMENT "
            "EXECUTE FUNCTION refuse_minutes()"
        ))  # fmt: skip
    with pytest.raises(Exception, match="refused for the test"):
        await run_cycle(own_engine, NOW)
    async with own_engine.connect() as connection:
        marks = await watermarks(connection)
        hourly = await connection.scalar(text("SELECT count(*) FROM reliability_hourly_model"))
    assert marks.materialized_through is None and hourly == 0
    assert await _minute_rows(own_engine) == (0, None)

    async with own_engine.begin() as connection:
        await connection.execute(text("DROP TRIGGER refuse ON reliability_minute_model"))
    assert (await run_cycle(own_engine, NOW)).ran
    rows, minute_from = await _minute_rows(own_engine)
    assert rows > 0 and minute_from == START
    await _check(own_engine, _query(START + dt.timedelta(minutes=3), NOW))
