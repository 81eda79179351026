"""Freshness inputs in SQL: per org times, the rollup watermark, ingester heartbeats (``ingest/freshness.py``
owns what they mean, the cache and the announcements; ``ingest/heartbeat.py`` writes and prunes the beats).

A heartbeat row is ``<host>/<pid>/<queue>``: the queue an ingester consumes is the part after the second
slash (:data:`QUEUE_OF`). A row counts for freshness until it is deleted: by its ingester at a clean stop, or
by a live ingester of the same queue once the broker shows that row's consumer gone (or by any live ingester
once the row's queue no longer exists). So when no ingester is left, the last rows stay and the lag grows
from how far they were caught up.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

# The queue of a heartbeat row, from its instance name (NULL for a name not of that shape).
QUEUE_OF = "substring(instance from '^[^/]*/[^/]*/(.*)$')"


@dataclass(frozen=True)
class FreshnessRow:
    org_id: str
    last_event_at: dt.datetime | None
    last_ingested_at: dt.datetime | None
    materialized_through: dt.datetime | None
    # The oldest "caught up through" of the ingesters' rows, and the newest beat (both null: no AMQP ingester).
    caught_up_through: dt.datetime | None
    last_beat_at: dt.datetime | None


LOAD = """
SELECT o.org_id, f.last_event_at, f.last_ingested_at, s.materialized_through, hb.caught_up, hb.last_beat
FROM unnest(CAST(:orgs AS text[])) AS o(org_id)
LEFT JOIN freshness_status f ON f.org_id = o.org_id
CROSS JOIN rollup_state s
CROSS JOIN (SELECT min(caught_up_through) AS caught_up, max(beat_at) AS last_beat FROM ingest_heartbeats) AS hb
"""


async def load_freshness(connection: AsyncConnection, org_ids: Sequence[str]) -> list[FreshnessRow]:
    """One row per org id, in order (orgs with no data get nulls)."""
    result = await connection.execute(text(LOAD), {"orgs": list(org_ids)})
    return [FreshnessRow(*row) for row in result]


async def beat(connection: AsyncConnection, instance: str, caught_up_through: dt.datetime) -> None:
    """An ingester's heartbeat: alive now, and caught up through that instant."""
    await connection.execute(
        text(
            "INSERT INTO ingest_heartbeats (instance, beat_at, caught_up_through) VALUES (:i, now(), :c) "
            "ON CONFLICT (instance) DO UPDATE SET beat_at = now(), caught_up_through = excluded.caught_up_through"
        ),
        {"i": instance, "c": caught_up_through},
    )
    await connection.commit()


PRUNE = f"""
WITH queue_rows AS (
    SELECT instance, beat_at FROM ingest_heartbeats WHERE {QUEUE_OF} = :queue
), gone AS (
    SELECT instance FROM queue_rows
    WHERE instance <> :me AND beat_at < now() - make_interval(secs => :lease_s)
    ORDER BY beat_at
    LIMIT greatest(0, (SELECT count(*) FROM queue_rows) - :consumers)
)
DELETE FROM ingest_heartbeats h
WHERE h.instance IN (SELECT instance FROM gone)
   OR ({QUEUE_OF} = :queue AND h.instance <> :me AND h.beat_at < now() - make_interval(secs => :forget_s))
RETURNING h.instance
"""


async def prune(
    connection: AsyncConnection, me: str, queue: str, consumers: int, lease_s: float, forget_s: float
) -> list[str]:
    """Delete the rows of ``queue``'s ingesters that are gone; returns their instances.

    ``consumers`` is what the broker reports on the queue. With fewer consumers than rows, as many rows as
    are missing go, the longest silent first, and only rows silent for ``lease_s`` (a starting or stopping
    ingester, whose consumer and row come and go a beat apart, keeps its row). Rows silent for ``forget_s``
    go whatever the count says (a consumer the broker counts may not be a gateway's)."""
    result = await connection.execute(
        text(PRUNE),
        {"me": me, "queue": queue, "consumers": consumers, "lease_s": lease_s, "forget_s": forget_s},
    )
    gone = [str(row[0]) for row in result]
    await connection.commit()
    return gone


async def silent_queues(connection: AsyncConnection, queue: str, silent_s: float) -> list[str]:
    """Queues other than ``queue`` with rows but no beat for ``silent_s``: ingesters there may all be gone."""
    result = await connection.execute(
        text(
            f"SELECT {QUEUE_OF} AS q FROM ingest_heartbeats WHERE {QUEUE_OF} <> :queue GROUP BY 1 "
            "HAVING max(beat_at) < now() - make_interval(secs => :silent_s)"
        ),
        {"queue": queue, "silent_s": silent_s},
    )
    return [str(row[0]) for row in result]


async def forget_queue(connection: AsyncConnection, queue: str) -> int:
    """Delete the rows of a queue that no longer exists; returns how many."""
    result = await connection.execute(
        text(f"DELETE FROM ingest_heartbeats WHERE {QUEUE_OF} = :queue"), {"queue": queue}
    )
    await connection.commit()
    return int(result.rowcount)


LEAVE = f"""
DELETE FROM ingest_heartbeats WHERE instance = :me AND EXISTS (
    SELECT 1 FROM ingest_heartbeats
    WHERE {QUEUE_OF} = :queue AND instance <> :me AND beat_at > now() - make_interval(secs => :lease_s)
)
"""


async def leave(
    connection: AsyncConnection, me: str, queue: str, lease_s: float, caught_up_through: dt.datetime | None
) -> bool:
    """A cleanly stopped ingester: its row goes if another ingester of ``queue`` beat within ``lease_s``;
    otherwise it stays as the last word on the queue, caught up through ``caught_up_through`` (None: as it
    is). Returns whether the row went."""
    deleted = (await connection.execute(text(LEAVE), {"me": me, "queue": queue, "lease_s": lease_s})).rowcount
    if not deleted and caught_up_through is not None:
        await connection.execute(
            text("UPDATE ingest_heartbeats SET beat_at = now(), caught_up_through = :c WHERE instance = :me"),
            {"me": me, "c": caught_up_through},
        )
    await connection.commit()
    return bool(deleted)


async def queue_caught_up(connection: AsyncConnection, queue: str) -> dt.datetime | None:
    """How far ``queue``'s ingesters, live or last seen, are caught up (the oldest of their rows)."""
    result = await connection.execute(
        text(f"SELECT min(caught_up_through) FROM ingest_heartbeats WHERE {QUEUE_OF} = :queue"), {"queue": queue}
    )
    value: dt.datetime | None = result.scalar_one()
    return value
