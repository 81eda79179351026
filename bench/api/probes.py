"""Publish-to-visible's traffic and clocks: background events, single-event probes for a dedicated org, the
API polled for that org's count, and each probe's lag to visible and to commit."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import math
import time
from typing import Any

import aio_pika
import asyncpg
import httpx
import msgspec

from bench.api.queries import PROBE_QUERY, iso
from bench.harness.output import say
from bench.harness.services import AMQP_URL
from ingest.decode import BATCH, SINGLE
from ingest.publisher import EventPublisher
from ingest.synthetic import Traffic, generate, sent_at_from_id
from ingest.topology import Topology

BG_ORG_PREFIX = "bgorg"
PROBE_ORG_PREFIX = "probe"
BG_SOURCE = "//bench/graphql-bg"
PROBE_SOURCE = "//bench/graphql-probe"


async def remove_publish_events(url: str) -> int:
    """Delete what earlier publish-to-visible runs added (background and probe orgs), so reruns see the same data."""
    connection = await asyncpg.connect(url)
    try:
        orgs = [r["org_id"] for r in await connection.fetch(
            "SELECT org_id FROM freshness_status WHERE org_id LIKE $1 OR org_id LIKE $2",
            f"{BG_ORG_PREFIX}\\_%", f"{PROBE_ORG_PREFIX}\\_%",
        )]  # fmt: skip
        if not orgs:
            return 0
        async with connection.transaction():
            deleted = await connection.execute("DELETE FROM usage_events WHERE org_id = ANY($1::text[])", orgs)
            await connection.execute(
                "DELETE FROM event_receipts WHERE source = ANY($1::text[])", [BG_SOURCE, PROBE_SOURCE]
            )
            for table in ("usage_hourly", "rollup_dirty", "freshness_status"):
                await connection.execute(f"DELETE FROM {table} WHERE org_id = ANY($1::text[])", orgs)
        return int(deleted.split()[-1])
    finally:
        await connection.close()


def background_bodies(events: int, batch: int, seconds: float, seed: int) -> list[bytes]:
    """``events`` events for 200 background orgs over the next ``seconds``, as ``batch``-event message bodies."""
    start = dt.datetime.now(dt.UTC)
    traffic = Traffic(seed=seed, events=events, orgs=200, models=12, span=dt.timedelta(seconds=seconds),
                      start=start, org_prefix=BG_ORG_PREFIX, source=BG_SOURCE)  # fmt: skip
    encoder = msgspec.json.Encoder()
    source = generate(traffic)
    return [encoder.encode(chunk) for chunk in iter(lambda: list(itertools.islice(source, batch)), [])]


def probe_event(org_id: str, index: int, sent_at: float) -> dict[str, object]:
    """Probe ``index`` of ``org_id``, its publish time in its id (``sent_at_from_id`` reads it back)."""
    return {
        "specversion": "1.0",
        "id": f"probe-{index:06d}.t{int(sent_at * 1e6)}",
        "source": PROBE_SOURCE,
        "type": "ai.usage.request.v1",
        "time": iso(dt.datetime.fromtimestamp(sent_at, dt.UTC)),
        "data": {
            "org_id": org_id,
            "model": "gpt-4o-mini",
            "input_tokens": 100,
            "output_tokens": 10,
            "latency_ms": 100.0,
            "status_code": 200,
        },
    }


@dataclasses.dataclass
class Steady:
    """Publishing ``rate`` events/s in total: background messages of ``bg_batch`` events, and a single-event
    probe for ``probe_org`` every ``probe_every`` s (its publish time appended to ``probes``)."""

    background: list[bytes]
    bg_batch: int
    rate: float
    probe_org: str
    probe_every: float
    probes: list[float]
    bg_sent: int = 0

    @property
    def bg_rate(self) -> float:
        return self.rate - 1 / self.probe_every

    async def step(self, publisher: EventPublisher, encoder: msgspec.json.Encoder, started: float) -> bool:
        """Publish what is due (a probe first), or sleep until something is; False when the background ran out."""
        elapsed = time.monotonic() - started
        if len(self.probes) <= elapsed / self.probe_every:
            sent_at = time.time()
            event = probe_event(self.probe_org, len(self.probes) + 1, sent_at)
            await publisher.publish_body(encoder.encode(event), content_type=SINGLE)
            self.probes.append(sent_at)
        elif self.bg_sent < elapsed * self.bg_rate:
            index = self.bg_sent // self.bg_batch  # messages sent so far
            if index >= len(self.background):
                return False
            await publisher.publish_body(self.background[index], content_type=BATCH)
            self.bg_sent += self.bg_batch
        else:
            next_bg = started + self.bg_sent / self.bg_rate
            next_probe = started + len(self.probes) * self.probe_every
            await asyncio.sleep(max(0.0005, min(next_bg, next_probe) - time.monotonic()))
        return True


async def publish_steady(prefix: str, steady: Steady, seconds: float) -> dict[str, Any]:
    """Publish as ``steady`` says for ``seconds``; the rates achieved."""
    encoder = msgspec.json.Encoder()
    connection = await aio_pika.connect_robust(AMQP_URL)
    async with connection, EventPublisher(connection, Topology.named(prefix), max_in_flight=1000) as publisher:
        started = reported = time.monotonic()
        while time.monotonic() - started < seconds and await steady.step(publisher, encoder, started):
            if time.monotonic() - reported >= 5:
                reported = time.monotonic()
                sent = steady.bg_sent + len(steady.probes)
                say(f"   publishing: {sent:,} events  {sent / (reported - started):,.0f} events/s")
        publish_s = time.monotonic() - started
        await publisher.drain()
    return {
        "seconds": round(publish_s, 2),
        "background_events": steady.bg_sent,
        "probe_events": len(steady.probes),
        "events_per_s": round((steady.bg_sent + len(steady.probes)) / publish_s),
        "background_message_events": steady.bg_batch,
    }


@dataclasses.dataclass
class Poll:
    sent: float  # wall clock, unix seconds
    received: float
    count: int


async def poll_probe_org(base_url: str, org_id: str, token: str, interval: float, polls: list[Poll],
                         stop: asyncio.Event) -> None:  # fmt: skip
    """Ask for the org's MINUTE totals over the last hour every ``interval`` s until ``stop``."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        next_at = time.monotonic()
        while not stop.is_set():
            now = dt.datetime.now(dt.UTC)
            end = now.replace(second=0, microsecond=0) + dt.timedelta(minutes=2)
            variables = {"orgId": org_id, "range": {"from": iso(end - dt.timedelta(hours=1)), "to": iso(end)}}
            sent = time.time()
            response = await http.post("/graphql", json={"query": PROBE_QUERY, "variables": variables}, headers=headers)
            received = time.time()
            payload = response.json()
            if response.status_code != 200 or payload.get("errors"):
                raise RuntimeError(f"probe poll failed: {response.status_code} {response.text[:500]}")
            polls.append(Poll(sent, received, int(payload["data"]["usage"]["totals"]["requests"])))
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


def probe_lags(probes: list[float], polls: list[Poll]) -> list[dict[str, float]]:
    """For probe k (1-based), the first poll whose count reached k: lag to its response (what a polling client
    sees) and to the previous poll's request (the earliest the probe can have become visible)."""
    out = []
    j = 0
    for k, sent in enumerate(probes, 1):
        while j < len(polls) and polls[j].count < k:
            j += 1
        if j == len(polls):
            break
        earliest = polls[j - 1].sent if j > 0 else polls[j].sent
        by, after = polls[j].received - sent, max(0.0, earliest - sent)
        out.append({"published": sent, "visible_by": by, "visible_after": after})
    return out


async def probe_commits(url: str) -> dict[str, float]:
    """Publish-to-commit of each probe (commit time of its batch: started_at + duration_ms)."""
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT e.event_id, extract(epoch FROM b.started_at)::float8 + b.duration_ms / 1000 AS committed "
            "FROM event_receipts e JOIN ingestion_batches b ON b.id = e.batch_id WHERE e.source = $1",
            PROBE_SOURCE,
        )
    finally:
        await connection.close()
    return {r["event_id"]: r["committed"] - (sent_at_from_id(r["event_id"]) or math.nan) for r in rows}
