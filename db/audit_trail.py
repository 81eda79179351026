"""The buffered audit trail of GraphQL operations.

Every GraphQL operation is recorded with the caller, the org it asked for and the outcome. Entries are
queued in memory and written every second (and when the process stops), so auditing costs a request no
database round trip. Actions whose record must never be missing (price changes, export requests, download
URLs) are not written here: they are audited in the same transaction as the action (``db.audit.record``).

A failing write never silences the trail. Values are made storable when queued (``AuditEntry.row``); if a
batch is refused for what it holds, its rows are written one by one and a row that still fails is replaced
by an ``audit.unstorable`` row carrying the database's reason. Only a lost connection puts the batch back,
to be retried. The queue is bounded; what overflows is counted (``analytics_audit_dropped_total``) and
logged, never silently lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections import deque
from collections.abc import Iterable
from typing import Any

import structlog
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from db.audit import AuditEntry, insert

log = structlog.get_logger(__name__)
BATCH_ROWS = 1000

__all__ = ["AuditEntry", "AuditTrail"]


class AuditMetrics:
    """What the trail did: rows written, batches that failed, rows dropped, and how many wait."""

    def __init__(self, meter: Meter, trail: AuditTrail) -> None:
        self.written = meter.create_counter("analytics_audit_rows_written", unit="1", description="Audit rows written.")
        self.failures = meter.create_counter(
            "analytics_audit_write_failures", unit="1", description="Audit writes that failed (reason label)."
        )
        self.dropped = meter.create_counter(
            "analytics_audit_dropped", unit="1", description="Audit rows lost (queue overflow, unstorable row)."
        )
        self._trail = trail
        meter.create_observable_gauge(
            "analytics_audit_queued_rows", callbacks=[self._observe], unit="1", description="Audit rows waiting."
        )

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._trail.queued)]


class AuditTrail:
    """Queues entries and writes them in batches; ``stop`` writes what is left."""

    def __init__(
        self, engine: AsyncEngine, meter: Meter, *, interval_s: float = 1.0, max_queued: int = 100_000
    ) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._queue: deque[dict[str, Any]] = deque()
        self._max_queued = max_queued
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.metrics = AuditMetrics(meter, self)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def record(self, entry: AuditEntry, at: dt.datetime) -> None:
        """Queue one entry (made storable now, so a queued row is bounded in size)."""
        if len(self._queue) >= self._max_queued:
            self._queue.popleft()
            self.metrics.dropped.add(1, {"reason": "queue_full"})
            log.error("audit.queue_full", dropped_oldest=True, queued=len(self._queue))
        self._queue.append(entry.row(at))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task
        try:
            await self.flush()
        except Exception:
            self.metrics.dropped.add(self.queued, {"reason": "shutdown"})
            log.error("audit.lost_at_shutdown", rows=self.queued, exc_info=True)

    async def flush(self) -> None:
        """Write every queued entry. A lost connection puts the current batch back and raises."""
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(BATCH_ROWS, len(self._queue)))]
            try:
                await self._write(batch)
            except Exception:
                self._queue.extendleft(reversed(batch))
                raise

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        try:
            async with self._engine.begin() as connection:
                await insert(connection, batch)
        except DBAPIError as exc:
            if exc.connection_invalidated or not _is_row_error(exc):
                self.metrics.failures.add(1, {"reason": "connection"})
                raise
            self.metrics.failures.add(1, {"reason": "row"})
            log.warning("audit.batch_refused", rows=len(batch), error=_reason(exc))
            await self._write_one_by_one(batch)
            return
        self.metrics.written.add(len(batch))

    async def _write_one_by_one(self, batch: list[dict[str, Any]]) -> None:
        """Each row in its own transaction; a row the database still refuses is replaced by a row saying so."""
        for row in batch:
            try:
                async with self._engine.begin() as connection:
                    await insert(connection, [row])
            except DBAPIError as exc:
                if exc.connection_invalidated or not _is_row_error(exc):
                    raise
                await self._write_unstorable(row, _reason(exc))
            else:
                self.metrics.written.add(1)

    async def _write_unstorable(self, row: dict[str, Any], reason: str) -> None:
        entry = AuditEntry(
            actor=row["actor"], action="audit.unstorable", outcome=row["outcome"], org_id=None,
            target=row["action"], detail={"error": reason},
        )  # fmt: skip
        try:
            async with self._engine.begin() as connection:
                await insert(connection, [entry.row(row["at"])])
        except DBAPIError as exc:
            if exc.connection_invalidated or not _is_row_error(exc):
                raise
            self.metrics.dropped.add(1, {"reason": "unstorable"})
            log.error("audit.row_dropped", action=row["action"], error=_reason(exc))
        else:
            self.metrics.written.add(1)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)
            try:
                await self.flush()
            except Exception:
                log.warning("audit.flush_failed", queued=self.queued, exc_info=True)


def _is_row_error(exc: DBAPIError) -> bool:
    """Whether the database refused what the rows hold (SQLSTATE class 22 data exception, 23 integrity,
    54 program limit exceeded) rather than failing as a service (connection, shutdown, timeouts)."""
    state = getattr(exc.orig, "sqlstate", None) or getattr(getattr(exc.orig, "__cause__", None), "sqlstate", None)
    return isinstance(state, str) and state[:2] in ("22", "23", "54")


def _reason(exc: DBAPIError) -> str:
    return str(exc.orig).splitlines()[0][:300] if exc.orig is not None else type(exc).__name__
