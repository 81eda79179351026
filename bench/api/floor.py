"""The floor: the SQL the gateway runs for a usage query, from bare asyncpg clients in this process."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from bench.api.dataset import Dataset
from bench.api.queries import Shape
from bench.harness.stats import latency_summary_ms
from db.engine import create_engine
from db.rollup import watermarks
from db.usage import UsageQuery, usage_statement

# The gateway's session settings (db/engine.py), so both run the statement under the same planner settings.
FLOOR_SESSION = {"TimeZone": "UTC", "jit": "off"}


@dataclasses.dataclass
class Floor:
    """The SQL the gateway runs for a usage query, from a bare asyncpg client."""

    sql: str
    args: tuple[object, ...]

    @staticmethod
    def encode(records: Sequence[asyncpg.Record]) -> bytes:
        return orjson.dumps([dict(r) for r in records], default=str)

    async def once(self, connection: Any) -> tuple[int, int]:
        records = await connection.fetch(self.sql, *self.args)
        return len(records), len(self.encode(records))


async def make_floor(dataset: Dataset, shape: Shape) -> Floor:
    """The exact statement and arguments the gateway runs for ``shape`` (same watermark, same prices)."""
    engine = create_engine(dataset.url, pool_size=1)
    try:
        async with engine.connect() as connection:
            marks = await watermarks(connection)
    finally:
        await engine.dispose()
    query = UsageQuery(
        org_id=dataset.largest_org, start=shape.start, end=shape.end, granularity=shape.granularity,
        time_zone="UTC", group_by=frozenset({"model"}),
    )  # fmt: skip
    sql, args = usage_statement(query, marks.materialized_through)
    return Floor(sql, args)


class FloorClient:
    """``clients`` asyncpg connections that run a :class:`Floor` in closed loops. The same connections serve the
    warm-up and the window: PostgreSQL runs a prepared statement's first five executions on a connection with
    custom plans (here JIT-compiled: see the results), so fresh connections would not measure a settled client."""

    def __init__(self, url: str, floor: Floor, clients: int) -> None:
        self.url, self.floor, self.clients = url, floor, clients
        self._connections: list[asyncpg.Connection] = []

    async def __aenter__(self) -> FloorClient:
        self._connections = [
            await asyncpg.connect(self.url, server_settings=FLOOR_SESSION) for _ in range(self.clients)
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for connection in self._connections:
            await connection.close()

    async def run(self, seconds: float) -> dict[str, Any]:
        latencies: list[float] = []

        async def loop(connection: asyncpg.Connection, until: float) -> None:
            while (started := time.perf_counter()) < until:
                await self.floor.once(connection)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(loop(c, started + seconds) for c in self._connections))
        elapsed = time.perf_counter() - started
        what = "1 connection, sequential" if self.clients == 1 else f"{self.clients} connections, concurrent"
        return {
            "tool": f"asyncpg, {what}; rows to dicts, orjson",
            "connections": self.clients,
            "requests": len(latencies),
            "seconds": round(elapsed, 2),
            "rps": round(len(latencies) / elapsed, 1),
            "latency_ms": latency_summary_ms(latencies),
        }
