"""Ranked HOUR series (migration 0012): the rank indexes stored on every hourly row and the daily merged sketches
follow their hours through rollup cycles, late events and re-rolls; and a report read ranked (no hourly sketch) is
the report read from sketches, bucket for bucket and to the last digit of every percentile and total.

The data spans four UTC midnights, so a whole day (daily rows) between days with a dirty hour (hourly rows, the
dirty hour from raw events: the last hour of the day before, the first of the day after), partial days at both
ends and the real-time tail all meet in one range."""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import random
from collections import Counter, defaultdict
from typing import Any

import asyncpg
import numpy as np
import pytest
from opentelemetry.metrics import get_meter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from db.reliability import series_rows
from db.rollup import floor_hour, run_cycle, watermarks
from db.sketch import RANKED_PERCENTILES, index_sql
from db.usage import UsageQuery, driver_connection
from ingest.events import TimeWindow, UsageEvent, validate
from ingest.metrics import IngestMetrics
from ingest.writer import EventWriter
from reliability import report
from reliability.report import build_report, ranked_series
from reliability.sketch import PACKED, rank

pytestmark = pytest.mark.slow


def utc_day(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)


NOW = dt.datetime.now(dt.UTC)
MIDNIGHT = utc_day(NOW) - dt.timedelta(days=3)  # data from MIDNIGHT - 7 h to now: four UTC midnights
FIRST = MIDNIGHT - dt.timedelta(hours=7)
LATENCIES = (0.0, 0.5, 3.0, 12.5, 99.75, 250.0, 1000.0, 4321.0, 60_000.0)
STATUSES = (200, 200, 200, 200, 404, 429, 500, 503)

RAW = f"""
SELECT org_id, date_trunc('hour', event_time, 'UTC') AS hour, model, {index_sql("latency_ms")} AS idx, status_code,
       error_type
FROM usage_events WHERE event_time < :through
"""
ERRORS = """
SELECT model, status_code, error_type, count(*) FROM usage_events
WHERE org_id = $1 AND event_time >= $2 AND event_time < $3 AND status_code >= 500 AND model = ANY($4)
GROUP BY 1, 2, 3
"""


def _events(rng: random.Random, tag: str, count: int, start: dt.datetime, end: dt.datetime) -> list[UsageEvent]:
    window = TimeWindow.around(NOW, retention_days=30)
    seconds = max(1, int((end - start).total_seconds()))  # (the tail: now may be in its hour's first second)
    events = []
    for i in range(count):
        status = rng.choice(STATUSES)
        latency = rng.choice(LATENCIES) * rng.uniform(1, 1.5)
        data: dict[str, Any] = {
            "org_id": f"org_{rng.randint(0, 1)}", "model": f"m{rng.randint(0, 2)}", "input_tokens": 1,
            "output_tokens": 1, "latency_ms": latency, "status_code": status,
        }  # fmt: skip
        if status >= 400 and rng.random() < 0.7:
            data["error_type"] = rng.choice(("timeout", "overloaded", "rate_limited"))
        moment = start + dt.timedelta(seconds=rng.randrange(seconds))
        events.append(validate(
            {"specversion": "1.0", "id": f"{tag}-{i}", "source": "//ranked", "type": "ai.usage.request.v1",
             "time": moment.isoformat(), "data": data},
            window,
        ))  # fmt: skip
    return events


def _rank_indexes(counts: Counter[int]) -> list[int]:
    """The bucket index of each of RANKED_PERCENTILES by the rank rule (reliability/sketch.py), from first
    principles."""
    indexes = sorted(counts)
    cumulative = list(itertools.accumulate(counts[i] for i in indexes))
    return [indexes[bisect.bisect_left(cumulative, rank(q, cumulative[-1]))] for q in RANKED_PERCENTILES]


