"""``analytics-gateway publish FILE.jsonl``: a file of events onto the exchange."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import aio_pika
import msgspec
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TimeRemainingColumn

from ingest.publisher import EventPublisher
from ingest.topology import Topology
from kernel.settings import Settings


async def publish_file(settings: Settings, path: Path, *, batch: int, in_flight: int) -> int:
    """Publish every line of ``path``; returns how many events were confirmed."""
    assert settings.amqp_url is not None
    total = sum(1 for line in path.open("rb") if line.strip())
    connection = await aio_pika.connect_robust(settings.amqp_url.get_secret_value())
    published = 0
    columns = (BarColumn(), MofNCompleteColumn(), TaskProgressColumn(), TimeRemainingColumn())
    async with connection, EventPublisher(
        connection, Topology.named(settings.amqp_prefix), max_in_flight=in_flight,
        delivery_limit=settings.amqp_delivery_limit,
    ) as publisher:  # fmt: skip
        with Progress("publishing", *columns, transient=False) as progress, path.open("rb") as lines:
            task = progress.add_task("events", total=total)
            events = (msgspec.json.decode(line) for line in lines if line.strip())
            while chunk := tuple(islice(events, batch)):
                await publisher.publish(chunk, as_batch=batch > 1)
                published += len(chunk)
                progress.advance(task, len(chunk))
            await publisher.drain()
    return published
