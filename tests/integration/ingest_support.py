"""Helpers for ingestion tests: publishing, waiting for the queue to drain,
reading the dead-letter queue and the stored events."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import aio_pika
import asyncpg

from ingest.publisher import EventPublisher
from ingest.topology import Topology
from tests.conftest import AMQP_URL

POLL_S = 0.1  # re-checking an end state (queue drained, rows stored); there is no event to await


@asynccontextmanager
async def publisher(prefix: str, max_in_flight: int = 500) -> AsyncIterator[EventPublisher]:
    connection = await aio_pika.connect_robust(AMQP_URL)
    async with connection, EventPublisher(connection, Topology.named(prefix), max_in_flight=max_in_flight) as pub:
        yield pub


async def publish_mixed(pub: EventPublisher, events: Sequence[dict[str, object]], batch: int = 50) -> None:
    """Alternate single-event and batch messages."""
    index = 0
    while index < len(events):
        if (index // batch) % 2:
            await pub.publish(events[index : index + batch], as_batch=True)
            index += batch
        else:
            await pub.publish([events[index]], as_batch=False)
            index += 1
    await pub.drain()


def queue_counts(name: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of a queue, from rabbitmqctl."""
    output = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "--formatter", "json", "name", "messages_ready",
         "messages_unacknowledged"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    for queue in json.loads(output):
        if queue["name"] == name:
            return int(queue["messages_ready"]), int(queue["messages_unacknowledged"])
    raise AssertionError(f"queue {name} not found")


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(POLL_S)


async def drained(queue: str, timeout: float = 120) -> None:
    """Every message of ``queue`` was acknowledged (so its events are committed)."""

    async def empty() -> bool:
        return await asyncio.to_thread(queue_counts, queue) == (0, 0)

    await eventually(empty, timeout, f"queue {queue} to drain")


async def stored(database_url: str, source: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetch(
            "SELECT event_id, org_id, model, input_tokens, cached_input_tokens, output_tokens, status_code "
            "FROM usage_events WHERE source = $1",
            source,
        )
    finally:
        await connection.close()


async def dead_letters(prefix: str, marker: str, expected: int, timeout: float = 30) -> list[aio_pika.IncomingMessage]:
    """Take from the DLQ the ``expected`` messages whose body contains ``marker``."""
    found: list[aio_pika.IncomingMessage] = []
    connection = await aio_pika.connect_robust(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(Topology.named(prefix).dead_letter_queue, ensure=True)
        deadline = time.monotonic() + timeout
        while len(found) < expected and time.monotonic() < deadline:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                await asyncio.sleep(POLL_S)
                continue
            if marker.encode() in message.body:
                await message.ack()
                found.append(message)  # type: ignore[arg-type]
            else:
                await message.nack(requeue=True)
    return found
