"""Migration 0010 (per-minute reliability rows) on a database that already holds rolled-up events: the upgrade
fills minute rows for the rolled-up hours within the retention and none before, and sets ``minute_from``;
downgrade removes both; upgrading again works."""

from __future__ import annotations

import datetime as dt
import random

import asyncpg
import pytest
from opentelemetry.metrics import get_meter

from db.engine import create_engine
from db.rollup import MINUTE_DAYS, floor_hour
from ingest.events import TimeWindow, validate
from ingest.metrics import IngestMetrics
from ingest.writer import EventWriter
from tests.integration.migration_steps import alembic

pytestmark = pytest.mark.slow

NOW = dt.datetime.now(dt.UTC)
HORIZON = floor_hour(NOW) - dt.timedelta(days=MINUTE_DAYS)
EXPECTED = """
SELECT org_id, date_trunc('minute', event_time, 'UTC') AS minute, model, count(*) AS requests,
       count(*) FILTER (WHERE status_code >= 500) AS errors
FROM usage_events WHERE event_time >= $1 AND event_time < $2 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""
STORED = """
SELECT org_id, minute, model, requests, errors FROM reliability_minute_model ORDER BY 1, 2, 3
"""


async def test_upgrade_from_0009_fills_the_retention_then_downgrade_and_upgrade_again(empty_database: str) -> None:
    await alembic(empty_database, "upgrade", "0009")
    rng = random.Random(10)  # noqa: S311 - test data
    window = TimeWindow.around(NOW, retention_days=30)
    events = [
        validate(
            {"specversion": "1.0", "id": f"m-{i}", "source": "//migration/0010", "type": "ai.usage.request.v1",
             "time": (HORIZON + dt.timedelta(minutes=rng.randint(-600, 300))).isoformat(),
             "data": {"org_id": f"org_{i % 2}", "model": f"m{i % 3}", "input_tokens": 1, "output_tokens": 1,
                      "latency_ms": rng.uniform(1, 900), "status_code": rng.choice((200, 500))}},
            window,
        )
        for i in range(600)
    ]  # fmt: skip
    engine = create_engine(empty_database, pool_size=2)
    try:
        await EventWriter(engine, None, None, IngestMetrics(get_meter("test_migration_0010"))).write(
            events, channel="http"
        )
    finally:
        await engine.dispose()
    through = HORIZON + dt.timedelta(hours=3)  # rolled up to here: minute rows for [HORIZON, through) only
    connection = await asyncpg.connect(empty_database)
    try:
        await connection.execute("UPDATE rollup_state SET materialized_through = $1, dirty_before = $1", through)
        before = floor_hour(dt.datetime.now(dt.UTC)) - dt.timedelta(days=MINUTE_DAYS)
        await alembic(empty_database, "upgrade", "0010")
        after = floor_hour(dt.datetime.now(dt.UTC)) - dt.timedelta(days=MINUTE_DAYS)
        horizon = await connection.fetchval("SELECT minute_from FROM rollup_state")
        assert horizon in (before, after)  # the migration's own clock: the hour may turn while it runs
        expected = [tuple(r) for r in await connection.fetch(EXPECTED, horizon, through)]
        assert expected and [tuple(r) for r in await connection.fetch(STORED)] == expected
        assert await connection.fetchval("SELECT count(*) FROM usage_events WHERE event_time < $1", horizon) > 0

        await alembic(empty_database, "downgrade", "0009")
        assert await connection.fetchval("SELECT to_regclass('reliability_minute_model')") is None
        columns = await connection.fetchval(
            "SELECT array_agg(column_name::text) FROM information_schema.columns WHERE table_name = 'rollup_state'"
        )
        assert "minute_from" not in columns
        await alembic(empty_database, "upgrade", "head")
        assert [tuple(r) for r in await connection.fetch(STORED)] == expected
    finally:
        await connection.close()
