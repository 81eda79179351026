"""The AMQP ingester: consume, batch, commit, dead-letter, then acknowledge.

Prefetch bounds how many unacknowledged messages are in memory, which is the
backpressure: while the database is slow or down nothing is acknowledged and
RabbitMQ stops delivering. A message is acknowledged only after the batch
holding its valid events has committed and its invalid events are confirmed
in the dead-letter queue, so a crash at any point means redelivery, and
redelivered events are duplicates the writer skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.deadletter import dead_letter
from ingest.decode import Decoded, UnreadableMessage, decode_body
from ingest.events import TimeWindow, UsageEvent
from ingest.heartbeat import Heartbeat
from ingest.metrics import IngestMetrics
from ingest.topology import Declared, Topology, declare
from ingest.writer import EventWriter, Isolated
from kernel.settings import Settings

log = structlog.get_logger(__name__)
RETRY_DELAYS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
# Of a stop's grace period, what is kept for the steps after the drain (the heartbeat row, closing the channel).
STOP_RESERVE_S = 1.0
# At most this long for each broker step of a stop (cancelling the consumer, closing the channel).
BROKER_STEP_S = 2.0
Decode = Callable[[bytes, str | None, TimeWindow], Decoded]


@dataclass
class Pending:
    """A delivered message and what decoding made of it."""

    message: AbstractIncomingMessage
    received_at: dt.datetime
    decoded: Decoded | None = None
    unreadable: str | None = None
    poisoned: list[tuple[int, str]] | None = None  # (index in the message, the database's reason)

    @property
    def events(self) -> int:
        return len(self.decoded.events) if self.decoded else 0


class Consumer:
    """Consumes the ingest queue of one connection until stopped."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        engine: AsyncEngine,
        writer: EventWriter,
        settings: Settings,
        metrics: IngestMetrics,
        decode: Decode = decode_body,
    ) -> None:
        """``decode`` is ``decode_body``; tests pass another to reach the writer with events
        validation would refuse (the database's refusal must be handled on its own)."""
        self._decode = decode
        self._connection = connection
        self._engine = engine
        self._writer = writer
        self._settings = settings
        self._metrics = metrics
        self._topology = Topology.named(settings.amqp_prefix)
        self._buffer: list[Pending] = []
        self._buffered_events = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: AbstractChannel | None = None
        self._declared: Declared | None = None
        self._consumer_tag: str | None = None
        self._flushing: list[Pending] = []
        self._last_write_error: str | None = None
        self._heartbeat = Heartbeat(connection, engine, settings, metrics, self._oldest_in_hand)

    async def start(self) -> None:
        self._channel = await self._connection.channel(publisher_confirms=True)
        await self._channel.set_qos(prefetch_count=self._settings.ingest_prefetch)
        self._declared = await declare(self._channel, self._topology, self._settings.amqp_delivery_limit)
        await self._heartbeat.start(self._channel)
        self._consumer_tag = await self._declared.queue.consume(self._on_message)
        self._tasks = [asyncio.create_task(self._flush_loop()), asyncio.create_task(self._heartbeat.run())]
        log.info("ingest.consuming", queue=self._topology.queue, prefetch=self._settings.ingest_prefetch)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop consuming; within ``grace_s`` (default ``ANALYTICS_SHUTDOWN_GRACE_S``) commit and acknowledge
        what is buffered, then leave the heartbeat and close. What cannot be committed in time stays
        unacknowledged (the broker redelivers it once this connection closes); the last line says so."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._settings.shutdown_grace_s if grace_s is None else grace_s)
        reserve = min(STOP_RESERVE_S, (deadline - loop.time()) / 4)
        self._stopping = True
        budget = deadline - reserve - loop.time()
        cancelled = await _within(self._cancel_consuming(), min(BROKER_STEP_S, budget / 2))
        self._wake.set()
        flusher, *others = self._tasks
        await _within(_finished(flusher), deadline - reserve - loop.time())
        left_messages = len(self._buffer) + len(self._flushing)
        left_events = self._buffered_events + sum(p.events for p in self._flushing)
        for task in [flusher, *others]:
            task.cancel()
        await _within(asyncio.gather(*self._tasks, return_exceptions=True), reserve / 4)
        heartbeat = await _within(self._heartbeat.leave(self._channel if cancelled else None), reserve / 2)
        if self._channel is not None:
            await _within(self._channel.close(), max(0.0, deadline - loop.time()))
        heartbeat = heartbeat or "unknown (the database did not answer in time)"
        if not left_messages:
            log.info("ingest.stopped", heartbeat=heartbeat, broker_answered=bool(cancelled))
            return
        log.warning(
            "ingest.stopped_with_messages_left",
            unacknowledged_messages=left_messages,
            events=left_events,
            reason=self._why_left(cancelled),
            heartbeat=heartbeat,
            grace_s=round(grace_s if grace_s is not None else self._settings.shutdown_grace_s, 1),
        )

    async def _cancel_consuming(self) -> bool:
        if self._declared is not None and self._consumer_tag is not None:
            await self._declared.queue.cancel(self._consumer_tag)
        return True

    def _why_left(self, cancelled: object) -> str:
        if self._last_write_error is not None:
            return (
                f"not committed within the grace period (the database: {self._last_write_error}); "
                "the broker redelivers them"
            )
        if not cancelled:
            return "the broker did not answer; unacknowledged messages are redelivered once the connection closes"
        return "not settled within the grace period; the broker redelivers them"

    def _oldest_in_hand(self) -> dt.datetime | None:
        """When the oldest message held uncommitted arrived (None: none is held)."""
        held = [p.received_at for p in (self._flushing[:1] + self._buffer[:1])]
        return min(held, default=None)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        pending = Pending(message, dt.datetime.now(dt.UTC))
        try:
            pending.decoded = self._decode(message.body, message.content_type, self._window())
        except UnreadableMessage as exc:
            pending.unreadable = str(exc)
        except Exception as exc:
            log.error("ingest.decode_failed", exc_info=True)
            pending.unreadable = f"body could not be decoded ({type(exc).__name__})"
        self._buffer.append(pending)
        self._buffered_events += pending.events
        if self._is_full():
            self._wake.set()

    def _window(self) -> TimeWindow:
        return TimeWindow.around(dt.datetime.now(dt.UTC), self._settings.raw_retention_days)

    def _is_full(self) -> bool:
        settings = self._settings
        return (
            self._buffered_events >= settings.ingest_batch_events or len(self._buffer) >= settings.ingest_prefetch // 2
        )

    async def _flush_loop(self) -> None:
        max_age = self._settings.ingest_batch_max_age_ms / 1000
        while not (self._stopping and not self._buffer):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max_age)
            self._wake.clear()
            if self._buffer:
                try:
                    await self._flush()
                except Exception:
                    log.error("ingest.flush_failed", exc_info=True)

    async def _flush(self) -> None:
        batch = self._flushing = self._take_batch()
        origins = [(p, i) for p in batch if p.decoded for i in p.decoded.indexes]
        events = [event for pending in batch if pending.decoded for event in pending.decoded.events]
        rejected = sum(len(p.decoded.rejected) for p in batch if p.decoded) + sum(1 for p in batch if p.unreadable)
        outcome = await self._write_until_committed(events, rejected)
        for poisoned in outcome.poisoned:
            pending, index = origins[poisoned.index]
            pending.poisoned = [*(pending.poisoned or []), (index, poisoned.reason)]
        try:
            await self._dead_letter(batch)
        except Exception:
            log.warning("ingest.dead_letter_failed", messages=len(batch), exc_info=True)
            await _settle(batch, requeue=True)
        else:
            await _settle(batch)
        self._flushing = []

    def _take_batch(self) -> list[Pending]:
        """The oldest messages holding up to ``ingest_batch_events`` events (at least one
        message): what arrived while the last batch was written waits for the next one,
        so batches, and the time to commit them, stay bounded."""
        limit, taken, count = self._settings.ingest_batch_events, 0, 0
        while taken < len(self._buffer) and (taken == 0 or count + self._buffer[taken].events <= limit):
            count += self._buffer[taken].events
            taken += 1
        batch, self._buffer = self._buffer[:taken], self._buffer[taken:]
        self._buffered_events -= count
        if self._is_full():
            self._wake.set()
        return batch

    async def _write_until_committed(self, events: list[UsageEvent], rejected: int) -> Isolated:
        """Retry until committed. Rows the database refuses deterministically come back
        isolated (to be dead-lettered); only other failures are retried, and they show
        in ``analytics_ingest_flush_failing_seconds`` and ``/readyz`` while they last."""
        for attempt in itertools.count():
            try:
                outcome = await self._writer.write_isolating(events, channel="amqp", rejected=rejected)
            except Exception as exc:  # noqa: BLE001 - keep the batch and retry; nothing is acknowledged
                self._metrics.flush_failed()
                self._last_write_error = type(exc).__name__
                delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
                log.warning("ingest.write_failed", attempt=attempt + 1, retry_in_s=delay, error=type(exc).__name__)
                await asyncio.sleep(delay)
            else:
                self._metrics.flush_succeeded()
                self._last_write_error = None
                return outcome
        raise AssertionError("unreachable")

    async def _dead_letter(self, batch: list[Pending]) -> None:
        assert self._declared is not None
        exchange = self._declared.dead_letter_exchange
        for pending in batch:
            message = pending.message
            if pending.unreadable is not None:
                await dead_letter(exchange, message.body, pending.unreadable,
                                  content_type=message.content_type, message_id=message.message_id)  # fmt: skip
            for reject in pending.decoded.rejected if pending.decoded else ():
                await dead_letter(exchange, reject.body, reject.error, content_type="application/cloudevents+json",
                                  index=reject.index, message_id=message.message_id)  # fmt: skip
            for index, reason in pending.poisoned or ():
                event = pending.decoded.events[pending.decoded.indexes.index(index)]  # type: ignore[union-attr]
                await dead_letter(exchange, _as_json(event), reason,
                                  content_type="application/cloudevents+json", index=index,
                                  message_id=message.message_id)  # fmt: skip


