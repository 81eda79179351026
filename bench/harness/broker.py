"""The benchmarks' RabbitMQ names: declaring and removing a prefix's topology, and reading queue counts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess

import aio_pika

from bench.harness.services import AMQP_URL
from ingest.publisher import EventPublisher
from ingest.topology import Topology, delete_topology


async def declare_topology(prefix: str) -> None:
    """Declare the prefix's exchanges and queues (as a publisher does), so that messages published before a
    gateway starts are queued."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    async with connection, EventPublisher(connection, Topology.named(prefix)):
        pass


async def remove_topology(prefix: str) -> None:
    """Delete the prefix's exchanges and queues; a failure is ignored (this runs on the way out of a scenario,
    where it must not hide the scenario's own error)."""
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect_robust(AMQP_URL)
        async with connection:
            await delete_topology(await connection.channel(), Topology.named(prefix))


async def queue_depth(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    """Ready messages of a queue (passive declare: cheap, current)."""
    queue = await channel.declare_queue(name, passive=True)
    return int(queue.declaration_result.message_count or 0)


def rabbitmq_queue_counts(name: str) -> tuple[int, int] | None:
    """(ready, unacknowledged) from rabbitmqctl (authoritative, but costs ~1 s of CPU: only outside windows)."""
    try:
        output = subprocess.run(
            ["rabbitmqctl", "-q", "list_queues", "--formatter", "json", "name", "messages_ready",
             "messages_unacknowledged"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    for queue in json.loads(output):
        if queue["name"] == name:
            return int(queue["messages_ready"]), int(queue["messages_unacknowledged"])
    return None


async def settled_queue_counts(name: str) -> tuple[int, int] | None:
    """Queue counts once RabbitMQ's (lagging) quorum-queue statistics show an empty queue, or after 15 s."""
    counts = None
    for _ in range(4):
        counts = await asyncio.to_thread(rabbitmq_queue_counts, name)
        if counts == (0, 0):
            break
        await asyncio.sleep(5)
    return counts
