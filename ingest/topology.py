"""The RabbitMQ names and their declaration (contracts section 1)."""

from __future__ import annotations

from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

ROUTING_KEY = "usage.v1"
BINDING_KEY = "usage.#"


@dataclass(frozen=True)
class Topology:
    """Names, each with the configured prefix (tests use a unique one)."""

    exchange: str
    queue: str
    dead_letter_exchange: str
    dead_letter_queue: str

    @classmethod
    def named(cls, prefix: str = "") -> Topology:
        return cls(
            exchange=f"{prefix}analytics.events",
            queue=f"{prefix}analytics.usage",
            dead_letter_exchange=f"{prefix}analytics.usage.dlx",
            dead_letter_queue=f"{prefix}analytics.usage.dlq",
        )


@dataclass(frozen=True)
class Declared:
    exchange: AbstractExchange
    queue: AbstractQueue
    dead_letter_exchange: AbstractExchange
    dead_letter_queue: AbstractQueue


async def declare(channel: AbstractChannel, topology: Topology, delivery_limit: int) -> Declared:
    """Declare exchange, quorum queue, dead-letter exchange and queue (idempotent).

    Messages the broker gives up on (over the delivery limit) are dead-lettered
    to the same queue as the events the gateway rejects itself.
    """
    exchange = await channel.declare_exchange(topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    dlx = await channel.declare_exchange(topology.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
    dlq = await channel.declare_queue(topology.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"})
    await dlq.bind(dlx)
    queue = await channel.declare_queue(
        topology.queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": topology.dead_letter_exchange,
            "x-delivery-limit": delivery_limit,
        },
    )
    await queue.bind(exchange, routing_key=BINDING_KEY)
    return Declared(exchange, queue, dlx, dlq)


async def delete_topology(channel: AbstractChannel, topology: Topology) -> None:
    """Delete the queues and exchanges of ``topology``, with the messages still in them (tests and benchmarks
    clean up their prefixed names with it).

    RabbitMQ answers delete-ok for a queue or exchange that does not exist, so this is idempotent.
    """
    for queue in (topology.queue, topology.dead_letter_queue):
        await channel.queue_delete(queue)
    for exchange in (topology.exchange, topology.dead_letter_exchange):
        await channel.exchange_delete(exchange)


@dataclass(frozen=True)
class QueueState:
    """A queue as the broker reports it now."""

    ready: int
    consumers: int


async def queue_state(channel: AbstractChannel, name: str) -> QueueState:
    """Ready messages and consumers of ``name``, asked of the broker (a passive declare).

    Through the underlying channel: aio-pika's robust channel answers a passive declare of a queue it has
    declared before from its own cache, with the counts of that first declaration.
    """
    underlay = await channel.get_underlay_channel()
    declared = await underlay.queue_declare(name, passive=True)
    return QueueState(ready=declared.message_count or 0, consumers=declared.consumer_count or 0)