async def _write_and_roll(engine: AsyncEngine) -> EventWriter:
    """Events over three UTC midnights, rolled up; late events (and re-sends) around a midnight, re-rolled."""
    rng = random.Random(12)  # noqa: S311 - test data
    writer = EventWriter(engine, None, None, IngestMetrics(get_meter("test_ranked_series")))
    on_time = _events(rng, "a", 3000, FIRST, floor_hour(NOW))
    await writer.write(on_time, channel="http")
    assert (await run_cycle(engine, NOW)).rolled_until == floor_hour(NOW)
    late = _events(rng, "b", 300, MIDNIGHT - dt.timedelta(hours=2), MIDNIGHT + dt.timedelta(hours=2))
    await writer.write([*late, *rng.sample(on_time, 50)], channel="amqp")
    assert (await run_cycle(engine, NOW)).rerolled_hours > 0
    return writer


async def test_rank_indexes_and_daily_sketches_follow_their_hours(engine: AsyncEngine) -> None:
    await _write_and_roll(engine)
    async with engine.connect() as connection:
        through = (await watermarks(connection)).materialized_through
        raw = (await connection.execute(text(RAW), {"through": through})).all()
        hourly = (await connection.execute(text(
            "SELECT org_id, hour, model, latency_sketch, latency_ranks FROM reliability_hourly_model"
        ))).all()  # fmt: skip
    daily, errors = await _stored_days(engine)
    per_hour: dict[tuple[Any, ...], Counter[int]] = defaultdict(Counter)
    per_day: dict[tuple[Any, ...], Counter[int]] = defaultdict(Counter)
    errors_per_day = Counter(
        (r.org_id, utc_day(r.hour), r.model, r.status_code, r.error_type) for r in raw if r.status_code >= 400
    )
    assert errors == dict(errors_per_day)
    for r in raw:
        per_hour[(r.org_id, r.hour, r.model)][r.idx] += 1
        per_day[(r.org_id, utc_day(r.hour), r.model)][r.idx] += 1
    # the first day's last hours and three whole days (and today's hours but in its first hour)
    assert {key[1] for key in per_day} >= {MIDNIGHT + k * dt.timedelta(days=1) for k in range(-1, 3)}
    assert {(r.org_id, r.hour, r.model): r.latency_ranks for r in hourly} == {
        key: _rank_indexes(counts) for key, counts in per_hour.items()
    }
    for r in hourly:  # and the same as the sketch the row holds
        assert r.latency_ranks == _rank_indexes(Counter({int(k): v for k, v in r.latency_sketch.items()}))
    assert daily == {key: (sum(counts.values()), dict(counts)) for key, counts in per_day.items()}


