"""Ingestion under hostile input (issue 10, findings 1 and 2), on the real broker and database.

One bad event must never stop ingestion: validation refuses what PostgreSQL
cannot store, a deterministic database refusal that validation missed is
isolated and dead-lettered (proven here with validation bypassed), and a
consumer that keeps failing to flush shows in /readyz and /metrics.
The fuzz test at the end throws generated hostile bodies at both paths
(``ANALYTICS_FUZZ_EXAMPLES`` raises its size for ``make fuzz``).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import yaml
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics
from gateway.resources import Resources
from ingest.consumer import Consumer
from ingest.deadletter import ERROR_HEADER, INDEX_HEADER
from ingest.decode import BATCH, SINGLE, Decoded, decode_body
from ingest.events import TimeWindow, UsageEvent
from ingest.metrics import IngestMetrics
from ingest.synthetic import Traffic, generate
from ingest.topology import Topology
from ingest.writer import EventWriter
from kernel.settings import Settings
from tests.conftest import TokenFactory
from tests.integration.ingest_support import (
    dead_letters,
    dead_letters_by_id,
    drained,
    eventually,
    publisher,
    stored,
)
from tests.unit.test_event_validation import Pairs, dump, mutated, reference_accepts

REPO = Path(__file__).resolve().parents[2]
FUZZ_EXAMPLES = int(os.environ.get("ANALYTICS_FUZZ_EXAMPLES", "25"))


def _events(count: int, tag: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    tag = tag or uuid.uuid4().hex[:8]
    traffic = Traffic(events=count, source=f"//hostile/{tag}", org_prefix=f"org_{tag}", seed=5)
    return traffic.source, list(generate(traffic))


async def _post(client: httpx.AsyncClient, token: str, body: bytes, content_type: str = BATCH) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
    return await client.post("/v1/events", content=body, headers=headers)


def _ids(rows: list[asyncpg.Record]) -> list[str]:
    return sorted(r["event_id"] for r in rows)


def _with_nul(event: dict[str, Any], where: str) -> dict[str, Any]:
    bad = copy.deepcopy(event)
    target = bad if where in ("id", "source") else bad["data"]
    target[where] = f"{target[where] or 'x'}\u0000"
    return bad


# --- finding 1, first line: validation refuses what the database cannot store --------------------


@pytest.mark.usefixtures("app")
async def test_a_nul_event_over_amqp_is_dead_lettered_and_ingestion_goes_on(
    settings: Settings, database_url: str
) -> None:
    source, events = _events(4)
    marker = uuid.uuid4().hex
    poison = _with_nul(events[1], "id") | {"marker": marker}
    async with publisher(settings.amqp_prefix) as pub:
        await pub.publish([events[0], poison, events[2]], as_batch=True)
        await pub.publish([events[3]], as_batch=False)  # a later message, another org
    await drained(Topology.named(settings.amqp_prefix).queue, timeout=30)
    assert _ids(await stored(database_url, source)) == sorted(str(e["id"]) for e in (events[0], events[2], events[3]))
    [message] = await dead_letters(settings.amqp_prefix, marker, expected=1)
    assert message.headers[INDEX_HEADER] == 1
    assert "id: must not contain NUL" in str(message.headers[ERROR_HEADER])


@pytest.mark.parametrize("where", ["id", "source", "error_type", "region"])
async def test_a_nul_event_over_http_is_rejected_and_its_batch_mates_stored(
    client: httpx.AsyncClient, make_token: TokenFactory, database_url: str, where: str
) -> None:
    source, events = _events(3)
    body = json.dumps([events[0], _with_nul(events[1], where), events[2]]).encode()
    response = await _post(client, make_token("ingest"), body)
    assert response.status_code == 202, response.text
    [rejected] = response.json()["rejected"]
    assert rejected["index"] == 1 and where in rejected["error"] and "NUL" in rejected["error"]
    assert _ids(await stored(database_url, source)) == sorted(str(e["id"]) for e in (events[0], events[2]))


DEEP = [b"[" * 100_000, b'{"a":' * 100_000, b'[{"x":' + b"[" * 100_000 + b"]}]"]


@pytest.mark.parametrize("body", DEEP, ids=["arrays", "objects", "inside-an-event"])
async def test_deep_nesting_over_http_is_400(client: httpx.AsyncClient, make_token: TokenFactory, body: bytes) -> None:
    response = await _post(client, make_token("ingest"), body, "application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "BAD_USER_INPUT"


@pytest.mark.usefixtures("app")
async def test_deep_nesting_over_amqp_is_dead_lettered(settings: Settings) -> None:
    tag = f"deep-{uuid.uuid4().hex}"
    async with publisher(settings.amqp_prefix) as pub:
        for n, body in enumerate(DEEP):
            await pub.publish_body(body, content_type="application/json", message_id=f"{tag}-{n}")
    await drained(Topology.named(settings.amqp_prefix).queue, timeout=30)
    messages = await dead_letters_by_id(settings.amqp_prefix, tag, expected=len(DEEP))
    assert len(messages) == len(DEEP)
    assert all("nested too deeply" in str(m.headers[ERROR_HEADER]) for m in messages)


# --- finding 1, second line: the database's own refusal, with validation bypassed -----------------


def _poisoned(event: UsageEvent) -> UsageEvent:
    """What validation would refuse, built past it: the database must refuse it on its own."""
    return msgspec.structs.replace(event, id=event.id + "\u0000")


def _typed(events: list[dict[str, Any]]) -> list[UsageEvent]:
    window = TimeWindow.around(dt.datetime.now(dt.UTC), 90)
    return decode_body(json.dumps(events).encode(), BATCH, window).events


async def test_the_writer_isolates_rows_the_database_refuses(resources: Resources, database_url: str) -> None:
    source, events = _events(7)
    typed = _typed(events)
    typed[2], typed[5] = _poisoned(typed[2]), _poisoned(typed[5])
    outcome = await resources.writer.write_isolating(typed, channel="http")
    assert [p.index for p in sorted(outcome.poisoned, key=lambda p: p.index)] == [2, 5]
    assert all("CharacterNotInRepertoire" in p.reason or "UTF8" in p.reason for p in outcome.poisoned)
    assert outcome.accepted == 5
    assert _ids(await stored(database_url, source)) == sorted(str(events[i]["id"]) for i in (0, 1, 3, 4, 6))


def _poisoning_decode(marker: str) -> Callable[[bytes, str | None, TimeWindow], Decoded]:
    """``decode_body``, then a NUL appended to the id of events whose id contains ``marker``."""

    def decode(body: bytes, content_type: str | None, window: TimeWindow) -> Decoded:
        decoded = decode_body(body, content_type, window)
        decoded.events = [_poisoned(e) if marker in e.id else e for e in decoded.events]
        return decoded

    return decode


@contextmanager
def _prefix(settings: Settings) -> Iterator[Settings]:
    yield settings.model_copy(update={"amqp_prefix": f"{settings.amqp_prefix}{uuid.uuid4().hex[:6]}."})


async def test_the_consumer_dead_letters_what_the_database_refuses_and_acks(
    resources: Resources, settings: Settings, database_url: str
) -> None:
    assert resources.amqp is not None
    tag = uuid.uuid4().hex[:8]
    source, events = _events(4, tag)
    marker = "poison"
    events[1]["id"] = f"{marker}-{tag}"
    with _prefix(settings) as own:
        consumer = Consumer(
            resources.amqp, resources.engine, resources.writer, own, resources.ingest_metrics,
            decode=_poisoning_decode(marker),
        )  # fmt: skip
        await consumer.start()
        try:
            async with publisher(own.amqp_prefix) as pub:
                await pub.publish(events[:3], as_batch=True)
                await pub.publish([events[3]], as_batch=False)
            await drained(Topology.named(own.amqp_prefix).queue, timeout=30)
        finally:
            await consumer.stop()
        [message] = await dead_letters(own.amqp_prefix, f"{marker}-{tag}", expected=1)
    assert message.headers[INDEX_HEADER] == 1
    assert "database refused the event" in str(message.headers[ERROR_HEADER])
    assert _ids(await stored(database_url, source)) == sorted(str(events[i]["id"]) for i in (0, 2, 3))


async def test_http_lists_what_the_database_refuses_and_stores_the_rest(
    client: httpx.AsyncClient, make_token: TokenFactory, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, events = _events(3)
    events[1]["id"] = f"poison-{uuid.uuid4().hex[:6]}"
    monkeypatch.setattr("gateway.events_endpoint.decode_body", _poisoning_decode("poison"))
    response = await _post(client, make_token("ingest"), json.dumps(events).encode())
    assert response.status_code == 202
    body = response.json()
    assert body["accepted"] == 2
    [rejected] = body["rejected"]
    assert rejected["index"] == 1 and "database refused the event" in rejected["error"]
    assert _ids(await stored(database_url, source)) == sorted(str(events[i]["id"]) for i in (0, 2))


# --- finding 1, visibility: a consumer that keeps failing to flush ----------------------------------


async def test_a_failing_consumer_retries_and_shows_it_then_recovers(
    resources: Resources, settings: Settings, database_url: str
) -> None:
    """A transient failure (the database unreachable) is retried, never dead-lettered, and shows."""
    from db.engine import create_engine

    assert resources.amqp is not None
    source, events = _events(2)
    metrics = IngestMetrics(Metrics.create().meter("test"), not_ready_after_s=0)
    dead = create_engine("postgresql://postgres@127.0.0.1:1/none", pool_size=1)
    with _prefix(settings) as own:
        consumer = Consumer(resources.amqp, dead, EventWriter(dead, None, None, metrics), own, metrics)
        await consumer.start()
        try:
            async with publisher(own.amqp_prefix) as pub:
                await pub.publish(events, as_batch=True)

            async def failing() -> bool:
                return metrics.consecutive_failures >= 2

            await eventually(failing, timeout=30, what="two failed flushes")
            assert metrics.flush_state()["ok"] is False and metrics.failing_for_s() > 0
            assert await stored(database_url, source) == []
            consumer._writer = resources.writer  # the database is back (the test's only way in)
            await drained(Topology.named(own.amqp_prefix).queue, timeout=30)
        finally:
            await consumer.stop()
            await dead.dispose()
    assert metrics.flush_state() == {"ok": True} and metrics.failing_for_s() == 0
    assert len(await stored(database_url, source)) == 2


async def test_readyz_is_503_while_flushing_has_failed_too_long(
    client: httpx.AsyncClient, resources: Resources
) -> None:
    metrics = resources.ingest_metrics
    metrics.flush_failed()
    metrics.failing_since = time.monotonic() - metrics.not_ready_after_s - 5  # failing for longer than allowed
    try:
        response = await client.get("/readyz")
        assert response.status_code == 503
        ingest = response.json()["checks"]["ingest"]
        assert ingest["ok"] is False and ingest["failing_for_s"] > metrics.not_ready_after_s
        assert _gauge(await client.get("/metrics")) > metrics.not_ready_after_s
    finally:
        metrics.flush_succeeded()
    response = await client.get("/readyz")
    assert response.status_code == 200 and response.json()["checks"]["ingest"] == {"ok": True}


def _gauge(response: httpx.Response) -> float:
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "analytics_ingest_flush_failing_seconds":
                return float(sample.value)
    raise AssertionError("analytics_ingest_flush_failing_seconds is not exported")


async def test_the_alert_rule_watches_an_exported_metric(client: httpx.AsyncClient) -> None:
    rules = yaml.safe_load((REPO / "dashboards" / "rules" / "ingest.rules.yml").read_text())
    [rule] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "IngestFlushFailing"]
    assert rule["for"] == "2m"
    assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])
    exported = {s.name for f in text_string_to_metric_families((await client.get("/metrics")).text) for s in f.samples}
    names = set(re.findall(r"analytics_[a-z_]+", rule["expr"]))
    assert names and names <= exported, (names, sorted(n for n in exported if n.startswith("analytics_ingest")))


# --- the ingestion half of ``make fuzz`` -----------------------------------------------------------


@st.composite
def hostile_bodies(draw: st.DrawFn) -> tuple[bytes, str, list[Any]]:
    """(body, content type, elements as generated); the test fixes ids and sources afterwards."""
    kind = draw(st.sampled_from(["events", "events", "events", "bytes", "deep", "content-type", "huge"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200)), draw(st.sampled_from([SINGLE, BATCH, "application/json"])), []
    if kind == "deep":
        depth = draw(st.integers(500, 50_000))
        return b"[" * depth + b"]" * draw(st.sampled_from([0, depth])), "application/json", []
    if kind == "huge":
        return b'["' + b"x" * (10 * 1024 * 1024) + b'"]', BATCH, []
    items = draw(st.lists(mutated(), min_size=1, max_size=5))
    content_type = draw(st.sampled_from([BATCH, "application/json; charset=utf-8", "text/plain"]))
    return b"", content_type if kind == "events" else "application/xml", items


def _draw(count: int) -> list[tuple[bytes, str, list[Any]]]:
    drawn: list[tuple[bytes, str, list[Any]]] = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None, phases=[Phase.generate])
    @given(hostile_bodies())
    def collect(example: tuple[bytes, str, list[Any]]) -> None:
        drawn.append(example)

    collect()
    return drawn


def _mark(item: Any, source: str, event_id: str) -> Any:
    """Give an event a unique identity in this run's source (the first occurrence of each key)."""
    if isinstance(item, Pairs):
        for key, value in (("source", source), ("id", event_id)):
            index = next((i for i, (k, _) in enumerate(item.items) if k == key), None)
            if index is not None and isinstance(item.items[index][1], str):
                item.items[index] = (key, value)
    return item


