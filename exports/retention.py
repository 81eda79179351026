"""The retention sweeper: expire export files, drop raw partitions the rollups cover, prune event receipts.

Safe in any number of processes at once, and bounded per call (``SweepLimits``):

- expired jobs are taken with ``FOR UPDATE SKIP LOCKED`` (db/exports.py), so each goes to one sweeper, which
  deletes its object after the commit; a failed delete is logged and left to the store's lifecycle rule;
- a partition is dropped under the lock on ``usage_events`` after a re-check (db/retention.py): a second
  sweeper waiting for the same one finds it gone and moves on;
- receipts go in batches of ``SKIP LOCKED`` rows, each batch its own transaction.

The raw cut and the receipts' horizon are one instant: ``now - raw_retention_days - INGEST_GRACE``. Ingestion
refuses events older than ``raw_retention_days`` (ingest/events.py ``TimeWindow``), so no event accepted after
the cut can belong to a dropped partition or replay a pruned receipt; the grace covers a batch validated
before the cut and committed after it, and clocks that differ between hosts. See docs/retention.md.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from db import exports as export_queries
from db import retention as queries
from db.exports import ExportJobRow
from exports.job_events import announce_job
from exports.storage import Storage
from kernel.pubsub import PubSub
from kernel.settings import Settings

log = structlog.get_logger(__name__)

# How far behind the ingest window the cut stays (see the module docstring).
INGEST_GRACE = dt.timedelta(days=1)
LIFECYCLE_MARGIN_DAYS = 1


@dataclass(frozen=True)
class SweepLimits:
    """The most one sweep does, so that it ends quickly whatever the backlog (the next sweep goes on)."""

    jobs: int = 1000
    partitions: int = 31
    receipt_batch: int = 10_000
    receipt_batches: int = 100
    # How long a partition drop may wait for the lock on usage_events (every reader queues behind it meanwhile).
    lock_timeout: dt.timedelta = dt.timedelta(milliseconds=500)


@dataclass(frozen=True)
class SweepReport:
    """What one sweep did. ``partitions_waiting``: old partitions kept because the rollups do not cover them
    yet; ``partitions_busy``: the sweep stopped dropping because ``usage_events`` stayed locked."""

    raw_cut: dt.datetime
    expired_jobs: int = 0
    objects_deleted: int = 0
    object_delete_failures: int = 0
    partitions_dropped: tuple[str, ...] = ()
    partitions_waiting: int = 0
    partitions_busy: bool = False
    receipts_pruned: int = 0
    expired: tuple[ExportJobRow, ...] = field(default=(), repr=False)


def raw_cut(settings: Settings, now: dt.datetime) -> dt.datetime:
    """Raw partitions ending at or before this instant may be dropped, and receipts of events before it pruned."""
    return now - dt.timedelta(days=settings.raw_retention_days) - INGEST_GRACE


async def on_start(storage: Storage, settings: Settings) -> None:
    """Set the store's lifecycle rule: export objects expire after the retention, incomplete uploads after a
    day (the safety net under the sweeper's own deletes and a killed worker's uploads)."""
    # A day beyond the retention: S3 counts lifecycle days from the object's creation rounded to midnight UTC,
    # so the rule alone could remove a file shortly before its job's expires_at; the sweeper deletes on time.
    await storage.ensure_lifecycle(settings.export_retention_days + LIFECYCLE_MARGIN_DAYS)


async def sweep(
    engine: AsyncEngine,
    storage: Storage,
    settings: Settings,
    now: dt.datetime,
    pubsub: PubSub | None = None,
    limits: SweepLimits = SweepLimits(),
) -> SweepReport:
    """One bounded sweep (jobs expire by the database clock; the raw cut is computed from ``now``)."""
    cut = raw_cut(settings, now)
    expired, deleted, failed = await _expire_exports(engine, storage, pubsub, limits.jobs)
    dropped, waiting, busy = await _drop_partitions(engine, cut, limits)
    pruned = await _prune_receipts(engine, cut, limits)
    report = SweepReport(
        raw_cut=cut, expired_jobs=len(expired), objects_deleted=deleted, object_delete_failures=failed,
        partitions_dropped=tuple(dropped), partitions_waiting=waiting, partitions_busy=busy,
        receipts_pruned=pruned, expired=tuple(expired),
    )  # fmt: skip
    log.info(
        "retention.swept", raw_cut=cut.isoformat(), expired_jobs=len(expired), objects_deleted=deleted,
        object_delete_failures=failed, partitions_dropped=len(dropped), partitions_waiting=waiting,
        partitions_busy=busy, receipts_pruned=pruned,
    )  # fmt: skip
    return report


async def _expire_exports(
    engine: AsyncEngine, storage: Storage, pubsub: PubSub | None, limit: int
) -> tuple[list[ExportJobRow], int, int]:
    """Expire due jobs (committed first: no link is issued from then on), announce them, delete their objects."""
    async with engine.begin() as connection:
        expired = await export_queries.expire_jobs(connection, limit)
    deleted = failed = 0
    for row in expired:
        await announce_job(pubsub, row)
        if row.object_key is None:
            continue
        try:
            await storage.delete(row.object_key)
        except Exception:
            # The job is EXPIRED and no link reaches the object any more; the lifecycle rule removes it.
            failed += 1
            log.warning("retention.delete_failed", job_id=str(row.id), key=row.object_key, exc_info=True)
        else:
            deleted += 1
    return expired, deleted, failed


async def _drop_partitions(engine: AsyncEngine, cut: dt.datetime, limits: SweepLimits) -> tuple[list[str], int, bool]:
    async with engine.connect() as connection:
        old = await queries.old_partitions(connection, cut, limits.partitions)
    dropped: list[str] = []
    for partition in old.covered:
        try:
            async with engine.begin() as connection:  # one short transaction per partition
                if await queries.drop_partition(connection, partition, cut, limits.lock_timeout):
                    dropped.append(partition.name)
        except queries.LockBusy as busy:
            log.info("retention.partitions_busy", partition=partition.name, reason=str(busy))
            return dropped, old.waiting, True
    return dropped, old.waiting, False


async def _prune_receipts(engine: AsyncEngine, cut: dt.datetime, limits: SweepLimits) -> int:
    pruned = 0
    for _ in range(limits.receipt_batches):
        async with engine.begin() as connection:
            count = await queries.prune_receipts(connection, cut, limits.receipt_batch)
        pruned += count
        if count < limits.receipt_batch:
            break
    return pruned
