"""The audit trail of GraphQL operations: buffered, written in batches.

Every operation is recorded with the caller, the org it asked for and the
outcome. Entries are queued in memory and written every second (and when the
process stops), so auditing costs a request no database round trip. Changes
that must never go unaudited (prices) are also audited in their own
transaction (db/audit.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

log = structlog.get_logger(__name__)

INSERT = text(
    "INSERT INTO audit_log (org_id, at, actor, action, target, outcome, detail) "
    "VALUES (:org_id, :at, :actor, :action, :target, :outcome, CAST(:detail AS jsonb))"
)


@dataclass(frozen=True)
class AuditEntry:
    actor: str
    action: str
    outcome: str
    org_id: str | None = None
    target: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class AuditTrail:
    """Queues entries and writes them in batches; ``stop`` writes what is left."""

    def __init__(self, engine: AsyncEngine, *, interval_s: float = 1.0, max_queued: int = 100_000) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._queue: deque[dict[str, Any]] = deque(maxlen=max_queued)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def record(self, entry: AuditEntry, at: Any) -> None:
        if len(self._queue) == self._queue.maxlen:
            log.error("audit.queue_full", dropped_oldest=True)
        self._queue.append({
            "org_id": entry.org_id, "at": at, "actor": entry.actor, "action": entry.action, "target": entry.target,
            "outcome": entry.outcome, "detail": orjson.dumps(entry.detail, default=str).decode(),
        })  # fmt: skip

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task
        await self.flush()

    async def flush(self) -> None:
        """Write every queued entry (a failed batch goes back to the front of the queue)."""
        if not self._queue:
            return
        batch = list(self._queue)
        self._queue.clear()
        try:
            async with self._engine.begin() as connection:
                await connection.execute(INSERT, batch)
        except Exception:
            self._queue.extendleft(reversed(batch))
            raise

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)
            try:
                await self.flush()
            except Exception:
                log.warning("audit.flush_failed", queued=len(self._queue), exc_info=True)