async def test_a_ranked_report_is_the_report_read_from_sketches(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = await _write_and_roll(engine)
    rng = random.Random(13)  # noqa: S311 - test data
    # Not re-rolled: late events in the first whole day's last hour and in the third's first, so that only the second
    # day is whole (a day bound one hour short at either end takes in a dirty hour); and the real-time tail.
    day = dt.timedelta(days=1)
    before = _events(rng, "d", 40, MIDNIGHT + day - dt.timedelta(seconds=2), MIDNIGHT + day)
    after = _events(rng, "e", 40, MIDNIGHT + 2 * day, MIDNIGHT + 2 * day + dt.timedelta(seconds=2))
    tail = _events(rng, "f", 80, floor_hour(NOW), NOW)
    await writer.write([*before, *after, *tail], channel="http")
    async with engine.connect() as connection:
        through = (await watermarks(connection)).materialized_through
        marks = await connection.scalar(text("SELECT count(DISTINCT hour) FROM rollup_dirty"))
    assert marks == 2
    assert through == floor_hour(NOW)
    start, end = FIRST + dt.timedelta(minutes=13), NOW + dt.timedelta(minutes=1)
    # (any order, repeats: the percentiles are the caller's; 0.9500000000000001 is not 0.95, so not ranked)
    for org_id, models, ranked in (("org_0", None, [0.5, 0.95, 0.99]), ("org_1", ["m0", "m2"], [0.999, 0.5, 0.999])):
        unranked, count = [*ranked, 0.9500000000000001], len(ranked)
        query = UsageQuery(org_id=org_id, start=start, end=end, granularity="HOUR", group_by=frozenset({"model"}),
                           models=models)  # fmt: skip
        assert ranked_series(query, ranked) and not ranked_series(query, unranked)
        fast, _ = await build_report(engine.connect, query, ranked, through, meanwhile=lambda s: None)
        slow, _ = await build_report(engine.connect, query, unranked, through, meanwhile=lambda s: None)
        with monkeypatch.context() as patch:  # read in SERIES_PARTS parts at once, as a 30-day range is: the same
            patch.setattr(report, "SPLIT_BUCKETS", 24)
            parts, _ = await build_report(engine.connect, query, ranked, through, meanwhile=lambda s: None)
        assert parts == fast
        assert fast.series.requests and fast.totals.requests == sum(fast.series.requests)
        assert fast.totals.latency == slow.totals.latency[:count]
        assert [row[:count] for row in slow.series.latency] == fast.series.latency
        for field in ("starts", "ends", "models", "requests", "errors", "client_errors"):
            assert getattr(fast.series, field) == getattr(slow.series, field), field
        assert fast.spikes == slow.spikes and fast.breakdown == slow.breakdown
        async with engine.connect() as connection:  # the breakdown (errors_daily for the whole day) is exact
            raw = await driver_connection(connection)
            truth = await raw.fetch(ERRORS, org_id, start, end, models or ["m0", "m1", "m2"])
        assert {(c.model, c.status_code, c.error_type): c.count for c in fast.breakdown} == {
            (r[0], r[1], r[2]): r[3] for r in truth
        }

        # The totals' sketches: whole days merged, each request counted once (raw rows' sketches hold the rest).
        async with engine.connect() as connection:
            columns = await series_rows(connection, query, through, ranked=True, totals=True)
            rolled = (await connection.execute(text(
                "SELECT hour, model FROM reliability_hourly_model WHERE org_id = :o AND hour >= :s AND hour < :t"
            ), {"o": org_id, "s": floor_hour(start) + dt.timedelta(hours=1), "t": through})).all()  # fmt: skip
            raw_hours = set((await connection.execute(text("SELECT hour FROM rollup_dirty"))).scalars())
        counted = sum(int(np.frombuffer(s, dtype=PACKED)["count"].sum()) for s in columns.totals)
        counted += sum(int(np.frombuffer(s, dtype=PACKED)["count"].sum()) for s in columns.sketch if s is not None)
        assert counted == sum(columns.requests) == fast.totals.requests
        # The second day's merged rows stand in for its hours; every other day's hours not read raw come one by one.
        rolled = [r for r in rolled if models is None or r.model in models]
        whole = [r for r in rolled if MIDNIGHT + day <= r.hour < MIDNIGHT + 2 * day]
        assert len(whole) > 24 and len(columns.totals) == len(
            [r for r in rolled if r.hour not in raw_hours and r not in whole]
        ) + len({r.model for r in whole})


async def _stored_days(engine: AsyncEngine) -> tuple[dict[tuple[Any, ...], Any], dict[tuple[Any, ...], int]]:
    """The daily tables: (org, day, model) -> (requests, {bucket index: count}) (stored sketches ascend by index), and
    (org, day, model, status code, error type) -> requests."""
    daily, errors = await _rows(
        engine,
        "SELECT org_id, day, model, requests, latency_sketch_packed FROM reliability_daily_model",
        "SELECT org_id, day, model, status_code, error_type, requests FROM errors_daily",
    )
    sketches = {}
    for r in daily:
        entries = np.frombuffer(r.latency_sketch_packed, dtype=PACKED)
        assert bool(np.all(np.diff(entries["index"].astype(np.int64)) > 0))
        counts = dict(zip(entries["index"].tolist(), entries["count"].tolist(), strict=True))
        sketches[(r.org_id, r.day, r.model)] = (r.requests, counts)
    return sketches, {tuple(r[:5]): r.requests for r in errors}


async def _daily_tables_against_their_hours(engine: AsyncEngine) -> None:
    """Both daily tables equal their hourly tables' rows added up by UTC day."""
    hourly, errors_hourly = await _rows(
        engine,
        "SELECT org_id, hour, model, latency_sketch FROM reliability_hourly_model",
        "SELECT org_id, hour, model, status_code, error_type, requests FROM errors_hourly",
    )
    sketches: dict[tuple[Any, ...], Counter[int]] = defaultdict(Counter)
    for r in hourly:
        sketches[(r.org_id, utc_day(r.hour), r.model)].update({int(k): v for k, v in r.latency_sketch.items()})
    summed: Counter[tuple[Any, ...]] = Counter()
    for r in errors_hourly:
        summed[(r.org_id, utc_day(r.hour), r.model, r.status_code, r.error_type)] += r.requests
    merged = {key: (sum(c.values()), dict(c)) for key, c in sketches.items()}
    assert await _stored_days(engine) == (merged, dict(summed))


async def _rows(engine: AsyncEngine, *queries: str) -> list[list[Any]]:
    async with engine.connect() as connection:
        return [list((await connection.execute(text(query))).all()) for query in queries]


async def test_any_writer_of_the_hourly_rows_keeps_the_days(engine: AsyncEngine) -> None:
    """Statements that know nothing of the daily tables (as an earlier release's rollup worker, still running in a
    rolling deploy after migration 0012) keep them exact: deleting an hour, changing a row, adding one, in any
    day, alone or several in one statement and transaction."""
    await _write_and_roll(engine)
    await _daily_tables_against_their_hours(engine)
    day = MIDNIGHT + dt.timedelta(days=1)
    async with engine.begin() as connection:
        for table in ("reliability_hourly_model", "errors_hourly"):
            await connection.execute(text(f"DELETE FROM {table} WHERE org_id = 'org_0' AND hour = :h"),
                                     {"h": day + dt.timedelta(hours=5)})  # fmt: skip
        await connection.execute(text(
            "UPDATE reliability_hourly_model SET latency_sketch = '{\"40\": 7, \"-32768\": 1}', requests = 8 "
            "WHERE org_id = 'org_1' AND hour IN (:a, :b)"
        ), {"a": day + dt.timedelta(hours=7), "b": day + dt.timedelta(days=1, hours=2)})  # fmt: skip
        await connection.execute(text("UPDATE errors_hourly SET requests = requests + 5 WHERE org_id = 'org_1'"))
        await connection.execute(text(
            "INSERT INTO reliability_hourly_model "
            "(org_id, hour, model, requests, errors, client_errors, latency_sketch) "
            "VALUES ('org_2', :h, 'm9', 3, 0, 0, '{\"12\": 3}'), ('org_0', :h, 'm9', 1, 1, 0, '{\"1\": 1}')"
        ), {"h": day + dt.timedelta(hours=9)})  # fmt: skip
    await _daily_tables_against_their_hours(engine)
    async with engine.begin() as connection:  # an hour deleted with nothing in its place: its day goes
        await connection.execute(text("DELETE FROM reliability_hourly_model WHERE org_id = 'org_2'"))
    await _daily_tables_against_their_hours(engine)


async def test_a_writer_killed_mid_transaction_leaves_the_days_as_their_hours(
    engine: AsyncEngine, migrated_database: str
) -> None:
    """A rollup killed after its statement rewrote a day (the trigger ran) but before it committed: nothing of either
    stays, and a reader meanwhile sees the days as their committed hours."""
    await _write_and_roll(engine)
    before = await _stored_days(engine)
    victim = await asyncpg.connect(migrated_database)
    killer = await asyncpg.connect(migrated_database)
    try:
        transaction = victim.transaction()
        await transaction.start()
        await victim.execute("DELETE FROM reliability_hourly_model WHERE org_id = 'org_0' AND hour < $1",
                             MIDNIGHT + dt.timedelta(days=2))  # fmt: skip
        await victim.execute("DELETE FROM errors_hourly WHERE org_id = 'org_0'")
        assert await victim.fetchval("SELECT count(*) FROM errors_daily WHERE org_id = 'org_0'") == 0
        assert await _stored_days(engine) == before  # not committed: unseen
        # (with a timeout, it returns once the backend has exited: its transaction is gone)
        assert await killer.fetchval("SELECT pg_terminate_backend($1, 10000)", victim.get_server_pid())
    finally:
        victim.terminate()
        await killer.close()
    assert await _stored_days(engine) == before
    await _daily_tables_against_their_hours(engine)
