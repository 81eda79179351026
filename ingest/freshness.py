"""Freshness: how current an org's answers are. The one owner of its cache key and pub/sub channel, of the
cached encoding, of reading it (cache, then the database), of invalidating and announcing it after a commit,
of turning it into a lag and a status, and of where the rollups end for the readers of usage.

How usage knows where the rollups end: ``materialized_through`` of the org's freshness row (read with it, in
one statement, and cached with it for ``freshness_cache_ttl_s``); readers with no org (``spendByOrg``) call
:func:`rollup_watermark`. Both come from ``rollup_state`` (``db/rollup.py`` moves it).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from enum import StrEnum

import orjson
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from db.freshness import FreshnessRow, load_freshness
from db.rollup import watermarks
from kernel.cache import Cache
from kernel.pubsub import PubSub
from kernel.settings import Settings

log = structlog.get_logger(__name__)


class Status(StrEnum):
    FRESH = "FRESH"
    DELAYED = "DELAYED"
    STALE = "STALE"


def key(org_id: str) -> str:
    """The cache key of an org's freshness, which is also its pub/sub channel."""
    return f"freshness:{org_id}"


def assess(row: FreshnessRow, settings: Settings, now: dt.datetime) -> tuple[float, Status]:
    """Seconds of lag and the status. Lag is measured to the instant up to which ingested data is queryable:
    how far the AMQP ingesters are caught up, the oldest of their heartbeat rows. Rows of ingesters that are
    gone are deleted (``ingest/heartbeat.py``), except the last ones of a queue nobody consumes any more,
    whose lag therefore grows; with no row at all, now (no AMQP ingester: HTTP ingestion answers after its
    commit)."""
    if row.last_beat_at is None:
        queryable_through = now
    elif row.caught_up_through is not None:
        queryable_through = row.caught_up_through
    else:
        queryable_through = row.last_beat_at
    lag = max(0.0, (now - queryable_through).total_seconds())
    if lag < settings.freshness_fresh_s:
        return lag, Status.FRESH
    if lag < settings.freshness_stale_s:
        return lag, Status.DELAYED
    return lag, Status.STALE


async def read(engine: AsyncEngine, cache: Cache, settings: Settings, org_ids: Sequence[str]) -> list[FreshnessRow]:
    """Freshness per org, in order: from the cache, the misses from the database in one statement."""
    found: dict[str, FreshnessRow] = {}
    for org_id in org_ids:
        cached = await cache.get(key(org_id))
        if cached is not None:
            found[org_id] = _decode(cached)
    missing = [org_id for org_id in org_ids if org_id not in found]
    if missing:
        async with engine.connect() as connection:
            rows = await load_freshness(connection, missing)
        for row in rows:
            found[row.org_id] = row
            await cache.set(key(row.org_id), orjson.dumps(row), settings.freshness_cache_ttl_s)
    return [found[org_id] for org_id in org_ids]


async def rollup_watermark(connection: AsyncConnection) -> dt.datetime | None:
    """Rollups are complete before this instant (later data is read from raw events)."""
    return (await watermarks(connection)).materialized_through


async def announce(cache: Cache | None, pubsub: PubSub | None, newest: dict[str, dt.datetime]) -> None:
    """After a commit: drop the cached freshness of each org that got events and tell its subscribers
    (``newest``: org id to its newest event time). Best effort: the data is committed, and a lost
    announcement only delays a push until the next one or the periodic refresh."""
    try:
        if cache is not None and newest:
            await cache.delete(*(key(org_id) for org_id in newest))
        for org_id, last_at in newest.items() if pubsub is not None else ():
            message = orjson.dumps({"org_id": org_id, "last_event_at": last_at.isoformat()})
            await pubsub.publish(key(org_id), message)  # type: ignore[union-attr]
    except Exception:
        log.warning("freshness.announce_failed", orgs=len(newest), exc_info=True)


def subscribe(pubsub: PubSub, org_id: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
    """Announcements for one org, as :func:`announce` sends them."""
    return pubsub.subscribe([key(org_id)])


def _decode(data: bytes) -> FreshnessRow:
    raw: dict[str, str | None] = orjson.loads(data)

    def time(name: str) -> dt.datetime | None:
        value = raw[name]
        return dt.datetime.fromisoformat(value) if value is not None else None

    return FreshnessRow(
        org_id=str(raw["org_id"]),
        last_event_at=time("last_event_at"),
        last_ingested_at=time("last_ingested_at"),
        materialized_through=time("materialized_through"),
        caught_up_through=time("caught_up_through"),
        last_beat_at=time("last_beat_at"),
    )