def _raw_dead_letters(raw: bytes, content_type: str) -> int:
    """Dead letters of a body of random bytes: one for an unreadable body; a JSON array that random bytes
    make by chance is read as a batch, each (invalid) element dead-lettered on its own."""
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than any decoder goes
        return 1
    return len(document) if isinstance(document, list) and content_type != SINGLE else 1


@pytest.mark.usefixtures("app")
async def test_fuzz_both_ingestion_paths(
    client: httpx.AsyncClient, make_token: TokenFactory, settings: Settings, database_url: str
) -> None:
    run = uuid.uuid4().hex[:8]
    token = make_token("ingest")
    expected: dict[str, set[str]] = {"http": set(), "amqp": set()}
    dead_lettered = 0
    async with publisher(settings.amqp_prefix) as pub:
        for n, (raw, content_type, items) in enumerate(_draw(FUZZ_EXAMPLES)):
            for path in ("http", "amqp"):
                source = f"//fuzz/{run}/{path}"
                texts = [
                    dump(_mark(copy.deepcopy(it), source, f"{n}-{i}"), n % 2 == 0, n % 3 == 0)
                    for i, it in enumerate(items)
                ]
                body = ("[" + ",".join(texts) + "]").encode("utf-8", "surrogatepass") if items else raw
                valid = [isinstance(it, Pairs) and reference_accepts(t) for it, t in zip(items, texts, strict=True)]
                readable = bool(items) and not content_type.startswith(("text/", "application/xml"))
                if readable:
                    expected[path] |= {f"{n}-{i}" for i, ok in enumerate(valid) if ok}
                if path == "http":
                    response = await _post(client, token, body, content_type)
                    assert response.status_code < 500, (response.status_code, body[:300])
                    if response.status_code == 202:
                        indexes = [r["index"] for r in response.json()["rejected"]]
                        if items:  # random bytes can be JSON too ("[1]"): then only the reasons are checked
                            assert indexes == [i for i, ok in enumerate(valid) if not ok], texts
                        assert all(r["error"] for r in response.json()["rejected"])
                    else:
                        assert (response.json()["error"]["code"] and not any(valid)) or not readable, texts
                else:
                    await pub.publish_body(body, content_type=content_type, message_id=f"fuzz-{run}-{n}")
                    dead_lettered += sum(not ok for ok in valid) if readable else _raw_dead_letters(raw, content_type)
    await drained(Topology.named(settings.amqp_prefix).queue, timeout=60)
    for path, ids in expected.items():
        rows = await stored(database_url, f"//fuzz/{run}/{path}")
        assert _ids(rows) == sorted(ids), path
        assert all(re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", r["org_id"]) for r in rows)
    messages = await dead_letters_by_id(settings.amqp_prefix, f"fuzz-{run}-", expected=dead_lettered)
    assert len(messages) == dead_lettered and all(m.headers[ERROR_HEADER] for m in messages)
