"""An AMQP ingester's heartbeat: how far it is caught up (a row of ``ingest_heartbeats``, which freshness reads),
the queue depth gauges, and the removal of rows whose ingesters are gone.

Freshness counts every row until it is deleted (``db/freshness.py``), so what deletes a row decides what
freshness says when ingesters stop:

- a clean stop deletes the ingester's own row while another consumer is on the queue; the last consumer
  keeps its row, updated, so that with nobody consuming the lag grows from the moment it stopped;
- each beat, a live ingester deletes the rows of its queue that the broker shows gone (fewer consumers on the
  queue than rows; only rows silent for a few beats), and the rows of queues that no longer exist.

A crashed ingester's row thus stops counting a few beats after the crash if another ingester consumes the
queue, and counts (its lag growing) for as long as none does.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
from collections.abc import Callable

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from db.freshness import beat, forget_queue, leave, prune, queue_caught_up, silent_queues
from ingest.metrics import IngestMetrics
from ingest.topology import QueueState, Topology, queue_state
from kernel.settings import Settings

log = structlog.get_logger(__name__)
# A row silent for this many beats, on a queue where the broker counts fewer consumers than rows, is gone.
LEASE_BEATS = 3
START_TIMEOUT_S = 5.0


class Heartbeat:
    """The heartbeat of one consumer. ``in_hand`` gives the arrival time of the oldest message it holds
    uncommitted (None: it holds none)."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        engine: AsyncEngine,
        settings: Settings,
        metrics: IngestMetrics,
        in_hand: Callable[[], dt.datetime | None],
    ) -> None:
        self._connection = connection
        self._engine = engine
        self._settings = settings
        self._metrics = metrics
        self._in_hand = in_hand
        self._topology = Topology.named(settings.amqp_prefix)
        self.instance = f"{socket.gethostname()}/{os.getpid()}/{self._topology.queue}"
        self._caught_up_through = dt.datetime.now(dt.UTC)

    @property
    def lease_s(self) -> float:
        return LEASE_BEATS * self._settings.ingest_heartbeat_s

    async def start(self, channel: AbstractChannel) -> None:
        """Read the depths once, and take over how far the queue's ingesters were caught up: a backlog left by
        a stopped or crashed ingester is as old for its successor."""
        await self.read_depths(channel)
        try:
            async with asyncio.timeout(START_TIMEOUT_S), self._engine.connect() as connection:
                inherited = await queue_caught_up(connection, self._topology.queue)
        except Exception:  # the first beats say it again; starting matters more
            log.info("ingest.heartbeat_inherit_failed", exc_info=True)
            return
        if inherited is not None:
            self._caught_up_through = min(inherited, self._caught_up_through)

    async def run(self) -> None:
        """Beat every ``ingest_heartbeat_s`` (the first at once) until cancelled; failures are logged."""
        interval = self._settings.ingest_heartbeat_s
        while True:
            try:
                async with self._connection.channel() as channel:
                    while True:
                        await self._beat(channel)
                        await asyncio.sleep(interval)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.info("ingest.heartbeat_failed", exc_info=True)
                await asyncio.sleep(interval)

    async def leave(self, channel: AbstractChannel | None) -> str:
        """At a clean stop, after the consumer is cancelled and the buffer settled: delete the row if another
        ingester of the queue is alive, else keep it, caught up as far as this last one got (the lag grows
        from there while nobody consumes). Returns what was done, for the stop's log line."""
        try:
            ready = (await self.read_depths(channel)).ready if channel is not None else None
        except Exception:  # noqa: BLE001 - the broker is away: the row keeps its last beat
            ready = None
        caught_up = self.caught_up(ready) if ready is not None else None
        async with self._engine.connect() as connection:
            if await leave(connection, self.instance, self._topology.queue, self.lease_s, caught_up):
                return "deleted"
        return "kept (no other ingester of the queue: freshness lag grows from here until one consumes)"

    async def _beat(self, channel: AbstractChannel) -> None:
        depth = await self.read_depths(channel)
        queue = self._topology.queue
        async with self._engine.connect() as connection:
            await beat(connection, self.instance, self.caught_up(depth.ready))
            forget_s = self._settings.freshness_stale_s
            gone = await prune(connection, self.instance, queue, depth.consumers, self.lease_s, forget_s)
            if gone:
                log.info("ingest.heartbeats_pruned", queue=queue, instances=gone, consumers=depth.consumers)
            for other in await silent_queues(connection, queue, self.lease_s):
                if not await self._queue_exists(other):
                    forgotten = await forget_queue(connection, other)
                    log.info("ingest.heartbeats_pruned", queue=other, rows=forgotten, reason="queue deleted")

    def caught_up(self, ready: int) -> dt.datetime:
        """With nothing waiting in the broker, everything is committed up to the oldest message still in hand
        (or now); with a backlog, the last such instant stands. Feeds ``analytics_ingest_lag_seconds``."""
        if ready == 0:
            in_hand = self._in_hand()
            self._caught_up_through = in_hand if in_hand is not None else dt.datetime.now(dt.UTC)
        self._metrics.caught_up_through = self._caught_up_through.timestamp()
        return self._caught_up_through

    async def read_depths(self, channel: AbstractChannel) -> QueueState:
        """Update the depth gauges; the ingest queue's state."""
        states = {
            name: await queue_state(channel, name) for name in (self._topology.queue, self._topology.dead_letter_queue)
        }
        for name, state in states.items():
            self._metrics.depths[name] = state.ready
        return states[self._topology.queue]

    async def _queue_exists(self, name: str) -> bool:
        """False only when the broker answers that ``name`` does not exist."""
        try:
            async with self._connection.channel() as channel:
                await queue_state(channel, name)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        except Exception:  # unknown: keep the rows
            log.info("ingest.queue_check_failed", queue=name, exc_info=True)
        return True
