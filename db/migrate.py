"""Applying migrations (Alembic), safely from several processes at once.

``migrate`` holds a PostgreSQL advisory lock while Alembic runs, so a second
process waits and then finds nothing left to do. ``current_head`` and
``applied_revision`` let ``/readyz`` tell whether the database is current.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from db.locks import MIGRATION_LOCK_KEY
from db.partitions import ensure_usage_partitions

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
PARTITION_DAYS_AHEAD = 7


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def current_head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found"
    return head


async def applied_revision(connection: AsyncConnection) -> str | None:
    exists = await connection.scalar(text("SELECT to_regclass('alembic_version') IS NOT NULL"))
    if not exists:
        return None
    revision = await connection.scalar(text("SELECT version_num FROM alembic_version"))
    return str(revision) if revision is not None else None


async def migrate(engine: AsyncEngine) -> str:
    """Upgrade to the newest revision and create partitions ahead; returns it."""
    async with engine.connect() as connection:
        await connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        await connection.commit()
        try:
            await connection.run_sync(_upgrade)
            await connection.commit()
            today = dt.datetime.now(dt.UTC).date()
            await ensure_usage_partitions(
                connection, today - dt.timedelta(days=1), today + dt.timedelta(days=PARTITION_DAYS_AHEAD)
            )
            await connection.commit()
            revision = await applied_revision(connection)
        finally:
            await connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            await connection.commit()
    assert revision is not None
    return revision


def _upgrade(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")
