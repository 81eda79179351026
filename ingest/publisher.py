"""Publishing events to the exchange with publisher confirms (the ``publish``
command and the load generator)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from ingest.decode import BATCH, SINGLE
from ingest.topology import ROUTING_KEY, Topology, declare


class EventPublisher:
    """Publishes event dicts as single-event or batch messages, confirmed.

    Up to ``max_in_flight`` messages await their confirms at once; ``drain``
    waits for all of them.
    """

    def __init__(
        self, connection: AbstractRobustConnection, topology: Topology, *, max_in_flight: int = 1000,
        delivery_limit: int = 20,
    ) -> None:  # fmt: skip
        self._connection = connection
        self._topology = topology
        self._delivery_limit = delivery_limit
        self._slots = asyncio.Semaphore(max_in_flight)
        self._pending: set[asyncio.Task[None]] = set()
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._error: BaseException | None = None

    async def __aenter__(self) -> EventPublisher:
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._exchange = (await declare(self._channel, self._topology, self._delivery_limit)).exchange
        return self

    async def __aexit__(self, *exc: object | TracebackType) -> None:
        await self.drain()
        if self._channel is not None:
            await self._channel.close()

    async def publish(self, events: Sequence[object], *, as_batch: bool) -> None:
        """One message: ``events`` as a JSON array, or the single event as an object."""
        if not as_batch and len(events) != 1:
            raise ValueError("a single-event message holds exactly one event")
        body = msgspec.json.encode(list(events) if as_batch else events[0])
        await self.publish_body(body, content_type=BATCH if as_batch else SINGLE)

    async def publish_body(self, body: bytes, *, content_type: str, message_id: str | None = None) -> None:
        if self._error is not None:
            raise self._error
        await self._slots.acquire()
        message = aio_pika.Message(
            body, content_type=content_type, message_id=message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        task = asyncio.create_task(self._send(message))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, message: aio_pika.Message) -> None:
        assert self._exchange is not None
        try:
            await self._exchange.publish(message, routing_key=ROUTING_KEY)
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._slots.release()

    async def drain(self) -> None:
        """Wait until every published message is confirmed (or raise the first failure)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._error is not None:
            raise self._error
