"""The rollup worker's re-roll and an ingest transaction that creates a partition never deadlock.

An ingest transaction creates the day's partition (an ACCESS EXCLUSIVE lock on ``usage_events``) before it
marks dirty hours; a re-roll that claimed a dirty mark and then read ``usage_events`` would wait for the
writer while the writer waits for the claimed mark: PostgreSQL aborts one of them ("deadlock detected"). The
re-roll takes its lock on ``usage_events`` before it claims marks, so it waits for the writer instead.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import text

from db.engine import create_engine
from db.rollup import floor_hour, reroll_dirty


@pytest.fixture
async def writer(migrated_database: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(migrated_database)
    try:
        yield connection
    finally:
        await connection.close()


async def test_a_reroll_waits_for_a_writer_creating_a_partition_instead_of_deadlocking(
    migrated_database: str, writer: asyncpg.Connection
) -> None:
    org = f"org_locks_{uuid.uuid4().hex[:6]}"
    hour = floor_hour(dt.datetime.now(dt.UTC)) - dt.timedelta(days=3)
    await writer.execute(
        "UPDATE rollup_state SET materialized_through = $1, dirty_before = $1", hour + dt.timedelta(days=1)
    )
    await writer.execute("INSERT INTO rollup_dirty (org_id, hour) VALUES ($1, $2)", org, hour)

    # The writer's transaction: a new partition first (as EventWriter does), then a dirty mark on the same hour.
    transaction = writer.transaction()
    await transaction.start()
    await writer.execute("SELECT analytics_ensure_usage_partition($1::date)", dt.date(2031, 1, 1))

    engine = create_engine(migrated_database, pool_size=1)
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SET deadlock_timeout = '100ms'"))
            reroll = asyncio.create_task(reroll_dirty(connection))
            await asyncio.sleep(0.3)  # let the re-roll reach its first lock (no event to await across processes)
            deadlock: Exception | None = None
            try:
                await writer.execute(
                    "INSERT INTO rollup_dirty (org_id, hour) VALUES ($1, $2) "
                    "ON CONFLICT (org_id, hour) DO UPDATE SET marked_at = excluded.marked_at",
                    org, hour,
                )  # fmt: skip
                await transaction.commit()
            except asyncpg.DeadlockDetectedError as exc:  # the writer was chosen as the victim
                await transaction.rollback()
                deadlock = exc
            (outcome,) = await asyncio.wait_for(asyncio.gather(reroll, return_exceptions=True), timeout=10)
    finally:
        await engine.dispose()
    assert deadlock is None, deadlock
    assert not isinstance(outcome, BaseException), outcome
    assert outcome >= 1
