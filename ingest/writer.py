"""The one write path for AMQP and HTTP: a batch of valid events, committed once.

After the commit, each org that got new events is announced on the pub/sub
channel ``freshness:{org_id}`` for the freshness subscription.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import orjson
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from db.events import OrgIngested, Record, begin_batch, ensure_partitions, insert_batch, record_batch
from db.freshness import freshness_key
from gateway.cache import Cache
from gateway.pubsub import PubSub
from ingest.events import UsageEvent
from ingest.metrics import IngestMetrics

log = structlog.get_logger(__name__)
CONNECTION_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)


@dataclass(frozen=True)
class WriteResult:
    batch_id: int
    accepted: int
    duplicates: int
    orgs: list[OrgIngested]


def to_record(ordinal: int, event: UsageEvent) -> Record:
    data = event.data
    return (
        ordinal, data.org_id, event.time, event.source, event.id, data.project_id, data.api_key_id, data.model,
        data.input_tokens, data.cached_input_tokens, data.output_tokens, data.latency_ms, data.ttft_ms,
        data.status_code, data.error_type, data.region,
    )  # fmt: skip


class EventWriter:
    """Writes batches through the shared engine; safe to call concurrently."""

    def __init__(self, engine: AsyncEngine, pubsub: PubSub | None, cache: Cache | None, metrics: IngestMetrics) -> None:
        self._engine = engine
        self._pubsub = pubsub
        self._cache = cache
        self._metrics = metrics
        self._known_days: set[dt.date] = set()

    async def write(self, events: Sequence[UsageEvent], *, channel: str, rejected: int = 0) -> WriteResult:
        """Commit ``events`` (duplicates are skipped); returns what was new."""
        started_at, clock = dt.datetime.now(dt.UTC), time.perf_counter()
        records = [to_record(i, e) for i, e in enumerate(events)]
        days = {e.time.astimezone(dt.UTC).date() for e in events}
        async with self._engine.connect() as connection:
            raw = (await connection.get_raw_connection()).driver_connection
            assert raw is not None
            try:
                async with raw.transaction():
                    result = await self._write(raw, records, days, channel, rejected, started_at)
            except CONNECTION_ERRORS:
                await connection.invalidate()
                raise
        self._known_days |= days
        self._observe(channel, result, rejected, len(events), time.perf_counter() - clock)
        await self._announce(result.orgs)
        return result

    async def _write(
        self,
        raw: asyncpg.Connection,
        records: list[Record],
        days: set[dt.date],
        channel: str,
        rejected: int,
        started_at: dt.datetime,
    ) -> WriteResult:
        if missing := sorted(days - self._known_days):
            await ensure_partitions(raw, missing)
        batch_id = await begin_batch(raw)
        orgs = await insert_batch(raw, batch_id, records) if records else []
        accepted = sum(o.events for o in orgs)
        duplicates = len(records) - accepted
        await record_batch(
            raw, batch_id=batch_id, channel=channel, orgs=orgs,
            duplicates=duplicates, rejected=rejected, started_at=started_at,
        )  # fmt: skip
        return WriteResult(batch_id, accepted, duplicates, orgs)

    def _observe(self, channel: str, result: WriteResult, rejected: int, size: int, seconds: float) -> None:
        self._metrics.count(channel, accepted=result.accepted, duplicates=result.duplicates, rejected=rejected)
        self._metrics.batch_size.record(size, {"channel": channel})
        self._metrics.flush_seconds.record(seconds, {"channel": channel})

    async def _announce(self, orgs: list[OrgIngested]) -> None:
        """Best effort: the data is committed; a lost announcement only delays a push."""
        try:
            if self._cache is not None and orgs:
                await self._cache.delete(*(freshness_key(org.org_id) for org in orgs))
            for org in orgs if self._pubsub is not None else ():
                message = orjson.dumps({"org_id": org.org_id, "last_event_at": org.last_at.isoformat()})
                await self._pubsub.publish(freshness_key(org.org_id), message)  # type: ignore[union-attr]
        except Exception:
            log.warning("ingest.announce_failed", orgs=len(orgs), exc_info=True)
