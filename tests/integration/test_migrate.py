"""``analytics-gateway migrate``: idempotent, and safe from two processes at once."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from db.migrate import current_head
from tests.integration.serve_support import clean_env, run_cli

# What migrations make; daily partitions of usage_events come with data (ingestion makes those it needs).
SNAPSHOT = """
SELECT 'column', table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable
  FROM information_schema.columns WHERE table_schema = 'public' AND table_name !~ '^usage_events_p[0-9]{8}$'
UNION ALL SELECT 'index', indexdef FROM pg_indexes
  WHERE schemaname = 'public' AND tablename !~ '^usage_events_p[0-9]{8}$'
UNION ALL SELECT 'function', proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace
UNION ALL SELECT 'trigger', tgname FROM pg_trigger WHERE NOT tgisinternal
UNION ALL SELECT 'version', version_num FROM alembic_version
ORDER BY 1, 2
"""


async def _run_migrate(database_url: str) -> tuple[int, str]:
    code, stdout, stderr = await run_cli("migrate", env=clean_env(ANALYTICS_DATABASE_URL=database_url))
    return code, stdout + stderr


async def _snapshot(database_url: str) -> list[tuple[str, str]]:
    connection = await asyncpg.connect(database_url)
    try:
        return [tuple(row) for row in await connection.fetch(SNAPSHOT)]
    finally:
        await connection.close()


@pytest.mark.slow
async def test_migrate_twice_in_a_row_is_idempotent(empty_database: str, database_url: str) -> None:
    first = await _run_migrate(empty_database)
    assert first[0] == 0, first[1]
    after_first = await _snapshot(empty_database)
    second = await _run_migrate(empty_database)
    assert second[0] == 0, second[1]
    assert f"database at migration {current_head()}" in second[1]
    assert await _snapshot(empty_database) == after_first
    assert after_first == await _snapshot(database_url)


@pytest.mark.slow
async def test_migrate_from_two_processes_at_once(empty_database: str, database_url: str) -> None:
    results = await asyncio.gather(_run_migrate(empty_database), _run_migrate(empty_database))
    for code, output in results:
        assert code == 0, output
    assert await _snapshot(empty_database) == await _snapshot(database_url)


async def test_migrate_without_database_url_fails_with_one_line() -> None:
    code, _, stderr = await run_cli("migrate", env=clean_env())
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "ANALYTICS_DATABASE_URL" in lines[0]
