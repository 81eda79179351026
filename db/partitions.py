"""Daily partitions of ``usage_events``: created ahead, on demand, idempotently.

The SQL function ``analytics_ensure_usage_partition(day)`` (first migration)
does the work under a transaction-level advisory lock, so concurrent writers
never race to create the same partition.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


async def ensure_usage_partitions(connection: AsyncConnection, first: dt.date, last: dt.date) -> list[str]:
    """Make sure a partition exists for every UTC day in [first, last]; their names."""
    result = await connection.execute(
        text(
            "SELECT analytics_ensure_usage_partition(d::date) "
            "FROM generate_series(CAST(:first AS date), CAST(:last AS date), interval '1 day') AS d"
        ),
        {"first": first, "last": last},
    )
    return [row[0] for row in result]
