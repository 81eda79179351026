"""The gateway under test (``serve --role ingest``, from the measured code), its database, its log files, and a
``/readyz`` probe while it ingests."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from bench.harness.servers import Server, child_env, free_port, launch
from bench.harness.services import AMQP_URL, REDIS_URL, admin, database_url
from bench.harness.stats import pct

READY_TIMEOUT_S = 90


@contextlib.asynccontextmanager
async def fresh_database(code: Path) -> AsyncIterator[tuple[str, str]]:
    """(name, url) of a new database migrated by the measured code, dropped afterwards."""
    name = f"bench_ingest_{secrets.token_hex(5)}"
    await admin(f'CREATE DATABASE "{name}"')
    url = database_url(name)
    try:
        done = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "migrate", cwd=code, env=child_env(ANALYTICS_DATABASE_URL=url),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await done.communicate()
        if done.returncode != 0:
            raise RuntimeError(f"migrate failed: {err.decode()[-2000:]}")
        yield name, url
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def start_gateway(code: Path, url: str, prefix: str, config: dict[str, int], log_path: Path) -> Server:
    """The ingester on ``url`` and the prefix's queue, with ``config`` (batch_events, prefetch, max_age_ms)."""
    port = free_port()
    env = child_env(
        ANALYTICS_DATABASE_URL=url,
        ANALYTICS_AMQP_URL=AMQP_URL,
        ANALYTICS_AMQP_PREFIX=prefix,
        ANALYTICS_REDIS_URL=REDIS_URL,
        ANALYTICS_REDIS_PREFIX=f"bench:{prefix}",
        ANALYTICS_PORT=str(port),
        ANALYTICS_LOG_LEVEL="INFO",
        ANALYTICS_INGEST_BATCH_EVENTS=str(config["batch_events"]),
        ANALYTICS_INGEST_PREFETCH=str(config["prefetch"]),
        ANALYTICS_INGEST_BATCH_MAX_AGE_MS=str(config["max_age_ms"]),
    )
    command = [sys.executable, "-m", "gateway.cli", "serve", "--role", "ingest"]
    return await launch("gateway", command, env, port, log_path, cwd=code)


def log_file(folder: Path, name: str) -> Path:
    """``<folder>/logs/<name>.log``, or ``<name>.2.log`` ... when an earlier attempt's log is there."""
    path, n = folder / "logs" / f"{name}.log", 1
    while path.exists():
        n += 1
        path = folder / "logs" / f"{name}.{n}.log"
    return path


class ReadyProbe:
    """``GET /readyz`` once a second while the gateway ingests: is it still responsive (as a health check)?"""

    def __init__(self, gateway: Server) -> None:
        self.gateway = gateway
        self.latencies: list[float] = []
        self.failures: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        async with httpx.AsyncClient(base_url=self.gateway.base_url) as http:
            while True:
                started = time.monotonic()
                try:
                    response = await http.get("/readyz", timeout=10)
                    if response.status_code != 200:
                        self.failures[str(response.status_code)] += 1
                except httpx.HTTPError as exc:
                    self.failures[type(exc).__name__] += 1
                self.latencies.append(time.monotonic() - started)
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return {
            "probes": len(self.latencies),
            "p50_ms": round(pct(self.latencies, 0.5) * 1000, 1) if self.latencies else None,
            "max_ms": round(max(self.latencies) * 1000, 1) if self.latencies else None,
            "failures": dict(self.failures),
        }
