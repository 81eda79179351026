"""Publish/subscribe between gateway processes: Redis, or in process without it.

Ingestion publishes "new data for org X"; subscriptions listen. With Redis
every replica hears every publish; without it (the embedded default) only the
publishing process does, which is enough for one replica.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from redis.asyncio import Redis


class PubSub(Protocol):
    async def publish(self, channel: str, message: bytes) -> None: ...

    def subscribe(self, channels: Iterable[str]) -> AbstractAsyncContextManager[AsyncIterator[bytes]]: ...


class RedisPubSub:
    """Channels on Redis, named with the configured key prefix."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

    async def publish(self, channel: str, message: bytes) -> None:
        await self._redis.publish(self._prefix + channel, message)

    @asynccontextmanager
    async def subscribe(self, channels: Iterable[str]) -> AsyncIterator[AsyncIterator[bytes]]:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(*(self._prefix + c for c in channels))
        try:
            yield _redis_messages(pubsub)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]


async def _redis_messages(pubsub: object) -> AsyncIterator[bytes]:
    async for message in pubsub.listen():  # type: ignore[attr-defined]
        yield bytes(message["data"])


class LocalPubSub:
    """In-process channels: every subscriber gets its own bounded queue."""

    QUEUE_SIZE = 1000

    def __init__(self) -> None:
        self._queues: dict[str, set[asyncio.Queue[bytes]]] = defaultdict(set)

    async def publish(self, channel: str, message: bytes) -> None:
        for queue in list(self._queues.get(channel, ())):
            if not queue.full():  # a subscriber that stopped reading loses messages, not the publisher
                queue.put_nowait(message)

    @asynccontextmanager
    async def subscribe(self, channels: Iterable[str]) -> AsyncIterator[AsyncIterator[bytes]]:
        queue: asyncio.Queue[bytes] = asyncio.Queue(self.QUEUE_SIZE)
        names = list(channels)
        for name in names:
            self._queues[name].add(queue)
        try:
            yield _queue_messages(queue)
        finally:
            for name in names:
                self._queues[name].discard(queue)


async def _queue_messages(queue: asyncio.Queue[bytes]) -> AsyncIterator[bytes]:
    while True:
        yield await queue.get()
