"""AMQP ingestion on the real broker and database: exactly once, poison to the DLQ."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import uuid

import aio_pika
import pytest

from ingest.deadletter import ERROR_HEADER, INDEX_HEADER
from ingest.synthetic import Traffic, generate, ground_truth
from ingest.topology import Topology, declare, delete_topology
from kernel.settings import Settings
from tests.conftest import AMQP_URL
from tests.integration.ingest_support import dead_letters, drained, eventually, publish_mixed, publisher, stored


def _traffic(**overrides: object) -> Traffic:
    tag = uuid.uuid4().hex[:8]
    options: dict[str, object] = {"source": f"//test/{tag}", "org_prefix": f"org_{tag}", "seed": 11}
    return Traffic(**(options | overrides))  # type: ignore[arg-type]


async def _redeliver_some(prefix: str, count: int) -> int:
    """A second consumer takes ``count`` messages and requeues them: real redeliveries."""
    requeued = 0
    connection = await aio_pika.connect_robust(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=count)
        queue = await channel.get_queue(Topology.named(prefix).queue, ensure=True)
        async with queue.iterator(timeout=5) as messages:
            try:
                async for message in messages:
                    await message.nack(requeue=True)
                    requeued += 1
                    if requeued >= count:
                        break
            except TimeoutError:
                pass
    return requeued


@pytest.mark.usefixtures("app")
async def test_events_are_stored_exactly_once_with_duplicates_and_redeliveries(
    settings: Settings, database_url: str
) -> None:
    traffic = _traffic(events=4000, orgs=12, duplicate_share=0.2, late_share=0.05)
    events = list(generate(traffic))
    assert len(events) > traffic.events * 1.15  # the duplicates are really there
    async with publisher(settings.amqp_prefix) as pub:
        sending = asyncio.create_task(publish_mixed(pub, events))
        requeued = await _redeliver_some(settings.amqp_prefix, 40)
        await sending
        await publish_mixed(pub, events[:500])  # a producer replaying a whole stretch
    await drained(Topology.named(settings.amqp_prefix).queue)

    rows = await stored(database_url, traffic.source)
    assert requeued > 0
    assert len(rows) == traffic.events
    assert len({r["event_id"] for r in rows}) == traffic.events
    expected = ground_truth(events)
    actual: dict[str, list[int]] = {}
    for r in rows:
        sums = actual.setdefault(r["org_id"], [0, 0, 0, 0])
        for i, column in enumerate(("input_tokens", "cached_input_tokens", "output_tokens")):
            sums[i] += r[column]
        sums[3] += 1
    assert actual == {
        org: [t.input_tokens, t.cached_input_tokens, t.output_tokens, t.requests] for org, t in expected.items()
    }


@pytest.mark.usefixtures("app")
async def test_first_write_wins_for_the_same_identity(settings: Settings, database_url: str) -> None:
    traffic = _traffic(events=1)
    [first] = list(generate(traffic))
    changed = copy.deepcopy(first)
    changed["data"]["input_tokens"] += 1000  # type: ignore[index]
    changed["data"]["org_id"] = "org_other"  # type: ignore[index]
    async with publisher(settings.amqp_prefix) as pub:
        await pub.publish([first], as_batch=False)
        await pub.drain()

        async def first_stored() -> bool:
            return len(await stored(database_url, traffic.source)) == 1

        await eventually(first_stored, what="the first event")
        await pub.publish([changed], as_batch=True)
    await drained(Topology.named(settings.amqp_prefix).queue)
    [row] = await stored(database_url, traffic.source)
    assert row["input_tokens"] == first["data"]["input_tokens"]  # type: ignore[index]
    assert row["org_id"] == first["data"]["org_id"]  # type: ignore[index]


def _poison(valid: dict[str, object], marker: str) -> dict[str, tuple[bytes, str, str]]:
    """name -> (body, content type, words the DLQ reason must contain)."""

    def variant(change: str, value: object, drop: str | None = None) -> bytes:
        event = copy.deepcopy(valid)
        event["id"] = f"{marker}-{change}"
        data = event["data"]
        assert isinstance(data, dict)
        if drop:
            data.pop(drop)
        else:
            target, key = (event, change) if change == "time" else (data, change)
            target[key] = value
        import json

        return json.dumps(event).encode()

    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).isoformat()
    big = b'{"marker": "' + marker.encode() + b'", "pad": "' + b"x" * (20 * 1024 * 1024) + b'"}'
    return {
        "unparseable": (b'{"marker": "' + marker.encode() + b'", ', "application/cloudevents+json", "not valid JSON"),
        "wrong type": (variant("input_tokens", "12"), "application/cloudevents+json", "data.input_tokens"),
        "negative": (variant("output_tokens", -3), "application/cloudevents+json", "data.output_tokens"),
        "cached > input": (
            variant("cached_input_tokens", 10**7),
            "application/cloudevents+json",
            "cached_input_tokens",
        ),
        "missing field": (variant("model", None, drop="model"), "application/cloudevents+json", "model"),
        "future": (variant("time", future), "application/cloudevents+json", "future"),
        "too large": (big, "application/cloudevents+json", "10 MiB"),
    }


@pytest.mark.usefixtures("app")
async def test_poison_goes_to_the_dlq_with_a_reason_and_valid_siblings_are_ingested(
    settings: Settings, database_url: str
) -> None:
    traffic = _traffic(events=3)
    valid = list(generate(traffic))
    marker = uuid.uuid4().hex
    poison = _poison(valid[0], marker)
    async with publisher(settings.amqp_prefix) as pub:
        for body, content_type, _ in poison.values():
            await pub.publish_body(body, content_type=content_type)
        # A batch mixing valid events and an invalid one: the valid ones must survive.
        bad_sibling = copy.deepcopy(valid[2])
        bad_sibling["id"] = f"{marker}-sibling"
        bad_sibling["data"]["latency_ms"] = -1  # type: ignore[index]
        await pub.publish([valid[1], bad_sibling, valid[2]], as_batch=True)
        await pub.drain()
    messages = await dead_letters(settings.amqp_prefix, marker, expected=len(poison) + 1)
    reasons = sorted(str(m.headers[ERROR_HEADER]) for m in messages)
    assert len(reasons) == len(poison) + 1, reasons
    for name, (_, _, words) in poison.items():
        assert any(words in reason for reason in reasons), f"{name}: no reason with {words!r} in {reasons}"
    sibling = [m for m in messages if f"{marker}-sibling".encode() in m.body]
    assert (
        sibling and sibling[0].headers[INDEX_HEADER] == 1 and "data.latency_ms" in str(sibling[0].headers[ERROR_HEADER])
    )

    # The consumer kept running: the batch's valid events and a later event are stored.
    async with publisher(settings.amqp_prefix) as pub:
        await pub.publish([valid[0]], as_batch=False)
    await drained(Topology.named(settings.amqp_prefix).queue)
    assert sorted(r["event_id"] for r in await stored(database_url, traffic.source)) == sorted(e["id"] for e in valid)


async def test_delete_topology_removes_a_prefix_and_is_idempotent() -> None:
    """The one clean-up of a prefix's names (tests and benchmarks): every queue and exchange goes, twice is fine."""
    names = Topology.named(f"test_delete_{uuid.uuid4().hex[:8]}.")
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await declare(channel, names, delivery_limit=5)
        await delete_topology(channel, names)
        await delete_topology(channel, names)
        for queue in (names.queue, names.dead_letter_queue):
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await (await connection.channel()).declare_queue(queue, passive=True)
        for exchange in (names.exchange, names.dead_letter_exchange):
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await (await connection.channel()).declare_exchange(exchange, passive=True)
