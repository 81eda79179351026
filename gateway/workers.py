"""Background workers of a ``serve`` process, by role, started and drained with the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import structlog

from db.rollup import run_cycle
from exports import retention
from exports.metrics import ExportMetrics
from exports.storage.local import LocalStorage
from exports.worker import ExportWorker
from gateway.resources import Resources
from gateway.shutdown import ShutdownClock
from ingest.consumer import Consumer
from kernel.settings import ProcessRole

log = structlog.get_logger(__name__)
CANCEL_WAIT_S = 1.0  # for a cancelled cycle to unwind (its connection is closed, not reused)


class Periodic:
    """Runs ``work`` every ``interval_s`` until stopped; a failure is logged, not fatal."""

    def __init__(self, name: str, work: Callable[[], Awaitable[object]], interval_s: float) -> None:
        self._name = name
        self._work = work
        self._interval_s = interval_s
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self, grace_s: float) -> None:
        """Let the cycle in progress finish within ``grace_s``; past that it is cancelled, and its transaction
        rolls back (the next process's cycle does that work again)."""
        self._stopping.set()
        if self._task is None:
            return
        cancel_wait = min(CANCEL_WAIT_S, grace_s / 2)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_s - cancel_wait)
        except TimeoutError:
            log.warning(
                "worker.stopped_unfinished", worker=self._name, grace_s=round(grace_s, 1),
                left="the cycle in progress is cancelled; its transaction rolls back and the next cycle redoes it",
            )  # fmt: skip
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, cancel_wait)

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._work()
            except Exception:
                log.warning("worker.failed", worker=self._name, exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)


@asynccontextmanager
async def run_workers(resources: Resources, clock: ShutdownClock) -> AsyncIterator[None]:
    """Start the workers the roles ask for; on exit stop them, newest first, each within what is left of
    the grace period (``clock``)."""
    async with AsyncExitStack() as stack:
        if ProcessRole.INGEST in resources.roles and resources.amqp is not None:
            consumer = Consumer(
                resources.amqp, resources.engine, resources.writer, resources.settings, resources.ingest_metrics
            )
            await consumer.start()
            stack.push_async_callback(lambda: consumer.stop(clock.left("stopping the AMQP consumer")))
        if ProcessRole.ROLLUP in resources.roles:

            async def cycle() -> None:  # each outcome feeds analytics_rollup_watermark_timestamp_seconds
                resources.metrics.rollup.observe(await run_cycle(resources.engine, dt.datetime.now(dt.UTC)))

            rollup = Periodic("rollup", cycle, resources.settings.rollup_interval_s)
            await rollup.start()
            stack.push_async_callback(lambda: rollup.stop(clock.left("stopping the rollup worker")))
        if ProcessRole.EXPORT in resources.roles:
            exporter = ExportWorker(
                resources.engine, resources.storage, resources.pubsub, resources.settings,
                ExportMetrics(resources.metrics.meter("analytics.exports")),
            )  # fmt: skip
            await exporter.start()
            stack.push_async_callback(lambda: exporter.stop(clock.left("stopping the export worker")))
            await _set_lifecycle(resources)

            async def sweep() -> None:  # expired exports, covered raw partitions, old receipts (docs/retention.md)
                await retention.sweep(resources.engine, resources.storage, resources.settings,
                                      dt.datetime.now(dt.UTC), resources.pubsub)  # fmt: skip
                if isinstance(resources.storage, LocalStorage):  # its "lifecycle rule" is a sweep of its own
                    await _set_lifecycle(resources)

            sweeper = Periodic("retention", sweep, resources.settings.retention_interval_s)
            await sweeper.start()
            stack.push_async_callback(lambda: sweeper.stop(clock.left("stopping the retention sweeper")))
        yield


async def _set_lifecycle(resources: Resources) -> None:
    """The store's lifecycle rule, the safety net under the sweeper (a store that refuses it, e.g. for lack of
    permission, is logged: exports still work, and the sweeper still deletes expired files)."""
    try:
        await retention.on_start(resources.storage, resources.settings)
    except Exception:
        log.warning("exports.lifecycle_not_set", exc_info=True)
