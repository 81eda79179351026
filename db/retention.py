"""Retention on the database side: which raw ``usage_events`` partitions may go, dropping one, and pruning
``event_receipts``. The rules (cuts, horizons, bounds per call) are in ``exports/retention.py``.

A raw partition may go only once the rollups cover it: its end is at or before the materialized watermark M
(``rollup_state.materialized_through``) and no ``rollup_dirty`` mark lies before its end. A dirty hour is
re-rolled from raw events (db/rollup.py), so dropping its events first would make the re-roll erase the
hour's rollups; and queries read dirty hours and everything from M on from raw events.

Dropping a partition locks ``usage_events`` ACCESS EXCLUSIVE (PostgreSQL takes that lock on the parent to
drop a partition). The lock is taken first, before anything else is read, in the order db/rollup.py's re-roll
and the writers use (``usage_events`` before the marks): once it is held no writer is inside a transaction
that touched ``usage_events``, so every mark a writer made is committed and visible to the re-check under the
lock. The wait is bounded by ``lock_timeout`` (a long export's COPY holds ``usage_events`` for its whole
snapshot; queued behind the drop, every reader would wait too); a partition that cannot be locked in time is
left for the next sweep.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

LOCK_NOT_AVAILABLE = "55P03"

# Range partitions of usage_events with their bounds, read from the catalog (the bounds print as timestamptz
# literals with their offset, so the cast back is exact in any session time zone). A DEFAULT partition or one
# bounded by MINVALUE/MAXVALUE does not match and is never a candidate.
_PARTITIONS = r"""
SELECT c.relname AS name, CAST(b.bounds[1] AS timestamptz) AS lower_bound,
       CAST(b.bounds[2] AS timestamptz) AS upper_bound
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL regexp_match(
    pg_get_expr(c.relpartbound, c.oid), 'FROM \(''([^'']+)''\) TO \(''([^'']+)''\)'
) AS b(bounds)
WHERE i.inhparent = CAST('usage_events' AS regclass) AND b.bounds IS NOT NULL
"""

# A partition is covered when M is at or past its end and no dirty mark lies before its end.
_COVERED = (
    "p.upper_bound <= (SELECT materialized_through FROM rollup_state) "
    "AND NOT EXISTS (SELECT 1 FROM rollup_dirty d WHERE d.hour < p.upper_bound)"
)


@dataclass(frozen=True)
class Partition:
    """One raw partition: ``name`` holds the events of [start, end)."""

    name: str
    start: dt.datetime
    end: dt.datetime


@dataclass(frozen=True)
class OldPartitions:
    """The partitions wholly before a cut: those the rollups cover (droppable, oldest first, at most the
    limit asked for) and how many others wait for the rollups (dirty hours or M not past their end)."""

    covered: list[Partition]
    waiting: int


async def old_partitions(connection: AsyncConnection, before: dt.datetime, limit: int) -> OldPartitions:
    """The partitions whose end is at or before ``before``, split by whether the rollups cover them."""
    result = await connection.execute(
        text(
            f"SELECT p.name, p.lower_bound, p.upper_bound, coalesce({_COVERED}, false) AS covered "
            f"FROM ({_PARTITIONS}) AS p WHERE p.upper_bound <= :before ORDER BY p.upper_bound, p.name"
        ),
        {"before": before},
    )
    rows = result.all()
    covered = [Partition(r.name, r.lower_bound, r.upper_bound) for r in rows if r.covered]
    return OldPartitions(covered=covered[:limit], waiting=len(rows) - len(covered))


async def drop_partition(
    connection: AsyncConnection, partition: Partition, before: dt.datetime, lock_timeout: dt.timedelta
) -> bool:
    """Drop ``partition`` if, under the lock, it still exists, still ends at or before ``before`` and the
    rollups still cover it; True when this call dropped it. Runs in the caller's transaction, which must be
    new and short (commit right after): the ACCESS EXCLUSIVE lock lasts until then. Raises
    :class:`LockBusy` when the lock is not granted within ``lock_timeout``."""
    milliseconds = max(1, int(lock_timeout.total_seconds() * 1000))
    await connection.execute(text(f"SET LOCAL lock_timeout = {milliseconds}"))
    try:
        await connection.execute(text("LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE"))
    except DBAPIError as error:
        if _sqlstate(error) == LOCK_NOT_AVAILABLE:
            raise LockBusy(f"usage_events is busy (lock not granted within {milliseconds} ms)") from error
        raise
    # A concurrent sweeper may have dropped it while this one waited: the re-check reads the catalog anew.
    still = await connection.scalar(
        text(
            f"SELECT count(*) FROM ({_PARTITIONS}) AS p "
            f"WHERE p.name = :name AND p.upper_bound <= :before AND {_COVERED}"
        ),
        {"name": partition.name, "before": before},
    )
    if not still:
        return False
    quoted = await connection.scalar(text("SELECT quote_ident(:name)"), {"name": partition.name})
    await connection.execute(text(f"DROP TABLE {quoted}"))
    return True


class LockBusy(Exception):
    """``usage_events`` could not be locked in time: other transactions hold it (try again later)."""


def _sqlstate(error: DBAPIError) -> str | None:
    return getattr(error.orig, "sqlstate", None) or getattr(getattr(error.orig, "__cause__", None), "sqlstate", None)


async def prune_receipts(connection: AsyncConnection, before: dt.datetime, batch: int) -> int:
    """Delete at most ``batch`` receipts of events older than ``before``; how many. Rows another pruner (or a
    writer meeting the same (source, id)) holds are skipped, so concurrent pruners never wait on each other.
    One statement per call: the caller commits between calls, so no transaction holds many row locks long."""
    result = await connection.execute(
        text(
            "WITH doomed AS (SELECT source, event_id FROM event_receipts WHERE event_time < :before "
            "LIMIT :batch FOR UPDATE SKIP LOCKED) "
            "DELETE FROM event_receipts r USING doomed d WHERE r.source = d.source AND r.event_id = d.event_id"
        ),
        {"before": before, "batch": batch},
    )
    return int(result.rowcount)
