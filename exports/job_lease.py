"""Keeping a claimed job's lease while the work runs.

``async with LeaseKeeper(engine, lease, duration):`` renews the lease every ``every`` (a third of the lease
by default) on a connection of its own. When a renewal finds the lease gone (the job was cancelled, or it
was taken over after the lease expired), or no renewal succeeded before the lease would have expired (the
database unreachable), the body is cancelled and the block raises :class:`LeaseLost` with the reason: the
worker then aborts its upload and leaves the job alone (another worker, or nobody, owns it now).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Callable
from types import TracebackType

import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from db.exports import Lease, renew_lease

log = structlog.get_logger(__name__)


class LeaseLost(Exception):
    """The job is no longer this worker's."""


class LeaseKeeper:
    def __init__(
        self,
        engine: AsyncEngine,
        lease: Lease,
        duration: dt.timedelta,
        every: dt.timedelta | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if duration <= dt.timedelta(0):
            raise ValueError("the lease duration must be positive")
        self._engine = engine
        self._lease = lease
        self._duration = duration
        self._every = (every if every is not None else duration / 3).total_seconds()
        self._clock = clock
        self.lost = asyncio.Event()
        self.reason: str | None = None
        self._host: asyncio.Task[object] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._cancelled_host = False
        self._closing = False
        self._wake = asyncio.Event()

    async def __aenter__(self) -> LeaseKeeper:
        self._host = asyncio.current_task()
        self._renewer = asyncio.create_task(self._renew_until_lost(), name=f"lease {self._lease.job_id}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._closing = True  # from here on a loss is recorded, and the host no longer cancelled
        assert self._renewer is not None and self._host is not None
        self._renewer.cancel()
        await asyncio.wait([self._renewer])
        if not self._cancelled_host:
            return None
        if self._host.uncancel() > 0:
            return None  # cancelled from outside too: that cancellation goes on
        raise LeaseLost(self.reason) from exc

    def renew_now(self) -> None:
        """Renew at once rather than at the next period (a message said the job changed: a cancel is noticed
        within a round trip instead of a third of the lease)."""
        self._wake.set()

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease is known to be lost (for bodies that poll)."""
        if self.lost.is_set():
            raise LeaseLost(self.reason)

    async def _renew_until_lost(self) -> None:
        expires = self._clock() + self._duration.total_seconds()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._every)
            self._wake.clear()
            sent = self._clock()
            try:
                async with self._engine.begin() as connection:
                    held = await renew_lease(connection, self._lease, self._duration)
            except (SQLAlchemyError, OSError, TimeoutError) as error:
                log.warning("exports.lease_renewal_failed", job_id=str(self._lease.job_id), error=type(error).__name__)
                if self._clock() >= expires:
                    self._lose("the lease expired before it could be renewed (database unreachable)")
                    return
                continue
            if not held:
                self._lose("the job was cancelled or taken over by another worker")
                return
            expires = sent + self._duration.total_seconds()

    def _lose(self, reason: str) -> None:
        self.reason = reason
        self.lost.set()
        log.info("exports.lease_lost", job_id=str(self._lease.job_id), attempt=self._lease.attempt, reason=reason)
        if not self._closing and self._host is not None:
            self._cancelled_host = True
            self._host.cancel()
