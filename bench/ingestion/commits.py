"""What the gateway committed: progress while it ingests, the batches' timings, and each event's latency.

"Commit time" of a batch is ``ingestion_batches.started_at + duration_ms``: ``duration_ms`` is measured by the
last statement of the writer's transaction, just before COMMIT (``committed_at`` defaults to ``now()``, the
*start* of the transaction; both are recorded)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import aio_pika
import asyncpg

from bench.harness.broker import queue_depth
from bench.harness.output import say
from bench.harness.servers import Server
from bench.harness.services import AMQP_URL
from bench.harness.stats import pct
from ingest.synthetic import sent_at_from_id
from ingest.topology import Topology

STALL_TIMEOUT_S = 120
POLL_S = 0.5
PROGRESS_SQL = """
SELECT count(*) AS batches, coalesce(sum(accepted + duplicates + rejected), 0)::bigint AS seen,
       coalesce(sum(accepted), 0)::bigint AS accepted
FROM ingestion_batches WHERE channel = 'amqp'
"""
BATCHES_SQL = """
SELECT id, accepted, duplicates, rejected, duration_ms,
       extract(epoch FROM started_at)::float8 AS started,
       extract(epoch FROM started_at)::float8 + duration_ms / 1000 AS committed,
       extract(epoch FROM committed_at)::float8 AS committed_at_column
FROM ingestion_batches WHERE channel = 'amqp' ORDER BY id
"""
LATENCY_SQL = """
SELECT e.event_id,
       extract(epoch FROM b.started_at)::float8 + b.duration_ms / 1000 AS committed,
       extract(epoch FROM b.committed_at)::float8 AS committed_at_column
FROM usage_events e JOIN ingestion_batches b ON b.id = e.batch_id
"""


def batch_stats(rows: Sequence[asyncpg.Record]) -> dict[str, Any]:
    """Events, rate, batch sizes and flush times of the committed batches; ``window`` is (first start, last
    commit) for the caller to pop."""
    sizes = [r["accepted"] + r["duplicates"] + r["rejected"] for r in rows]
    durations = [r["duration_ms"] for r in rows]
    start = min(r["started"] for r in rows)
    end = max(r["committed"] for r in rows)
    events = sum(r["accepted"] for r in rows)
    commits = sorted(r["committed"] for r in rows)
    gaps = [b - a for a, b in itertools.pairwise(commits)]
    return {
        "events": events,
        "batches": len(rows),
        "window_s": round(end - start, 3),
        "events_per_s": round(events / max(end - start, 1e-6)),
        "batch_events": {
            "mean": round(sum(sizes) / len(sizes), 1),
            "p50": pct(sizes, 0.5),
            "p90": pct(sizes, 0.9),
            "max": max(sizes),
        },
        "flush_ms": {
            "mean": round(sum(durations) / len(durations), 1),
            "p50": round(pct(durations, 0.5), 1),
            "p99": round(pct(durations, 0.99), 1),
            "max": round(max(durations), 1),
        },
        "writer_busy_share": round(sum(durations) / 1000 / max(end - start, 1e-6), 3),
        "longest_gap_between_commits_s": round(max(gaps, default=0.0), 3),
        "committed_at_column_lag_ms_mean": round(
            sum(r["committed"] - r["committed_at_column"] for r in rows) / len(rows) * 1000, 1
        ),
        "per_second": _per_second(rows, start, end),
        "window": (start, end),
    }


def _per_second(rows: Sequence[asyncpg.Record], start: float, end: float) -> list[int]:
    """Events committed per whole second of the window."""
    per_second: Counter[int] = Counter()
    for r in rows:
        per_second[int(r["committed"] - start)] += r["accepted"]
    return [per_second.get(s, 0) for s in range(int(end - start) + 1)]


@dataclasses.dataclass
class _Watch:
    expected: int
    started: float
    last_change: float
    last_seen: int = -1
    last_report: float = 0.0
    reported_seen: int = 0
    first: bool = False


async def watch_ingest(url: str, prefix: str, expected: int, gateway: Server, *,
                       on_first_commit: Callable[[], None] | None = None) -> None:  # fmt: skip
    """Poll until ``expected`` events were seen by committed batches (or the gateway stalls or dies)."""
    connection = await asyncpg.connect(url)
    amqp = await aio_pika.connect_robust(AMQP_URL)
    now = time.monotonic()
    watch = _Watch(expected, now, now)
    try:
        channel = await amqp.channel()
        while True:
            row = await connection.fetchrow(PROGRESS_SQL)
            assert row is not None
            seen = int(row["seen"])
            if seen and not watch.first:
                watch.first = True
                if on_first_commit is not None:
                    on_first_commit()
            await _report(watch, row, channel, Topology.named(prefix).queue)
            if seen >= expected:
                return
            _check_alive(watch, gateway, seen)
            await asyncio.sleep(POLL_S)  # the database has no event to await for commits
    finally:
        await connection.close()
        await amqp.close()


async def _report(watch: _Watch, row: asyncpg.Record, channel: aio_pika.abc.AbstractChannel, queue: str) -> None:
    seen, now = int(row["seen"]), time.monotonic()
    if seen != watch.last_seen:
        watch.last_seen, watch.last_change = seen, now
    if now - watch.last_report < 2 and seen < watch.expected:
        return
    depth = None
    with contextlib.suppress(Exception):
        depth = await queue_depth(channel, queue)
    recent = (seen - watch.reported_seen) / max(now - watch.last_report, 1e-6) if watch.last_report else 0.0
    watch.last_report, watch.reported_seen = now, seen
    say(
        f"committed {int(row['accepted']):,}/{watch.expected:,} events in {row['batches']:,} batches  "
        f"{recent:,.0f} events/s (last interval); queue ~{depth} messages ready"
    )


def _check_alive(watch: _Watch, gateway: Server, seen: int) -> None:
    if gateway.process.returncode is not None:
        raise RuntimeError(f"gateway exited with {gateway.process.returncode}; see {gateway.log_path}")
    if time.monotonic() - watch.last_change > STALL_TIMEOUT_S:
        raise RuntimeError(f"no commit for {STALL_TIMEOUT_S} s at {seen:,}/{watch.expected:,}: stalled")


async def fetch_batches(url: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url)
    try:
        return list(await connection.fetch(BATCHES_SQL))
    finally:
        await connection.close()


async def count_events(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM usage_events"))
    finally:
        await connection.close()


async def latencies(url: str) -> list[tuple[float, float, float]]:
    """(sent, commit - sent, committed_at column - sent) per stored event."""
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(LATENCY_SQL)
    finally:
        await connection.close()
    out = []
    for row in rows:
        sent = sent_at_from_id(row["event_id"])
        if sent is not None:
            out.append((sent, row["committed"] - sent, row["committed_at_column"] - sent))
    return out
