"""One run of the benchmark: its settings, servers and results, and the measurement window every scenario uses
(warm-up, CPU and database accounting, the API's collections, reruns while other work disturbs it)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from bench.api.dataset import Dataset
from bench.api.server import api_gc, gc_delta
from bench.api.summary import summarize
from bench.harness.cpu import CpuWindow, wait_quiet
from bench.harness.output import say
from bench.harness.servers import Server
from bench.harness.wrk import HttpTarget, run_wrk

DB_COUNTERS = ("xact_commit", "xact_rollback", "sessions", "blks_hit", "blks_read", "tup_returned")
Measure = Callable[[], Awaitable[dict[str, Any]]]


@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    dataset: Dataset
    api: Server
    secret: str
    work: Path
    results: dict[str, Any]
    out: Path
    env: dict[str, str]

    @property
    def seconds(self) -> float:
        return float(self.args.seconds)

    @property
    def warmup(self) -> float:
        return float(self.args.warmup)

    def save(self) -> None:
        self.results["summary"] = summarize(self.results)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=1, default=str) + "\n")

    async def window(self, label: str, measure: Measure, named: dict[int, str] | None = None,
                     warm: Callable[[], Awaitable[object]] | None = None) -> dict[str, Any]:  # fmt: skip
        """Warm up, then run ``measure`` with CPU accounting; rerun both while other work disturbs the window,
        and keep the least disturbed attempt."""
        attempts = []
        for attempt in range(self.args.retries + 1):
            if warm is not None:
                await warm()
            result = await self._measured(measure, named or {self.api.pid: "api_gateway"}, attempt + 1)
            attempts.append(result)
            usage, lat = result["cpu"], result.get("latency_ms", {})
            say(f"   {label}: {result.get('rps', 0):,.1f}/s  p50 {lat.get('p50')} ms  p99 {lat.get('p99')} ms  "
                f"(cores: {cores_line(usage)})")  # fmt: skip
            if not result["disturbed"]:
                break
            if attempt < self.args.retries:
                say(f"!! {label}: other processes used {usage['foreign_cores']:.2f} cores; measuring it again")
                await wait_quiet(60, self.args.quiet_threshold)
        kept = min(attempts, key=lambda r: r["cpu"]["foreign_cores"])
        kept["attempts"] = len(attempts)
        return kept

    async def wrk(self, label: str, target: HttpTarget, connections: int) -> dict[str, Any]:
        """A window of wrk -c``connections`` sending ``target`` to the API, after a warm-up of the same."""

        async def warm() -> object:
            return await run_wrk(self.api.base_url, target, connections=connections, seconds=self.warmup,
                                 work=self.work)  # fmt: skip

        async def measure() -> dict[str, Any]:
            return await run_wrk(self.api.base_url, target, connections=connections, seconds=self.seconds,
                                 work=self.work)  # fmt: skip

        return await self.window(label, measure, warm=warm)

    async def _measured(self, measure: Measure, named: dict[int, str], attempt: int) -> dict[str, Any]:
        cpu = CpuWindow(named, self.dataset.name)
        db_before = await database_counters(self.dataset)
        gc_before = await api_gc(self.api)
        cpu.start()
        try:
            result = await measure()
        finally:
            usage = await cpu.stop()
        result["cpu"] = usage
        result["database"] = per_request(db_before, await database_counters(self.dataset), result)
        result["api_gc"] = gc_delta(gc_before, await api_gc(self.api), int(result.get("requests", 0)))
        result["attempt"] = attempt
        result["disturbed"] = usage["foreign_cores"] > self.args.quiet_threshold
        return result


async def database_counters(dataset: Dataset) -> dict[str, int]:
    """The bench database's cumulative counters (``pg_stat_database``; backends flush them when idle, at most
    once a second, so a window's figures are approximate to about a second of work)."""
    connection = await asyncpg.connect(dataset.url)
    try:
        row = await connection.fetchrow(
            f"SELECT {', '.join(DB_COUNTERS)} FROM pg_stat_database WHERE datname = $1", dataset.name
        )
    finally:
        await connection.close()
    assert row is not None
    return {k: int(row[k] or 0) for k in DB_COUNTERS}


def per_request(before: dict[str, int], after: dict[str, int], result: dict[str, Any]) -> dict[str, Any]:
    """Database transactions and new sessions per request of the window (this accounting's own connection
    adds one session and a transaction or two to each window)."""
    requests = max(int(result.get("requests", 0)), 1)
    delta = {k: after[k] - before[k] for k in DB_COUNTERS}
    return {
        "transactions_per_request": round((delta["xact_commit"] + delta["xact_rollback"]) / requests, 2),
        "new_sessions_per_request": round(delta["sessions"] / requests, 3),
        "blocks_per_request": round((delta["blks_hit"] + delta["blks_read"]) / requests, 1),
        "counters": delta,
    }


def cores_line(usage: dict[str, Any]) -> str:
    cores = usage["cores_used"]
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(cores.items(), key=lambda kv: -kv[1]) if v >= 0.02)
