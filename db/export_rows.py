"""The rows of an export, read in one consistent snapshot through a server-side cursor.

:func:`snapshot` opens a read-only REPEATABLE READ transaction on a connection of its own: every statement in
it sees the database as of its first statement, whose ``clock_timestamp()`` is recorded as the instant the
export's data was cut at (``snapshot_at``). Events committed later are not in the file, even when their
event time falls inside the window; ``verify-export`` names them.

COST rows are exactly what ``usage`` sums (the same statement, :func:`db.usage.usage_statement`, grouped by
UTC day, project and model), so the file reconciles with the API to the last decimal; INCIDENT rows are
:data:`db.exports.INCIDENT_ROWS`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from db.exports import INCIDENT_ROWS, IncidentSelection
from db.usage import UsageQuery, driver_connection, usage_statement

PREFETCH = 5000  # rows per cursor round trip: bounds memory, keeps round trips few

# The COST columns of contract §5 in file order, then ``unpriced`` (whether a row's hours lacked a price;
# not a CSV column: it names the unpriced models in the totals). Sorted by org, project, model, day.
_COST = """
SELECT org_id, project_id, model, (bucket AT TIME ZONE 'UTC')::date AS day, requests, input_tokens,
       cached_input_tokens, output_tokens, spend, unpriced
FROM ({usage}) AS usage_rows
ORDER BY org_id COLLATE "C", project_id COLLATE "C" NULLS FIRST, model COLLATE "C", day
"""


def cost_statement(
    org_id: str | None, start: dt.datetime, end: dt.datetime, materialized_through: dt.datetime | None
) -> tuple[str, tuple[object, ...]]:
    """One org's (None: every org's) usage and spend in [start, end) by UTC day, project and model."""
    query = UsageQuery(
        org_id=org_id, start=start, end=end, granularity="DAY", time_zone="UTC",
        group_by=frozenset({"model", "project_id"}),
    )  # fmt: skip
    usage, args = usage_statement(query, materialized_through, ordered=False)
    return _COST.format(usage=usage), args


def incident_statement(selection: IncidentSelection) -> tuple[str, tuple[object, ...]]:
    return INCIDENT_ROWS, selection.args()


@dataclass(frozen=True)
class Snapshot:
    connection: asyncpg.Connection
    taken_at: dt.datetime
    materialized_through: dt.datetime | None

    async def rows(self, sql: str, args: Sequence[object], prefetch: int = PREFETCH) -> AsyncIterator[asyncpg.Record]:
        """The statement's rows, ``prefetch`` at a time (a server-side cursor in the snapshot's transaction)."""
        async for record in self.connection.cursor(sql, *args, prefetch=prefetch):
            yield record


@asynccontextmanager
async def snapshot(engine: AsyncEngine) -> AsyncIterator[Snapshot]:
    """A read-only REPEATABLE READ snapshot on a connection of ``engine`` (no statement timeout: the workers'
    pool), with its instant and the rollup watermark as of it."""
    async with engine.connect() as connection:
        raw = await driver_connection(connection)
        transaction = raw.transaction(isolation="repeatable_read", readonly=True)
        await transaction.start()
        try:
            # The first statement takes the snapshot; clock_timestamp() is read while it runs.
            taken_at = await raw.fetchval("SELECT clock_timestamp()")
            through = await raw.fetchval("SELECT materialized_through FROM rollup_state")
            yield Snapshot(raw, taken_at, through)
        except BaseException:
            # On a connection the server closed, a rollback would fail and its error hide the real cause.
            if not raw.is_closed():
                await transaction.rollback()
            raise
        await transaction.commit()
