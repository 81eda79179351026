"""For the tests of single migrations on databases that hold data: one Alembic command (``upgrade`` or
``downgrade`` to a revision) on a test database, and what they check."""

from __future__ import annotations

from alembic import command
from sqlalchemy import Connection

from db.engine import create_engine
from db.migrate import alembic_config

# The columns of event_receipts' primary key, in order (migrations 0009 and 0011 change it).
RECEIPTS_KEY = """
SELECT array_agg(a.attname::text ORDER BY k.ord)
FROM pg_constraint c
CROSS JOIN unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
WHERE c.conrelid = 'event_receipts'::regclass AND c.contype = 'p'
"""


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
