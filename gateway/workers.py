"""Background workers of a ``serve`` process, by role, started and drained with the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from gateway.resources import Resources
from gateway.settings import Role
from ingest.consumer import Consumer


@asynccontextmanager
async def run_workers(resources: Resources) -> AsyncIterator[None]:
    """Start the workers the roles ask for; on exit stop them, newest first."""
    async with AsyncExitStack() as stack:
        if Role.INGEST in resources.roles and resources.amqp is not None:
            consumer = Consumer(resources.amqp, resources.writer, resources.settings, resources.ingest_metrics)
            await consumer.start()
            stack.push_async_callback(consumer.stop)
        yield