async def _settle(batch: list[Pending], *, requeue: bool | None = None) -> None:
    """Ack (or with ``requeue``, nack) the batch: one call per channel its messages came on.

    After a reconnect some messages belong to a closed channel; the broker
    redelivers those, so failing to settle them is harmless.
    """
    last_per_channel: dict[int, AbstractIncomingMessage] = {}
    for pending in batch:
        try:
            channel = pending.message.channel  # raises once that channel is closed
        except Exception:  # noqa: BLE001, S112 - its messages are redelivered by the broker
            continue
        last_per_channel[id(channel)] = pending.message
    for message in last_per_channel.values():
        try:
            if requeue is None:
                await message.ack(multiple=True)
            else:
                await message.nack(multiple=True, requeue=requeue)
        except Exception:  # noqa: BLE001
            log.info("ingest.settle_skipped", reason="channel closed; the broker redelivers")


async def _finished(task: asyncio.Task[None]) -> bool:
    """True once ``task`` has finished (a timeout around this does not cancel the task)."""
    await asyncio.shield(task)
    return True


async def _within(work: Awaitable[object], timeout_s: float) -> object | None:
    """``work``'s result, or None if it failed or did not finish within ``timeout_s`` (then it is cancelled)."""
    try:
        return await asyncio.wait_for(work, max(0.0, timeout_s))
    except Exception:  # noqa: BLE001 - a stop goes on: the caller says what was left
        return None


def _as_json(event: UsageEvent) -> bytes:
    """The event as compact JSON; ``\\u`` escapes carry what UTF-8 cannot (a lone surrogate)."""
    return json.dumps(msgspec.to_builtins(event), separators=(",", ":")).encode()
