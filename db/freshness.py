"""Freshness inputs in SQL: per org times, the rollup watermark, ingester heartbeats (``ingest/freshness.py``
owns what they mean, the cache and the announcements)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


@dataclass(frozen=True)
class FreshnessRow:
    org_id: str
    last_event_at: dt.datetime | None
    last_ingested_at: dt.datetime | None
    materialized_through: dt.datetime | None
    # The oldest "caught up through" of ingesters that beat within the live window, and the newest beat.
    caught_up_through: dt.datetime | None
    last_beat_at: dt.datetime | None


LOAD = """
SELECT o.org_id, f.last_event_at, f.last_ingested_at, s.materialized_through, hb.caught_up, hb.last_beat
FROM unnest(CAST(:orgs AS text[])) AS o(org_id)
LEFT JOIN freshness_status f ON f.org_id = o.org_id
CROSS JOIN rollup_state s
CROSS JOIN (
    SELECT min(caught_up_through) FILTER (WHERE beat_at > now() - make_interval(secs => :live_s)) AS caught_up,
           max(beat_at) AS last_beat
    FROM ingest_heartbeats
) AS hb
"""


async def load_freshness(connection: AsyncConnection, org_ids: Sequence[str], live_s: float) -> list[FreshnessRow]:
    """One row per org id, in order (orgs with no data get nulls)."""
    result = await connection.execute(text(LOAD), {"orgs": list(org_ids), "live_s": live_s})
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
