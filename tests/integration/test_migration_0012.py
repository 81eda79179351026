"""Migration 0012 (rank indexes on hourly rows, daily merged sketches) on a database that already holds rolled-up
hours: the upgrade fills both exactly as the rollup worker writes them; downgrade removes them; upgrading again
works."""

from __future__ import annotations

import datetime as dt
import random

import asyncpg
import pytest
from opentelemetry.metrics import get_meter

from db.engine import create_engine
from db.rollup import floor_hour, run_cycle
from ingest.events import TimeWindow, validate
from ingest.metrics import IngestMetrics
from ingest.writer import EventWriter
from tests.integration.migration_steps import alembic

pytestmark = pytest.mark.slow

NOW = dt.datetime.now(dt.UTC)
RANKS = "SELECT org_id, hour, model, latency_ranks FROM reliability_hourly_model ORDER BY 1, 2, 3"
DAILY = "SELECT org_id, day, model, requests, latency_sketch_packed FROM reliability_daily_model ORDER BY 1, 2, 3"
ERRORS = "SELECT * FROM errors_daily ORDER BY 1, 2, 3, 4, 5"


async def test_upgrade_from_0011_fills_what_the_rollup_writes_then_downgrade_and_upgrade_again(
    empty_database: str,
) -> None:
    await alembic(empty_database, "upgrade", "head")
    rng = random.Random(12)  # noqa: S311 - test data
    window = TimeWindow.around(NOW, retention_days=30)
    start = floor_hour(NOW) - dt.timedelta(hours=50)  # over two UTC midnights
    events = [
        validate(
            {"specversion": "1.0", "id": f"r-{i}", "source": "//migration/0012", "type": "ai.usage.request.v1",
             "time": (start + dt.timedelta(minutes=rng.randint(0, 50 * 60 - 1))).isoformat(),
             "data": {"org_id": f"org_{i % 2}", "model": f"m{i % 3}", "input_tokens": 1, "output_tokens": 1,
                      "latency_ms": rng.lognormvariate(5, 1.5), "status_code": (200, 429, 500, 503)[i % 4],
                      "error_type": ("timeout", "overloaded")[i % 5 % 2]}},
            window,
        )
        for i in range(900)
    ]  # fmt: skip
    engine = create_engine(empty_database, pool_size=2)
    try:
        await EventWriter(engine, None, None, IngestMetrics(get_meter("test_migration_0012"))).write(
            events, channel="http"
        )
        assert (await run_cycle(engine, NOW)).ran
    finally:
        await engine.dispose()
    connection = await asyncpg.connect(empty_database)
    try:
        written = [[tuple(r) for r in await connection.fetch(sql)] for sql in (RANKS, DAILY, ERRORS)]
        assert written[0] and all(r[3] is not None for r in written[0])
        assert len({r[1] for r in written[1]}) >= 3 and len({r[1] for r in written[2]}) >= 3  # 50 h: 3 or 4 UTC days

        await alembic(empty_database, "downgrade", "0011")
        assert await connection.fetchval("SELECT to_regclass('reliability_daily_model')") is None
        assert await connection.fetchval("SELECT to_regclass('errors_daily')") is None
        assert await connection.fetchval("SELECT to_regprocedure('sketch_rank_indexes(jsonb)')") is None
        columns = await connection.fetchval(
            "SELECT array_agg(column_name::text) FROM information_schema.columns "
            "WHERE table_name = 'reliability_hourly_model'"
        )
        assert "latency_ranks" not in columns

        await alembic(empty_database, "upgrade", "0012")
        filled = [[tuple(r) for r in await connection.fetch(sql)] for sql in (RANKS, DAILY, ERRORS)]
        assert filled == written
    finally:
        await connection.close()
