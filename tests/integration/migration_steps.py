"""One Alembic command (``upgrade`` or ``downgrade`` to a revision) on a test database, for the tests of single
migrations on databases that hold data."""

from __future__ import annotations

from alembic import command
from sqlalchemy import Connection

from db.engine import create_engine
from db.migrate import alembic_config


async def alembic(database_url: str, action: str, revision: str) -> None:
    """``action`` (``"upgrade"`` or ``"downgrade"``) to ``revision`` on ``database_url``."""
    engine = create_engine(database_url, pool_size=1)

    def run(connection: Connection) -> None:
        getattr(command, action)(alembic_config(connection), revision)

    try:
        async with engine.connect() as connection:
            await connection.run_sync(run)
            await connection.commit()
    finally:
        await engine.dispose()
