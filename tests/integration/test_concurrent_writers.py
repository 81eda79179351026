"""Concurrent batches that share orgs never deadlock on the orgs' freshness rows.

Each batch upserts one ``freshness_status`` row per org it touches; two transactions that lock the same rows in
different orders deadlock (PostgreSQL aborts one: an ingester retries, the benchmark's loader failed). Rows are
locked in org order, whatever order the batch's orgs came in.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import uuid

from opentelemetry.metrics import get_meter

from db.engine import create_engine
from ingest.events import TimeWindow, validate
from ingest.metrics import IngestMetrics
from ingest.writer import EventWriter

ORGS = 60
WRITERS = 6
ROUNDS = 6


def _batch(tag: str, orgs: list[str], round_: int, writer: int) -> list[dict[str, object]]:
    now = dt.datetime.now(dt.UTC)
    return [
        {"specversion": "1.0", "id": f"{tag}-{round_}-{writer}-{i}", "source": f"//writers/{tag}",
         "type": "ai.usage.request.v1", "time": (now - dt.timedelta(seconds=i)).isoformat(),
         "data": {"org_id": org, "model": f"m{i % 3}", "input_tokens": 1, "output_tokens": 1, "latency_ms": 5.0,
                  "status_code": 200}}
        for i, org in enumerate(orgs)
    ]  # fmt: skip


async def test_concurrent_batches_with_the_same_orgs_in_other_orders_do_not_deadlock(database_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    orgs = [f"org_w{tag}_{i:03d}" for i in range(ORGS)]
    rng = random.Random(7)  # noqa: S311 - test data
    window = TimeWindow.around(dt.datetime.now(dt.UTC), retention_days=30)
    engine = create_engine(database_url, pool_size=WRITERS)
    writer = EventWriter(engine, None, None, IngestMetrics(get_meter("test_concurrent_writers")))
    try:
        for round_ in range(ROUNDS):
            batches = []
            for w in range(WRITERS):
                shuffled = orgs[:]
                rng.shuffle(shuffled)
                batches.append([validate(e, window) for e in _batch(tag, shuffled, round_, w)])
            results = await asyncio.gather(*(writer.write(b, channel="http") for b in batches))
            assert sum(r.accepted for r in results) == WRITERS * ORGS
    finally:
        await engine.dispose()
