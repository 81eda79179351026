"""What the ingestion scenarios publish: generated events as message bodies, as a backlog (as fast as confirms
allow) or at a steady rate with each event stamped with its publish time."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import Sequence
from typing import Any

import aio_pika
import msgspec

from bench.harness.output import say
from bench.harness.services import AMQP_URL
from bench.harness.stats import fine_seconds_summary
from ingest.decode import BATCH, SINGLE
from ingest.publisher import EventPublisher
from ingest.synthetic import Traffic, generate, stamped
from ingest.topology import Topology


def make_bodies(events: int, batch: int, seed: int) -> list[bytes]:
    """Message bodies of ``events`` distinct generated events, ``batch`` per message (1: single-event bodies)."""
    traffic = Traffic(seed=seed, events=events, orgs=200, models=12, span=dt.timedelta(hours=1))
    encoder = msgspec.json.Encoder()
    bodies: list[bytes] = []
    chunk: list[dict[str, object]] = []
    reported = time.monotonic()
    for index, event in enumerate(generate(traffic), 1):
        if batch == 1:
            bodies.append(encoder.encode(event))
        else:
            chunk.append(event)
            if len(chunk) == batch:
                bodies.append(encoder.encode(chunk))
                chunk = []
        if time.monotonic() - reported > 2:
            reported = time.monotonic()
            say(f"generating: {index:,}/{events:,} events")
    if chunk:
        bodies.append(encoder.encode(chunk))
    return bodies


async def publish_bodies(prefix: str, bodies: Sequence[bytes], *, batch: int, events: int) -> dict[str, Any]:
    """Publish pre-encoded bodies as fast as confirms allow; returns the publish rate."""
    content_type = BATCH if batch > 1 else SINGLE
    connection = await aio_pika.connect_robust(AMQP_URL)
    started = time.monotonic()
    reported = started
    async with connection, EventPublisher(connection, Topology.named(prefix), max_in_flight=1000) as publisher:
        for index, body in enumerate(bodies, 1):
            await publisher.publish_body(body, content_type=content_type)
            if time.monotonic() - reported >= 2:
                reported = time.monotonic()
                done = min(index * batch, events)
                say(f"publishing backlog: {done:,}/{events:,} events  {done / (reported - started):,.0f} events/s")
        await publisher.drain()
    seconds = time.monotonic() - started
    say(f"published {events:,} events in {len(bodies):,} messages: {events / seconds:,.0f} events/s")
    return {
        "seconds": round(seconds, 2),
        "events_per_s": round(events / seconds),
        "messages_per_s": round(len(bodies) / seconds),
    }


@dataclasses.dataclass
class PublisherLog:
    """Where the steady publisher spent its time: waits for an in-flight slot after stamping (counted in the
    latency), messages in flight (awaiting the broker's confirm), how far behind its schedule it fell."""

    slot_waits: list[float] = dataclasses.field(default_factory=list)
    in_flight: list[int] = dataclasses.field(default_factory=list)
    behind: float = 0.0

    def figures(self, seconds: float) -> dict[str, Any]:
        messages_per_s = len(self.slot_waits) / max(seconds, 1e-6)
        mean_in_flight = sum(self.in_flight) / len(self.in_flight) if self.in_flight else None
        return {
            "slot_wait_s": fine_seconds_summary(self.slot_waits),
            "in_flight_mean": round(mean_in_flight, 1) if mean_in_flight is not None else None,
            "in_flight_max": max(self.in_flight) if self.in_flight else None,
            # Little's law: the mean time from hand-over to the broker's confirm
            "confirm_s_mean_estimate": round(mean_in_flight / messages_per_s, 4) if mean_in_flight else None,
            "max_behind_schedule_s": round(self.behind, 3),
        }


async def steady_publish(
    prefix: str, events: list[dict[str, object]], *, batch: int, rate: int
) -> tuple[int, dict[str, Any]]:
    """Publish ``events`` at ``rate`` events/s, stamping each message's events with the time it is handed over;
    the events published and where the publisher spent its time (a publisher short of CPU offers less)."""
    content_type = BATCH if batch > 1 else SINGLE
    encoder = msgspec.json.Encoder()
    connection = await aio_pika.connect_robust(AMQP_URL)
    published, log = 0, PublisherLog()
    async with connection, EventPublisher(connection, Topology.named(prefix), max_in_flight=1000) as publisher:
        pending = getattr(publisher, "_pending", None)  # the publisher's unconfirmed sends (diagnostics only)
        started = reported = sampled = time.monotonic()
        for index in range(0, len(events), batch):
            ahead = started + published / rate - time.monotonic()
            if ahead > 0.002:
                await asyncio.sleep(ahead)
            log.behind = max(log.behind, -ahead)
            chunk = stamped(events[index : index + batch], time.time_ns())
            handed = time.monotonic()
            await publisher.publish_body(encoder.encode(chunk if batch > 1 else chunk[0]), content_type=content_type)
            now = time.monotonic()
            log.slot_waits.append(now - handed)
            published += len(chunk)
            if pending is not None and now - sampled >= 0.05:
                sampled = now
                log.in_flight.append(len(pending))
            if now - reported >= 2:
                reported = now
                say(f"publishing: {published:,}/{len(events):,} events  {published / (now - started):,.0f} events/s")
        await publisher.drain()
    return published, log.figures(time.monotonic() - started)
