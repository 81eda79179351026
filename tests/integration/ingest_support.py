"""Helpers for ingestion tests: publishing, waiting for the queue to drain,
reading the dead-letter queue and the stored events."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from ingest import topology
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


def amqp_connections(connection_name: str) -> list[str]:
    """The Erlang pids of the broker's connections whose client property connection_name is ``connection_name``.

    ``close_connection`` (RabbitMQ 3.10) takes the pid as the default formatter prints it, ``<rabbit@host.1.2.0>``
    (the JSON formatter prints ``#PID<…>``, which it does not accept, and it rejects the connection's name), so
    this reads the table output, where the client properties are an Erlang-like list of ``{"key","value"}``.
    """
    output = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "--no-table-headers", "pid", "client_properties"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    wanted = f'{{"connection_name","{connection_name}"}}'
    return [line.split("\t", 1)[0] for line in output.splitlines() if wanted in line]


def unacknowledged(connection_name: str) -> int | None:
    """Messages delivered on the process's channels and not acknowledged yet; None while it has no connection.

    From ``list_channels``, which asks the channel processes: ``list_queues`` reports a quorum queue's counts
    from statistics emitted every few seconds, so right after publishing it can still say 0 ready, 0 unacked.
    """
    connections = set(amqp_connections(connection_name))
    if not connections:
        return None
    output = subprocess.run(
        ["rabbitmqctl", "-q", "list_channels", "--no-table-headers", "connection", "messages_unacknowledged"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    rows = (line.split("\t") for line in output.splitlines() if line.strip())
    return sum(int(unacked) for connection, unacked in rows if connection in connections)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(POLL_S)


def own_connection_name() -> str:
    """The AMQP connection name of gateways running inside this test process."""
    return f"analytics-gateway/{os.getpid()}"


async def drained(
    queue: str,
    connection_name: str | None = None,
    timeout: float = 120,
    alive: Callable[[], bool] = lambda: True,
) -> None:
    """Every message of ``queue`` was acknowledged (so its events are committed) by the
    gateway whose AMQP connection is ``connection_name`` (default: this process's).

    Ready messages come from a passive declare and unacknowledged ones from
    ``list_channels``, both current; ``list_queues`` reports a quorum queue's
    counts from statistics a few seconds old. Ready is read before and after
    unacknowledged, so a message requeued in between is seen.
    """
    name = connection_name or own_connection_name()
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()

        async def ready() -> int:
            return (await channel.declare_queue(queue, passive=True)).declaration_result.message_count or 0

        async def empty() -> bool:
            assert alive(), "the ingester exited"
            if await ready() or await asyncio.to_thread(unacknowledged, name) != 0:
                return False
            return await ready() == 0

        await eventually(empty, timeout, f"queue {queue} to drain")


async def delete_topology(prefix: str) -> None:
    """Remove the queues and exchanges named with ``prefix``."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        await topology.delete_topology(await connection.channel(), Topology.named(prefix))


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
    return await _take_dead_letters(prefix, lambda m: marker.encode() in m.body, expected, timeout)


async def dead_letters_by_id(
    prefix: str, id_prefix: str, expected: int, timeout: float = 60
) -> list[aio_pika.IncomingMessage]:
    """Take from the DLQ the ``expected`` messages whose ``message_id`` starts with ``id_prefix``
    (the gateway keeps the original message's id on what it dead-letters)."""
    return await _take_dead_letters(prefix, lambda m: (m.message_id or "").startswith(id_prefix), expected, timeout)


async def _take_dead_letters(
    prefix: str, matches: Callable[[AbstractIncomingMessage], bool], expected: int, timeout: float
) -> list[aio_pika.IncomingMessage]:
    """Ack and return the first ``expected`` DLQ messages that ``matches``; put the others back."""
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
            if matches(message):
                await message.ack()
                found.append(message)  # type: ignore[arg-type]
            else:
                await message.nack(requeue=True)
    return found
