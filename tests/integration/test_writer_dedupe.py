"""The writer's deduplication and late-event marks, through ``EventWriter`` on the real PostgreSQL.

Identity is ``(source, id)``, whatever the org (shared/contracts/README.md): the first occurrence wins, within a
batch and across batches; the same ``(source, id)`` sent again for another org is a duplicate, counted for no org.
New events older than the dirty watermark mark their (org, hour) for the rollup, duplicates do not. What a batch
reports (per org, per model and status class) counts the new events only.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import pytest
from opentelemetry.metrics import get_meter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from db.engine import create_engine
from db.retention import prune_receipts
from db.rollup import floor_hour
from ingest.events import TimeWindow, UsageEvent, validate
from ingest.metrics import IngestMetrics
from ingest.writer import EventWriter

NOW = dt.datetime.now(dt.UTC)
WINDOW = TimeWindow.around(NOW, retention_days=30)


@pytest.fixture
async def own_engine(migrated_database: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(migrated_database, pool_size=4)
    yield engine
    await engine.dispose()


def _writer(engine: AsyncEngine) -> EventWriter:
    return EventWriter(engine, None, None, IngestMetrics(get_meter("test_writer_dedupe")))


def _event(
    source: str, event_id: str, org: str, *, tokens: int = 10, at: dt.datetime = NOW, status: int = 200
) -> UsageEvent:
    return validate(
        {"specversion": "1.0", "id": event_id, "source": source, "type": "ai.usage.request.v1",
         "time": at.isoformat(), "data": {"org_id": org, "model": "m1", "input_tokens": tokens, "output_tokens": 1,
                                         "latency_ms": 5.0, "status_code": status}},
        WINDOW,
    )  # fmt: skip


async def _stored(engine: AsyncEngine, source: str) -> list[tuple[str, str, int]]:
    return await _rows(engine, "SELECT org_id, event_id, input_tokens FROM usage_events WHERE source = :s", source)


async def _receipts(engine: AsyncEngine, source: str) -> list[tuple[str, str, int]]:
    return await _rows(engine, "SELECT org_id, event_id, batch_id FROM event_receipts WHERE source = :s", source)


async def _rows(engine: AsyncEngine, sql: str, source: str) -> list[tuple[str, str, int]]:
    async with engine.connect() as connection:
        rows = await connection.execute(text(sql + " ORDER BY 1, 2"), {"s": source})
        return [(r[0], r[1], r[2]) for r in rows]


async def test_first_write_wins_whatever_the_org_within_and_across_batches(own_engine: AsyncEngine) -> None:
    source = f"//dedupe/{uuid.uuid4().hex[:8]}"
    writer = _writer(own_engine)
    first = await writer.write(
        [
            _event(source, "a", "org_1", tokens=1),
            _event(source, "a", "org_1", tokens=2),  # a repeat within the batch: the first occurrence wins
            _event(source, "a", "org_2", tokens=3),  # the same (source, id) for another org: a duplicate too
            _event(source, "b", "org_1", tokens=4, status=503),
            _event(source, "c", "org_2", tokens=5),
            _event(source, "c", "org_1", tokens=6, status=503),  # org_2's c again, for org_1
        ],
        channel="http",
    )
    assert (first.accepted, first.duplicates) == (3, 3)
    assert [(o.org_id, o.events) for o in first.orgs] == [("org_1", 2), ("org_2", 1)]
    assert first.by_model_and_class == {("m1", 2): 2, ("m1", 5): 1}

    second = await writer.write(
        [
            _event(source, "a", "org_1", tokens=7),  # duplicates of the first batch, for their org and for others
            _event(source, "a", "org_3", tokens=8),
            _event(source, "b", "org_2", tokens=9),
            _event(source, "c", "org_3", tokens=10, status=503),
            _event(source, "d", "org_3", tokens=11),  # new
            _event(source, "d", "org_1", tokens=12),  # a repeat of the new one within this batch, another org
        ],
        channel="amqp",
    )
    assert (second.accepted, second.duplicates) == (1, 5)
    assert [(o.org_id, o.events) for o in second.orgs] == [("org_3", 1)]
    assert second.by_model_and_class == {("m1", 2): 1}

    assert await _stored(own_engine, source) == [
        ("org_1", "a", 1), ("org_1", "b", 4), ("org_2", "c", 5), ("org_3", "d", 11)
    ]  # fmt: skip
    assert await _receipts(own_engine, source) == [
        ("org_1", "a", first.batch_id), ("org_1", "b", first.batch_id), ("org_2", "c", first.batch_id),
        ("org_3", "d", second.batch_id),
    ]  # fmt: skip

    again = await writer.write([_event(source, "d", "org_4", tokens=13)], channel="http")
    assert (again.accepted, again.duplicates, again.orgs, again.by_model_and_class) == (0, 1, [], {})


async def test_new_late_events_mark_their_hours_and_duplicates_do_not(own_engine: AsyncEngine) -> None:
    source = f"//late/{uuid.uuid4().hex[:8]}"
    watermark = floor_hour(NOW) - dt.timedelta(hours=2)
    late, older, fresh = (watermark - dt.timedelta(minutes=30), watermark - dt.timedelta(hours=5),
                          watermark + dt.timedelta(minutes=30))  # fmt: skip
    writer = _writer(own_engine)
    # Events stored before the watermark existed: late now, but not new, for their org or any other.
    await writer.write(
        [_event(source, "dup", "org_d", at=older), _event(source, "moved", "org_d", at=fresh)], channel="http"
    )
    async with own_engine.begin() as connection:
        await connection.execute(text("UPDATE rollup_state SET dirty_before = :d"), {"d": watermark})

    result = await writer.write(
        [
            _event(source, "l1", "org_a", at=late),
            _event(source, "l2", "org_a", at=late + dt.timedelta(minutes=1)),
            _event(source, "l1", "org_b", at=older),  # same (source, id), another org and hour: a duplicate
            _event(source, "f1", "org_a", at=fresh),  # at or after the watermark: no mark
            _event(source, "dup", "org_d", at=older),  # a re-send, late
            _event(source, "dup", "org_e", at=older),  # the same for another org, late
            _event(source, "moved", "org_f", at=older),  # an accepted identity, late and for another org
        ],
        channel="http",
    )
    assert (result.accepted, result.duplicates) == (3, 4)
    async with own_engine.connect() as connection:
        marks = (await connection.execute(text("SELECT org_id, hour FROM rollup_dirty ORDER BY 1, 2"))).all()
    assert [(m.org_id, m.hour) for m in marks] == [("org_a", floor_hour(late))]


async def test_a_pruned_identity_is_accepted_again_and_a_kept_one_stays_a_duplicate_for_every_org(
    own_engine: AsyncEngine,
) -> None:
    source = f"//prune/{uuid.uuid4().hex[:8]}"
    cut = NOW - dt.timedelta(days=30)
    async with own_engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO event_receipts (org_id, source, event_id, event_time, batch_id) "
                "VALUES ('org_old', :s, 'x', :old, 1), ('org_young', :s, 'y', :young, 2)"
            ),
            {"s": source, "old": cut - dt.timedelta(days=1), "young": NOW},
        )
        assert await prune_receipts(connection, cut, 100) == 1
    assert await _receipts(own_engine, source) == [("org_young", "y", 2)]

    result = await _writer(own_engine).write(
        [_event(source, "x", "org_new"), _event(source, "y", "org_new"), _event(source, "y", "org_young")],
        channel="http",
    )
    assert (result.accepted, result.duplicates) == (1, 2)
    assert await _stored(own_engine, source) == [("org_new", "x", 10)]
