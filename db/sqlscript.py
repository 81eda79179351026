"""Run a multi-statement SQL script inside a migration's transaction.

asyncpg prepares every statement it is given through SQLAlchemy, and prepared
statements hold one command; a script goes to the driver's own ``execute``,
on the same connection and so in the same transaction.
"""

from __future__ import annotations

from alembic import op
from sqlalchemy.util import await_only


def run_script(sql: str) -> None:
    driver_connection = op.get_bind().connection.driver_connection
    assert driver_connection is not None
    await_only(driver_connection.execute(sql))
