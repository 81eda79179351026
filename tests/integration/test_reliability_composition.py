"""The compositions of spike windows (``db.reliability.compositions``: each window's requests by model, and its errors
or slow requests by model, status code and error type; every window in one statement) equal the raw events': over
rolled-up hours (rollups), off the hour grid (raw edges), with model and project filters (``usage_hourly`` for the
project), and with late events in rolled-up hours (dirty: raw until re-rolled)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections import Counter

from opentelemetry.metrics import get_meter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from db.reliability import Window, compositions, window
from db.rollup import floor_hour, run_cycle, watermarks
from db.usage import UsageQuery
from ingest.events import TimeWindow, UsageEvent, validate
from ingest.metrics import IngestMetrics
from ingest.writer import EventWriter

NOW = dt.datetime.now(dt.UTC)
START = floor_hour(NOW) - dt.timedelta(hours=6)
ORG = "org_composition"
EVENTS = """
SELECT model, project_id, status_code, error_type, latency_ms FROM usage_events
WHERE org_id = :org AND event_time >= :start AND event_time < :end
"""


def _events(rng: random.Random, tag: str, count: int, start: dt.datetime, end: dt.datetime) -> list[UsageEvent]:
    window_ = TimeWindow.around(NOW, retention_days=30)
    span = int((end - start).total_seconds())
    events = []
    for i in range(count):
        status = rng.choice((200, 200, 200, 200, 404, 429, 500, 502, 503))
        data = {"org_id": rng.choice((ORG, ORG, "org_other")), "model": f"m{rng.randint(0, 2)}", "input_tokens": 1,
                "output_tokens": 1, "latency_ms": rng.lognormvariate(5, 1.2), "project_id": rng.choice(("p1", "p2")),
                "status_code": status}  # fmt: skip
        if status >= 400:
            data["error_type"] = rng.choice(("overloaded", "timeout", 'bad "input"'))
        events.append(validate(
            {"specversion": "1.0", "id": f"{tag}-{i}", "source": "//reliability/composition",
             "type": "ai.usage.request.v1", "time": (start + dt.timedelta(seconds=rng.randrange(span))).isoformat(),
             "data": data},
            window_,
        ))  # fmt: skip
    return events


async def _check(engine: AsyncEngine, windows: list[Window]) -> None:
    """All windows in one statement, each equal to its raw events."""
    async with engine.connect() as connection:
        through = (await watermarks(connection)).materialized_through
        served = await compositions(connection, windows, through)
        assert len(served) == len(windows)
        for (query, slower_than_ms), found in zip(windows, served, strict=True):
            events = (
                await connection.execute(text(EVENTS), {"org": ORG, "start": query.start, "end": query.end})
            ).all()
            kept = [e for e in events if (query.models is None or e.model in query.models)
                    and (query.project_ids is None or e.project_id in query.project_ids)]  # fmt: skip
            if slower_than_ms is None:
                hits = Counter((e.model, e.status_code, e.error_type) for e in kept if e.status_code >= 500)
            else:
                hits = Counter((e.model, e.status_code, e.error_type if e.status_code >= 400 else None)
                               for e in kept if e.latency_ms > slower_than_ms)  # fmt: skip
            assert kept and hits  # something to compare
            assert found.requests == dict(Counter(e.model for e in kept))
            assert Counter({(r.model, r.status_code, r.error_type): r.requests for r in found.hits}) == hits
            assert len(found.hits) == len(hits)  # one row per (model, status code, error type)


async def test_a_window_composition_is_its_raw_events(engine: AsyncEngine) -> None:
    rng = random.Random(5)  # noqa: S311 - test data
    writer = EventWriter(engine, None, None, IngestMetrics(get_meter("test_reliability_composition")))
    await writer.write(_events(rng, "a", 3000, START, NOW), channel="http")
    assert (await run_cycle(engine, NOW)).ran
    base = UsageQuery(org_id=ORG, start=START, end=NOW, granularity=None, time_zone="UTC", group_by=frozenset())
    whole = window(base, START, floor_hour(NOW))
    ragged = window(base, START + dt.timedelta(minutes=13, seconds=7), NOW)
    queries = [whole, ragged, dataclasses.replace(ragged, models=["m1"]),
               dataclasses.replace(ragged, project_ids=["p2"]),
               dataclasses.replace(whole, models=["m0", "m2"], project_ids=["p1"])]  # fmt: skip
    for query in queries:
        await _check(engine, [(query, None)])
        await _check(engine, [(query, 400.0)])
    # Every window at once, kinds and shapes mixed (as a report's spikes): each as it is alone.
    await _check(engine, [(q, t) for q in queries for t in (350.0, None)])

    # Late events in rolled-up hours: exact at once (dirty hours are read raw), and after the re-roll.
    await writer.write(_events(rng, "late", 500, START, floor_hour(NOW)), channel="amqp")
    async with engine.connect() as connection:
        assert await connection.scalar(text("SELECT count(*) FROM rollup_dirty WHERE org_id = :o"), {"o": ORG})
    await _check(engine, [(whole, None), (dataclasses.replace(ragged, project_ids=["p1"]), None)])
    assert (await run_cycle(engine, NOW)).rerolled_hours > 0
    await _check(engine, [(whole, 150.0), (whole, None)])


async def test_an_empty_window_has_no_composition(engine: AsyncEngine) -> None:
    query = UsageQuery(org_id="org_nobody", start=START, end=NOW, granularity=None, time_zone="UTC",
                       group_by=frozenset())  # fmt: skip
    async with engine.connect() as connection:
        assert await compositions(connection, [], floor_hour(NOW)) == []
        for found in await compositions(connection, [(query, None), (query, 1.0)], floor_hour(NOW)):
            assert found.requests == {} and found.hits == []
