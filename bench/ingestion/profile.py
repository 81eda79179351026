"""py-spy of the ingesting gateway: where its time goes, by area and by function."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness.output import say
from bench.harness.runinfo import shown
from bench.profiles import count_stacks, start_py_spy

AREAS = (
    ("asyncpg", "asyncpg (driver: COPY encoding, protocol)"),
    ("sqlalchemy", "SQLAlchemy (pool, connection checkout)"),
    ("aio_pika", "aio-pika / aiormq / pamqp (AMQP client)"),
    ("aiormq", "aio-pika / aiormq / pamqp (AMQP client)"),
    ("pamqp", "aio-pika / aiormq / pamqp (AMQP client)"),
    ("ingest/decode", "ingest.decode + ingest.events (JSON decode, validation)"),
    ("ingest/events", "ingest.decode + ingest.events (JSON decode, validation)"),
    ("ingest/writer", "ingest.writer (records, days)"),
    ("db/events", "db.events"),
    ("ingest/consumer", "ingest.consumer"),
    ("redis", "redis (freshness announcements)"),
    ("gateway/pubsub", "redis (freshness announcements)"),
    ("opentelemetry", "OpenTelemetry metrics"),
    ("ingest/metrics", "OpenTelemetry metrics"),
    ("structlog", "logging"),
    ("asyncio", "asyncio / uvloop event loop"),
    ("uvloop", "asyncio / uvloop event loop"),
)
SECTIONS = (("self time by area", "by_area_self"), ("self time", "top_self"), ("total time", "top_total"))


@dataclasses.dataclass(frozen=True)
class ProfileSpec:
    """py-spy's output format, the file it writes, and how long it records."""

    fmt: str
    path: Path
    seconds: int

    def __str__(self) -> str:  # as the results record it: "<format>:<path>:<seconds>"
        return f"{self.fmt}:{shown(self.path)}:{self.seconds}"

    async def start(self, pid: int) -> Any:
        say(f"py-spy: recording {self.fmt} for {self.seconds} s into {shown(self.path)}")
        return await start_py_spy(pid, self.seconds, self.fmt, self.path)


def _area(file: str, func: str) -> str:
    return next((name for needle, name in AREAS if needle in file), f"other ({file.split('/')[0]})")


def summarize_profile(collapsed: Path, duration_s: float, rate_hz: int) -> dict[str, Any]:
    """Top functions (self and total samples) from py-spy's collapsed ("raw") output."""
    counts = count_stacks(collapsed, _area)
    # frames on (nearly) every stack (the entry point, uvicorn, asyncio.run) say nothing: left out
    everywhere = 0.9 * counts.samples
    return {
        "samples": counts.samples,
        "busy_share_of_one_core": counts.busy_share(duration_s, rate_hz),
        "top_self": counts.top(counts.self_samples, 20),
        "top_total": counts.top(Counter({k: v for k, v in counts.total_samples.items() if v < everywhere}), 25),
        "by_area_self": counts.top(counts.area_self, 15),
    }
