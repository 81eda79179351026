"""The export worker (``serve --role export``): claim a job, write its file under a renewed lease, record the
outcome, announce every status change. Any number of workers may run, in any processes.

One attempt:

1. ``claim`` (``FOR UPDATE SKIP LOCKED``): the oldest runnable job becomes RUNNING, leased to this worker,
   one more attempt; jobs whose last attempt's worker died are FAILED on the way.
2. Under a :class:`~exports.job_lease.LeaseKeeper`: abort uploads a dead attempt left under the key, then
   :func:`~exports.export_file.write_export`. Before the upload is completed the lease is renewed, fenced by
   owner and attempt: a worker that lost its job (cancelled, or taken over after its lease expired) aborts
   instead of overwriting the file of the worker that took it over.
3. SUCCEEDED with the file's sums and checksum (fenced too; if the job was cancelled in between, the object
   is deleted). A failure ends the attempt: QUEUED again after the retry policy's backoff, or FAILED with a
   human-readable reason when no attempts are left. A lost lease leaves the job alone (it is someone else's).

On shutdown the attempt in progress may finish within the grace period; past it, it is aborted and the job
goes back to QUEUED (the attempt counts) for the next worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import structlog
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from db import exports as queries
from db.exports import ExportJobRow, Lease, Outcome
from exports import csv_format
from exports.export_file import Written, write_export
from exports.job_events import announce_job, subscribe_job
from exports.job_lease import LeaseKeeper, LeaseLost
from exports.jobs import RetryPolicy, claim, fail_attempt, lease_of
from exports.metrics import ExportMetrics
from exports.storage.keys import key_for
from exports.storage.protocol import Storage
from kernel.pubsub import PubSub
from kernel.settings import Settings

log = structlog.get_logger(__name__)
RELEASE_TIMEOUT_S = 5.0


class LeaseCheckFailed(LeaseLost):
    """The fenced renewal before completing the upload found the job no longer this worker's."""


