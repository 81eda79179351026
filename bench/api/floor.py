"""The floor: the SQL the gateway runs for a usage query, from bare asyncpg clients in this process; and the plain
question of the three-way benchmark (the rollup rows, no more) behind a bare HTTP server."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

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


# --- the floor as an HTTP server (python -m bench.three_way measures it with wrk, as the gateway and the peer) --

# The plain question of the three-way benchmark: the rollup rows themselves, no prices, no raw events.
PLAIN_SQL = (
    "SELECT hour, model, requests, input_tokens, cached_input_tokens, output_tokens FROM usage_hourly_model "
    "WHERE org_id = $1 AND hour >= $2 AND hour < $3 ORDER BY hour, model"
)
FLOOR_URL_ENV = "BENCH_FLOOR_DATABASE_URL"
FLOOR_POOL_ENV = "BENCH_FLOOR_POOL"
FLOOR_PATH = "/floor"


def floor_path(org_id: str, start: dt.datetime, end: dt.datetime) -> str:
    """The floor server's URL path for the plain question: ``/floor?org=..&from=..&to=..`` (ISO instants)."""
    query = urllib.parse.urlencode({"org": org_id, "from": start.isoformat(), "to": end.isoformat()})
    return f"{FLOOR_PATH}?{query}"


def plain_floor_app(url: str, pool_size: int) -> ASGIApp:
    """A bare ASGI app: ``GET /floor?org&from&to`` runs :data:`PLAIN_SQL` on an asyncpg pool of ``pool_size``
    connections and answers the rows as a JSON array (:meth:`Floor.encode`); ``GET /readyz`` is 200 once the
    pool is open. No framework, no middleware: what is left is the database, asyncpg, orjson and the HTTP
    server."""
    state: dict[str, asyncpg.Pool] = {}

    async def lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                state["pool"] = await asyncpg.create_pool(
                    url, min_size=pool_size, max_size=pool_size, server_settings=FLOOR_SESSION
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if "pool" in state:
                    await state["pool"].close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def answer(send: Send, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["path"] == "/readyz":
            await answer(send, 200 if "pool" in state else 503, b"{}")
            return
        if scope["path"] != FLOOR_PATH:
            await answer(send, 404, b'{"error": "not found"}')
            return
        params = urllib.parse.parse_qs(scope["query_string"].decode())
        try:
            args = (params["org"][0], dt.datetime.fromisoformat(params["from"][0]),
                    dt.datetime.fromisoformat(params["to"][0]))  # fmt: skip
        except (KeyError, ValueError):
            await answer(send, 400, b'{"error": "org, from and to (ISO instants) are required"}')
            return
        records = await state["pool"].fetch(PLAIN_SQL, *args)
        await answer(send, 200, Floor.encode(records))

    return app


def serve_floor(port: int) -> None:
    """Child process: :func:`plain_floor_app` on uvicorn (uvloop, httptools, as the gateway), 1 worker, on
    127.0.0.1:``port``; the database from ``BENCH_FLOOR_DATABASE_URL``, the pool size from ``BENCH_FLOOR_POOL``."""
    app = plain_floor_app(os.environ[FLOOR_URL_ENV], int(os.environ.get(FLOOR_POOL_ENV, "16")))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                            log_level="warning", lifespan="on", workers=1)  # fmt: skip
    uvicorn.Server(config).run()
