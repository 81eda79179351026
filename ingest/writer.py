"""The one write path for AMQP and HTTP: a batch of valid events, committed once.

After the commit, each org that got new events is announced on the pub/sub
channel ``freshness:{org_id}`` for the freshness subscription.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import asyncpg.exceptions._base as asyncpg_base
import structlog
from msgspec import UNSET
from sqlalchemy.ext.asyncio import AsyncEngine

from db.events import Inserted, OrgIngested, Record, begin_batch, ensure_partitions, insert_batch, record_batch
from ingest import freshness
from ingest.events import UsageEvent, stored
from ingest.metrics import IngestMetrics
from kernel.cache import Cache
from kernel.pubsub import PubSub

log = structlog.get_logger(__name__)
CONNECTION_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)
# SQLSTATE classes a row's own values cause: 22 data exception (NUL, untranslatable character,
# numeric out of range, ...), 23 integrity constraint violation (CHECK, NOT NULL). Any other
# failure (connection, serialization, deadlock, shutdown, a missing table) says nothing about
# one row and is retried: dead-lettering on it would throw away good events.
ROW_ERROR_CLASSES = ("22", "23")


# asyncpg's client-side DataError: a value it cannot encode for its column (e.g. an int beyond int8).
CLIENT_ROW_ERRORS = (UnicodeEncodeError, OverflowError, asyncpg_base.DataError)


def is_row_error(exc: BaseException) -> bool:
    """A failure that the same rows will meet on every attempt."""
    if isinstance(exc, CLIENT_ROW_ERRORS):
        return True
    return isinstance(exc, asyncpg.PostgresError) and str(exc.sqlstate or "")[:2] in ROW_ERROR_CLASSES


@dataclass(frozen=True)
class Poisoned:
    """An event the database refused on its own: its position in the batch and the database's reason."""

    index: int
    reason: str


@dataclass
class Isolated:
    """What :meth:`EventWriter.write_isolating` committed and what it set aside."""

    results: list[WriteResult]
    poisoned: list[Poisoned]

    @property
    def accepted(self) -> int:
        return sum(r.accepted for r in self.results)

    @property
    def duplicates(self) -> int:
        return sum(r.duplicates for r in self.results)


@dataclass(frozen=True)
class WriteResult:
    batch_id: int
    accepted: int
    duplicates: int
    orgs: list[OrgIngested]
    by_model_and_class: dict[tuple[str, int], int] = field(default_factory=dict)  # new events, for the SLO counter


def to_record(ordinal: int, event: UsageEvent) -> Record:
    data = event.data
    return (
        ordinal, data.org_id, event.time, event.source, event.id, stored(data.project_id), stored(data.api_key_id),
        data.model, data.input_tokens, data.cached_input_tokens, data.output_tokens, data.latency_ms,
        None if data.ttft_ms is UNSET else data.ttft_ms, data.status_code, stored(data.error_type),
        stored(data.region),
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
        self._metrics.platform.add(result.by_model_and_class)
        await freshness.announce(self._cache, self._pubsub, {o.org_id: o.last_at for o in result.orgs})
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
        inserted = await insert_batch(raw, batch_id, records) if records else Inserted([], {})
        orgs = inserted.orgs
        accepted = sum(o.events for o in orgs)
        duplicates = len(records) - accepted
        await record_batch(
            raw, batch_id=batch_id, channel=channel, orgs=orgs,
            duplicates=duplicates, rejected=rejected, started_at=started_at,
        )  # fmt: skip
        return WriteResult(batch_id, accepted, duplicates, orgs, inserted.by_model_and_class)

    async def write_isolating(self, events: Sequence[UsageEvent], *, channel: str, rejected: int = 0) -> Isolated:
        """Commit ``events``; when the database refuses some rows deterministically, split the
        batch in halves (recursively, first half first, so first write still wins) until each
        refused event stands alone, and return those with the database's reason. Other failures
        propagate (halves already committed are duplicates when the caller retries)."""
        outcome = Isolated([], [])
        spans = [(0, len(events))]
        while spans:
            start, end = spans.pop()
            try:
                outcome.results.append(await self.write(events[start:end], channel=channel, rejected=rejected))
                rejected = 0
            except Exception as exc:
                if not is_row_error(exc):
                    raise
                if end - start == 1:
                    outcome.poisoned.append(Poisoned(start, f"database refused the event: {_reason(exc)}"))
                    continue
                middle = (start + end) // 2
                spans += [(middle, end), (start, middle)]
        if outcome.poisoned:
            log.warning("ingest.events_isolated", channel=channel, poisoned=len(outcome.poisoned))
            self._metrics.count(channel, accepted=0, duplicates=0, rejected=len(outcome.poisoned))
        return outcome

    def _observe(self, channel: str, result: WriteResult, rejected: int, size: int, seconds: float) -> None:
        self._metrics.count(channel, accepted=result.accepted, duplicates=result.duplicates, rejected=rejected)
        self._metrics.batch_size.record(size, {"channel": channel})
        self._metrics.flush_seconds.record(seconds, {"channel": channel})


def _reason(exc: BaseException) -> str:
    """The database's message and SQLSTATE (never the row's values)."""
    sqlstate = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]} (SQLSTATE {sqlstate})"
