"""Background workers of a ``serve`` process, by role, started and drained with the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import structlog

from db.rollup import run_cycle
from gateway.resources import Resources
from ingest.consumer import Consumer
from kernel.settings import ProcessRole

log = structlog.get_logger(__name__)


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

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._work()
            except Exception:
                log.warning("worker.failed", worker=self._name, exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)


@asynccontextmanager
async def run_workers(resources: Resources) -> AsyncIterator[None]:
    """Start the workers the roles ask for; on exit stop them, newest first."""
    async with AsyncExitStack() as stack:
        if ProcessRole.INGEST in resources.roles and resources.amqp is not None:
            consumer = Consumer(
                resources.amqp, resources.engine, resources.writer, resources.settings, resources.ingest_metrics
            )
            await consumer.start()
            stack.push_async_callback(consumer.stop)
        if ProcessRole.ROLLUP in resources.roles:
            rollup = Periodic(
                "rollup",
                lambda: run_cycle(resources.engine, dt.datetime.now(dt.UTC)),
                resources.settings.rollup_interval_s,
            )
            await rollup.start()
            stack.push_async_callback(rollup.stop)
        yield
