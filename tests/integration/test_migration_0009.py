"""Migration 0009 (event receipts keyed by org) on a database that already holds data: upgrade from 0008 to 0009
keeps every receipt and makes deduplication per org; downgrade restores the old key, keeping the earliest receipt
of an identity accepted for several orgs; upgrading again works. Migration 0011 restores the (source, event_id) key
(tests/integration/test_migration_0011.py), so this test stops at 0009."""

from __future__ import annotations

import datetime as dt

import asyncpg
import pytest

from tests.integration.migration_steps import RECEIPTS_KEY, alembic

pytestmark = pytest.mark.slow

T = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
RECEIPTS = [(f"org_{i % 3}", f"//src/{i % 2}", f"id-{i}", T + dt.timedelta(minutes=i), 100 + i) for i in range(30)]


async def _receipts(connection: asyncpg.Connection) -> list[tuple[object, ...]]:
    rows = await connection.fetch(
        "SELECT org_id, source, event_id, event_time, batch_id FROM event_receipts ORDER BY batch_id, org_id"
    )
    return [tuple(r) for r in rows]


async def test_upgrade_from_0008_with_data_then_downgrade_and_upgrade_again(empty_database: str) -> None:
    await alembic(empty_database, "upgrade", "0008")
    connection = await asyncpg.connect(empty_database)
    try:
        assert await connection.fetchval(RECEIPTS_KEY) == ["source", "event_id"]
        await connection.executemany("INSERT INTO event_receipts VALUES ($2, $3, $1, $4, $5)", RECEIPTS)

        # To 0009 itself: later revisions (0011) key receipts by (source, event_id) again.
        await alembic(empty_database, "upgrade", "0009")
        assert await connection.fetchval("SELECT version_num FROM alembic_version") == "0009"
        assert await connection.fetchval(RECEIPTS_KEY) == ["org_id", "source", "event_id"]
        assert await _receipts(connection) == RECEIPTS

        # Per org now: the same (source, id) for another org is a receipt of its own; for the same org, a conflict.
        org, source, event_id = RECEIPTS[0][:3]
        insert = "INSERT INTO event_receipts VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING"
        assert await connection.execute(insert, source, event_id, "org_new", T, 900) == "INSERT 0 1"
        assert await connection.execute(insert, source, event_id, org, T, 901) == "INSERT 0 0"
        # And one identity accepted for a third org in an earlier batch than its other receipts.
        assert await connection.execute(insert, source, event_id, "org_early", T, 50) == "INSERT 0 1"

        await alembic(empty_database, "downgrade", "0008")
        assert await connection.fetchval("SELECT version_num FROM alembic_version") == "0008"
        assert await connection.fetchval(RECEIPTS_KEY) == ["source", "event_id"]
        # The earliest batch's receipt of the shared identity stays; every other receipt is untouched.
        assert await _receipts(connection) == [("org_early", source, event_id, T, 50), *RECEIPTS[1:]]

        await alembic(empty_database, "upgrade", "0009")
        assert await connection.fetchval(RECEIPTS_KEY) == ["org_id", "source", "event_id"]
        assert len(await _receipts(connection)) == len(RECEIPTS)
    finally:
        await connection.close()
