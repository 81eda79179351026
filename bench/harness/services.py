"""Where the benchmarks find PostgreSQL, RabbitMQ and Redis, and what they do on the database server."""

from __future__ import annotations

import os

import asyncpg

from bench.postgres import admin_url

ADMIN_URL = admin_url()  # ANALYTICS_BENCH_POSTGRES_URL, else the Unix socket (bench/postgres.py)
AMQP_URL = os.environ.get("ANALYTICS_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("ANALYTICS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def database_url(name: str) -> str:
    """The URL of database ``name`` on the benchmark's server."""
    return ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


async def admin(sql: str) -> None:
    """Run ``sql`` on the maintenance database (CREATE / DROP DATABASE)."""
    connection = await asyncpg.connect(ADMIN_URL)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def server_counters() -> dict[str, int]:
    """The server's WAL position (bytes) and checkpoint counts."""
    connection = await asyncpg.connect(ADMIN_URL)
    try:
        row = await connection.fetchrow(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint AS wal_lsn, checkpoints_timed, "
            "checkpoints_req FROM pg_stat_bgwriter"
        )
    finally:
        await connection.close()
    assert row is not None
    return {k: int(v) for k, v in dict(row).items()}
