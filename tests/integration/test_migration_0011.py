"""Migration 0011 (event receipts keyed by (source, event_id) again) on a database that already holds data: from
0010, where one identity has receipts for several orgs (accepted while 0009's per-org key was in force), the upgrade
keeps the earliest batch's receipt (then the lowest org), keeps every stored event, and makes the identity global
(shared/contracts/README.md); downgrade to 0010 restores the per-org key; upgrading again works."""

from __future__ import annotations

import datetime as dt

import asyncpg
import pytest
from opentelemetry.metrics import get_meter

from db.engine import create_engine
from ingest.events import TimeWindow, UsageEvent, validate
from ingest.metrics import IngestMetrics
from ingest.writer import EventWriter
from tests.integration.migration_steps import RECEIPTS_KEY, alembic

pytestmark = pytest.mark.slow

NOW = dt.datetime.now(dt.UTC)
T = NOW.replace(microsecond=0) - dt.timedelta(hours=1)
# (org_id, source, event_id, event_time, batch_id): "//s/0" "x" was accepted for three orgs, two in batch 7.
SHARED = [("org_b", "//s/0", "x", T, 7), ("org_a", "//s/0", "x", T, 9), ("org_c", "//s/0", "x", T, 7)]
OTHERS = [("org_a", "//s/0", "y", T, 3), ("org_a", "//s/1", "x", T, 5), ("org_c", "//s/1", "y", T, 11)]
INSERT_RECEIPT = (
    "INSERT INTO event_receipts (org_id, source, event_id, event_time, batch_id) VALUES ($1, $2, $3, $4, $5) "
    "ON CONFLICT DO NOTHING"
)
INSERT_EVENT = (
    "INSERT INTO usage_events (org_id, source, event_id, event_time, model, input_tokens, cached_input_tokens, "
    "output_tokens, latency_ms, status_code, batch_id) VALUES ($1, $2, $3, $4, 'm1', 1, 0, 1, 5.0, 200, $5)"
)


async def _receipts(connection: asyncpg.Connection) -> list[tuple[object, ...]]:
    rows = await connection.fetch(
        "SELECT org_id, source, event_id, event_time, batch_id FROM event_receipts ORDER BY batch_id, org_id"
    )
    return [tuple(r) for r in rows]


def _sorted(receipts: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    return sorted(receipts, key=lambda r: (r[4], r[0]))  # type: ignore[return-value]


def _event(source: str, event_id: str, org: str) -> UsageEvent:
    return validate(
        {"specversion": "1.0", "id": event_id, "source": source, "type": "ai.usage.request.v1", "time": T.isoformat(),
         "data": {"org_id": org, "model": "m1", "input_tokens": 1, "output_tokens": 1, "latency_ms": 5.0,
                  "status_code": 200}},
        TimeWindow.around(NOW, retention_days=30),
    )  # fmt: skip


async def _version(connection: asyncpg.Connection) -> str:
    return str(await connection.fetchval("SELECT version_num FROM alembic_version"))


async def test_upgrade_from_0010_keeps_the_earliest_receipt_then_downgrade_and_upgrade_again(
    empty_database: str,
) -> None:
    await alembic(empty_database, "upgrade", "0010")
    connection = await asyncpg.connect(empty_database)
    try:
        assert await connection.fetchval(RECEIPTS_KEY) == ["org_id", "source", "event_id"]
        await connection.execute("SELECT analytics_ensure_usage_partition($1::date)", T.date())
        await connection.executemany(INSERT_RECEIPT, SHARED + OTHERS)
        await connection.executemany(INSERT_EVENT, SHARED + OTHERS)
        assert len(await _receipts(connection)) == 6

        await alembic(empty_database, "upgrade", "0011")
        assert await _version(connection) == "0011"
        assert await connection.fetchval(RECEIPTS_KEY) == ["source", "event_id"]
        # Of "//s/0" "x", batch 7's receipt of the lowest org stays; every other identity is untouched.
        assert await _receipts(connection) == _sorted([SHARED[0], *OTHERS])
        # The events stored while 0009 was in force stay (nothing counted is rewritten).
        assert await connection.fetchval("SELECT count(*) FROM usage_events") == 6

        # One identity, whatever the org: a receipt for a new org conflicts, and the writer counts it a duplicate.
        assert await connection.execute(INSERT_RECEIPT, "org_new", "//s/0", "y", T, 900) == "INSERT 0 0"
        engine = create_engine(empty_database, pool_size=2)
        try:
            writer = EventWriter(engine, None, None, IngestMetrics(get_meter("test_migration_0011")))
            result = await writer.write(
                [
                    _event(source, event_id, "org_new")
                    for source, event_id in (("//s/0", "x"), ("//s/1", "y"), ("//s/1", "z"))
                ],
                channel="http",
            )
        finally:
            await engine.dispose()
        assert (result.accepted, result.duplicates) == (1, 2)
        assert await connection.fetchval("SELECT count(*) FROM usage_events WHERE org_id = 'org_new'") == 1
        kept = _sorted([SHARED[0], *OTHERS, ("org_new", "//s/1", "z", T, result.batch_id)])
        assert await _receipts(connection) == kept

        await alembic(empty_database, "downgrade", "0010")
        assert await _version(connection) == "0010"
        assert await connection.fetchval(RECEIPTS_KEY) == ["org_id", "source", "event_id"]
        assert await _receipts(connection) == kept
        # Per org again: the same (source, id) for another org is a receipt of its own.
        assert await connection.execute(INSERT_RECEIPT, "org_new", "//s/0", "y", T, 2) == "INSERT 0 1"

        await alembic(empty_database, "upgrade", "0011")
        assert await connection.fetchval(RECEIPTS_KEY) == ["source", "event_id"]
        # org_new's receipt of "//s/0" "y" is the earliest batch's now (2 < 3): it is the one kept.
        assert await _receipts(connection) == _sorted(
            [("org_new", "//s/0", "y", T, 2), *(r for r in kept if r[1:3] != ("//s/0", "y"))]
        )
    finally:
        await connection.close()