def new_owner() -> str:
    """A worker's name in leases: host, process and a random part (two workers in one process differ)."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def policy_of(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=settings.export_max_attempts,
        base=dt.timedelta(seconds=settings.export_retry_base_s),
        cap=dt.timedelta(seconds=settings.export_retry_max_s),
    )


def describe_failure(error: BaseException) -> str:
    """What went wrong, for the job's ``error`` (read by finance and on-call): the peer and what it said, never
    a credential (exception texts of the store and the driver name hosts and codes, not secrets)."""
    if isinstance(error, ClientError):
        answer = error.response.get("Error", {})
        return f"the export store refused the upload: {answer.get('Code', '?')} ({answer.get('Message', '')})"
    if isinstance(error, BotoCoreError):
        return f"the export store could not be reached: {error}"
    if isinstance(error, (asyncpg.PostgresError, asyncpg.InterfaceError, SQLAlchemyError)):
        return f"the database failed while reading the rows: {type(error).__name__}: {error}"
    if isinstance(error, (OSError, TimeoutError)):
        return f"a connection failed: {type(error).__name__}: {error}"
    return f"internal error: {type(error).__name__}: {error}"


class ExportWorker:
    def __init__(
        self,
        engine: AsyncEngine,
        storage: Storage,
        pubsub: PubSub | None,
        settings: Settings,
        metrics: ExportMetrics,
        *,
        owner: str | None = None,
        part_size: int = csv_format.PART_SIZE,
    ) -> None:
        self.owner = owner or new_owner()
        self._engine = engine
        self._storage = storage
        self._pubsub = pubsub
        self._metrics = metrics
        self._policy = policy_of(settings)
        self._lease = dt.timedelta(seconds=settings.export_lease_s)
        self._retention = dt.timedelta(days=settings.export_retention_days)
        self._poll_s = settings.export_poll_s
        self._part_size = part_size
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def storage(self) -> Storage:
        return self._storage

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"export worker {self.owner}")

    async def stop(self, grace_s: float) -> None:
        """Let the attempt in progress finish within ``grace_s``; past that it is aborted and released."""
        self._stopping.set()
        if self._task is None:
            return
        release_s = min(RELEASE_TIMEOUT_S, grace_s / 2)  # the attempt, then its release, within grace_s
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_s - release_s)
        except TimeoutError:
            log.warning("exports.worker_stopped_unfinished", owner=self.owner)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, release_s)

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                worked = await self.run_once()
            except Exception as error:  # e.g. the database down: logged in one line, tried again after the poll
                expected = _expected(error)
                log.warning("exports.cycle_failed", owner=self.owner, error=describe_failure(error),
                            exc_info=not expected)  # fmt: skip
                worked = None
            if worked is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self._poll_s)

    async def run_once(self) -> ExportJobRow | None:
        """Claim one job and run one attempt of it; the job as it ended the attempt (None: nothing to do)."""
        async with self._engine.begin() as connection:
            job, abandoned = await claim(connection, self.owner, self._lease, self._policy)
        for row in abandoned:
            self._metrics.failed.add(1, {"kind": row.kind.lower()})
            log.warning("exports.job_failed", job_id=str(row.id), kind=row.kind, error=row.error)
            await announce_job(self._pubsub, row)
        if job is None:
            return None
        await announce_job(self._pubsub, job)
        return await self._attempt(job)

    async def _attempt(self, job: ExportJobRow) -> ExportJobRow:
        lease = lease_of(job)
        started = time.monotonic()
        log.info("exports.attempt_started", job_id=str(job.id), kind=job.kind, attempt=job.attempts)
        outcome = "succeeded"
        try:
            ended = await self._run(job, lease)
        except LeaseLost as lost:
            outcome = "lost"
            log.info("exports.attempt_abandoned", job_id=str(job.id), attempt=lease.attempt, reason=str(lost))
            return job
        except asyncio.CancelledError:
            outcome = "stopped"
            await self._release(lease, "the worker stopped during the attempt (shutdown)")
            raise
        except Exception as error:
            reason = describe_failure(error)
            log.warning("exports.attempt_failed", job_id=str(job.id), attempt=lease.attempt, error=reason,
                        exc_info=not _expected(error))  # fmt: skip
            async with self._engine.begin() as connection:
                failed = await fail_attempt(connection, lease, reason, self._policy)
            if failed is None:
                outcome = "lost"
                return job
            outcome = "failed" if failed.status == queries.FAILED else "retried"
            await announce_job(self._pubsub, failed)
            return failed
        finally:
            self._metrics.attempt(job.kind, outcome, time.monotonic() - started)
        return ended

    async def _run(self, job: ExportJobRow, lease: Lease) -> ExportJobRow:
        key = key_for(job.org_id, job.created_at, job.id)

        async def still_mine() -> None:  # fenced: the lease is held and now lasts a whole lease again
            async with self._engine.begin() as connection:
                if not await queries.renew_lease(connection, lease, self._lease):
                    raise LeaseCheckFailed("the job was cancelled or taken over before the upload completed")

        async with LeaseKeeper(self._engine, lease, self._lease) as keeper, self._watching(job, keeper):
            left = await self._storage.abort_incomplete(key)
            if left:
                log.info("exports.aborted_leftover_uploads", job_id=str(job.id), uploads=left)
            written = await write_export(
                self._engine, self._storage, job, key, before_complete=still_mine, part_size=self._part_size
            )
        return await self._succeed(job, lease, written)

    @contextlib.asynccontextmanager
    async def _watching(self, job: ExportJobRow, keeper: LeaseKeeper) -> AsyncIterator[None]:
        """While the attempt runs, any announcement about the job (a cancel, from any replica) makes the keeper
        check the lease at once. Best effort: without pub/sub, the periodic renewal notices it."""
        if self._pubsub is None:
            yield
            return
        pubsub = self._pubsub

        async def listen() -> None:
            try:
                async with subscribe_job(pubsub, job.id) as messages:
                    async for _ in messages:
                        keeper.renew_now()
            except Exception:  # the periodic renewal still notices
                log.info("exports.job_watch_failed", job_id=str(job.id), exc_info=True)

        watcher = asyncio.create_task(listen(), name=f"watch export job {job.id}")
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _succeed(self, job: ExportJobRow, lease: Lease, written: Written) -> ExportJobRow:
        outcome = Outcome(
            row_count=written.row_count, totals=written.totals.to_json(), checksum_sha256=written.sha256,
            object_key=written.key, snapshot_at=written.snapshot_at,
        )  # fmt: skip
        async with self._engine.begin() as connection:
            row = await queries.succeed_job(connection, lease, outcome, self._retention)
        if row is None:
            # Only a cancel can come between the fenced renewal and here (the lease was just extended), and
            # nobody writes a cancelled job's key: the object is removed so that no file outlives its job.
            await self._storage.delete(written.key)
            raise LeaseLost("the job was cancelled while its file was being completed")
        self._metrics.rows.add(written.row_count, {"kind": job.kind.lower()})
        log.info("exports.job_succeeded", job_id=str(job.id), kind=job.kind, rows=written.row_count,
                 bytes=written.size, attempt=lease.attempt)  # fmt: skip
        await announce_job(self._pubsub, row)
        return row

    async def _release(self, lease: Lease, reason: str) -> None:
        """Give the job back (QUEUED after the backoff, or FAILED if that was its last attempt), bounded: a
        release that can't be written leaves the lease to expire, and the next worker takes the job then."""
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S), self._engine.begin() as connection:
                row = await fail_attempt(connection, lease, reason, self._policy)
        except Exception:  # noqa: BLE001 - any failure: the lease expires instead
            log.warning("exports.release_failed", job_id=str(lease.job_id), left="the lease expires instead")
            return
        if row is not None:
            await announce_job(self._pubsub, row)


def _expected(error: BaseException) -> bool:
    """Failures of peers (a store or database error): no traceback in the log, the reason says it all."""
    return isinstance(error, (ClientError, BotoCoreError, asyncpg.PostgresError, asyncpg.InterfaceError,
                              SQLAlchemyError, OSError, TimeoutError))  # fmt: skip
