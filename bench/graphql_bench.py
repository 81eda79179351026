"""GraphQL and usage-query benchmarks: the gateway's API against the bare SQL it runs.

    python -m bench.graphql_bench                   # full: 10M events, 30 s windows, 60 s publish-to-visible
    python -m bench.graphql_bench --quick           # smoke run: 200k events, 10 s windows
    python -m bench.graphql_bench --keep-db         # keep bench_graphql_<events> for the next run (reused)

Data (loaded once into ``bench_graphql_<events>``, reused while its marker table says it is complete;
``--fresh`` rebuilds it): ``--events`` events over the 30 days ending a few minutes before the load,
1,000 orgs with Zipf volume (``ingest.synthetic``, 20 models, a few per org), written by
``ingest.writer.EventWriter`` in batches of 10,000 (generated in a child process while the previous batches
are written), the demo price catalog (``gateway.seed.demo_prices``), then rolled up with
``db.rollup.run_cycle`` and ``VACUUM ANALYZE``d. The measured org is the largest (most events).

Servers: the API runs in a child process started from this module (``--serve-app``): ``create_app(settings,
roles={api})`` with Redis (the freshness cache as in production), log level WARNING, served by uvicorn (1 worker),
plus ``/bench/plain`` (a Starlette route inside the gateway's app, so behind its middleware) and ``/bench/bare``
(the same endpoint outside the app's middleware) in the same process.

Scenarios (all in one run, so ratios hold; each window is preceded by a warm-up):

    a  usage HOUR, last 30 days, by model, the largest org: 1 client, sequential (wrk -c1) vs the floor
       (the same SQL from ``db.usage.usage_statement`` through asyncpg, rows encoded with orjson, sequential)
    b  the same with DAY over the last 30 days and over the last 365 days
    c  16 clients: the gateway's requests/s for (a) (wrk -c16) vs the floor's queries/s (asyncpg pool of 16)
    d  ``{ viewer { subject } }`` vs /bench/plain (and /bench/bare), 32 connections (wrk -c32)
    e  publish-to-visible: an ingest gateway (``serve --role ingest,rollup``, its own AMQP prefix) on the same
       database; 5,000 events/s published for 60 s (background orgs, 10-event messages) with one single-event
       probe for a dedicated org every 200 ms; the API is polled every 50 ms for that org's MINUTE totals;
       probe k is visible when ``totals.requests >= k`` (probes commit in publish order)
    f  py-spy of the API process under (c), then under the trivial query (figures of those windows are not used)

Gateway figures come from wrk (HTTP/1.1 keep-alive, a Lua script for the POST body, its latency histogram);
the floor and publish-to-visible are measured by asyncio clients in this process. CPU per process group is
read from /proc over each window, database work from ``pg_stat_database`` (transactions, new sessions and buffer
accesses per request), the API process's garbage collections from a ``gc.callbacks`` hook in the wrapper
(count, time, longest pause); this process freezes its setup objects (``gc.freeze()``) so that the floor
client's collections stay those of a lean client. A window that other work disturbed (more than
``--quiet-threshold`` cores used by processes that are not part of the benchmark) is rerun (``--retries``) and
the least disturbed attempt kept.

Results: ``bench/results/graphql.json`` (``graphql_quick.json`` with ``--quick``), the profiles in
``bench/results/graphql_profile*.txt`` (top functions) and ``graphql_profile*_raw.txt`` (collapsed stacks);
``python -m bench.report`` writes docs/benchmarks.md from the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import itertools
import json
import math
import multiprocessing
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import msgspec
import orjson

from bench.postgres import admin_url, connection_facts
from bench.profiles import count_stacks, py_spy

if TYPE_CHECKING:
    from gateway.gc_policy import GcPauses

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ADMIN_URL = admin_url()  # ANALYTICS_BENCH_POSTGRES_URL, else the Unix socket (bench/postgres.py)
AMQP_URL = os.environ.get("ANALYTICS_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("ANALYTICS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

TARGETS = {
    "usage_single_p50_ms": 25.0,
    "usage_single_p99_ms": 60.0,
    "gateway_floor_latency_ratio": 2.0,
    "concurrent16_throughput_share_of_floor": 0.5,
    "trivial_share_of_plain": 0.3,
    "publish_to_visible_p99_s": 2.0,
}
SEED = 7
ORGS = 1000
MODELS = 20
LOAD_BATCH = 10_000
DATA_DAYS = 30
DATA_END_BEFORE_NOW = dt.timedelta(minutes=5)
READY_TIMEOUT_S = 120
CPU_SAMPLE_S = 0.2
CLK_TCK = os.sysconf("SC_CLK_TCK")
MARKER_TABLE = "bench_graphql_load"
BG_ORG_PREFIX = "bgorg"
PROBE_ORG_PREFIX = "probe"
BG_SOURCE = "//bench/graphql-bg"
PROBE_SOURCE = "//bench/graphql-probe"

USAGE_QUERY = """
query Usage($orgId: ID!, $range: TimeRange!, $granularity: Granularity!) {
  usage(orgId: $orgId, range: $range, granularity: $granularity, groupBy: [MODEL]) {
    totals { requests inputTokens cachedInputTokens outputTokens totalTokens spend }
    series { start end group { model } requests inputTokens cachedInputTokens outputTokens totalTokens spend }
    unpricedModels
  }
}
""".strip()
VIEWER_QUERY = "{ viewer { subject } }"
PROBE_QUERY = (
    "query Probe($orgId: ID!, $range: TimeRange!) "
    "{ usage(orgId: $orgId, range: $range, granularity: MINUTE) { totals { requests } } }"
)

# --- output -------------------------------------------------------------------------------------------------------

_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1), nearest rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def latency_summary_ms(seconds: Sequence[float]) -> dict[str, Any]:
    if not seconds:
        return {"count": 0}
    return {
        "count": len(seconds),
        "p50": round(pct(seconds, 0.5) * 1000, 2),
        "p90": round(pct(seconds, 0.9) * 1000, 2),
        "p99": round(pct(seconds, 0.99) * 1000, 2),
        "max": round(max(seconds) * 1000, 2),
        "mean": round(sum(seconds) / len(seconds) * 1000, 2),
    }


class Progress:
    """Throttled progress lines with rate and ETA."""

    def __init__(self, what: str, total: int, every_s: float = 3.0) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.started = self.last = time.monotonic()
        self.done = 0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate else math.inf
            say(
                f"{self.what}: {self.done:,}/{self.total:,} ({100 * self.done / max(self.total, 1):5.1f}%)  "
                f"{rate:,.0f}/s  ETA {eta:,.0f} s"
            )


# --- CPU accounting from /proc ------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _cpu_s(pid: int) -> float | None:
    fields = _stat(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / CLK_TCK


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _machine_busy_total() -> tuple[float, float]:
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (parts + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / CLK_TCK, (busy + idle + iowait) / CLK_TCK


class CpuWindow:
    """CPU seconds per process group between ``start()`` and ``stop()``, sampled every ``CPU_SAMPLE_S``.

    Groups: the named pids (api, ingest), postgres (the server and the backends of the bench database),
    postgres_other_db (backends of other databases), wrk, rabbitmq, redis, py_spy, bench (this process),
    kernel threads, and other (machine busy time minus all the groups: work that is not ours).
    """

    FOREIGN = ("other", "postgres_other_db")

    def __init__(self, named: dict[int, str], database: str) -> None:
        self.named, self.database = named, database
        self._group: dict[int, str] = {}
        self._base: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0
        self._machine0 = (0.0, 0.0)

    def _classify(self, pid: int) -> str:
        if pid in self.named:
            return self.named[pid]
        if pid == os.getpid():
            return "bench"
        comm = _comm(pid)
        fields = _stat(pid)
        if fields is not None and (pid == 2 or fields[1] == "2"):
            return "kernel"
        if comm == "postgres":
            # client backends: "postgres: 15/main: <user> <database> <client address> <state>"
            match = re.match(r"postgres: [^:]+: (\S+) (\S+) (\S+)", _cmdline(pid))
            client = match is not None and (match.group(3).startswith(("127.", "[", "::")) or "(" in match.group(3))
            if client and match.group(2) not in (self.database, "postgres"):  # type: ignore[union-attr]
                return "postgres_other_db"
            return "postgres"
        return {"wrk": "wrk", "beam.smp": "rabbitmq", "redis-server": "redis", "py-spy": "py_spy"}.get(comm, "")

    def _scan(self, first: bool) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid not in self._group:
                self._group[pid] = self._classify(pid)
                if not self._group[pid]:
                    continue
                cpu = _cpu_s(pid)
                if cpu is None:
                    continue
                self._base[pid] = cpu if first else 0.0  # a process started in the window counts from zero
                self._last[pid] = cpu
            elif self._group[pid]:
                cpu = _cpu_s(pid)
                if cpu is not None:
                    self._last[pid] = cpu

    def start(self) -> None:
        self._scan(first=True)
        self._started = time.monotonic()
        self._machine0 = _machine_busy_total()

        async def loop() -> None:
            while True:
                await asyncio.sleep(CPU_SAMPLE_S)
                await asyncio.to_thread(self._scan, False)  # off the event loop that may be timing queries

        self._task = asyncio.create_task(loop())

    async def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._scan(first=False)
        wall = max(time.monotonic() - self._started, 1e-6)
        busy1, total1 = _machine_busy_total()
        seconds: dict[str, float] = defaultdict(float)
        for pid, last in self._last.items():
            seconds[self._group[pid]] += last - self._base.get(pid, 0.0)
        busy = busy1 - self._machine0[0]
        seconds["other"] = max(busy - sum(seconds.values()), 0.0)
        cores = {k: round(v / wall, 3) for k, v in sorted(seconds.items())}
        return {
            "wall_s": round(wall, 2),
            "cores_used": cores,
            "machine_busy_cores": round(busy / wall, 3),
            "machine_cores": round((total1 - self._machine0[1]) / wall, 2),
            "foreign_cores": round(sum(cores.get(k, 0.0) for k in self.FOREIGN), 3),
        }


# --- database -----------------------------------------------------------------------------------------------------


def database_url(name: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def _floor_hour(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


@dataclasses.dataclass
class Dataset:
    name: str
    url: str
    info: dict[str, Any]  # the marker row: load parameters, timings, the largest org

    @property
    def largest_org(self) -> str:
        return str(self.info["largest_org"])


def load_params(events: int) -> dict[str, Any]:
    return {"events": events, "orgs": ORGS, "models": MODELS, "seed": SEED, "days": DATA_DAYS, "zipf_s": 1.1}


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(ADMIN_URL)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def existing_dataset(name: str, params: dict[str, Any]) -> Dataset | None:
    """The dataset when its database exists and its marker says it was completely loaded with ``params``."""
    connection = await asyncpg.connect(ADMIN_URL)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
    finally:
        await connection.close()
    if not exists:
        return None
    url = database_url(name)
    connection = await asyncpg.connect(url)
    try:
        if not await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", MARKER_TABLE):
            return None
        row = await connection.fetchrow(f"SELECT info FROM {MARKER_TABLE} ORDER BY completed_at DESC LIMIT 1")
    finally:
        await connection.close()
    if row is None:
        return None
    info = json.loads(row["info"])
    if info.get("params") != params:
        say(f"{name} was loaded with other parameters: rebuilding it")
        return None
    from db.migrate import current_head

    if info.get("migration") != current_head():
        # New migrations may add tables that loading and rolling up fill (a per-model rollup, say).
        say(f"{name} is at migration {info.get('migration')}, the code at {current_head()}: rebuilding it")
        return None
    return Dataset(name, url, info)


def _produce(traffic: Any, batch: int, queue: Any) -> None:
    """Child process: generate the events and put them on ``queue`` as JSON arrays of ``batch`` events."""
    from ingest.synthetic import generate

    encoder = msgspec.json.Encoder()
    chunk: list[dict[str, object]] = []
    for event in generate(traffic):
        chunk.append(event)
        if len(chunk) == batch:
            queue.put(encoder.encode(chunk))
            chunk = []
    if chunk:
        queue.put(encoder.encode(chunk))
    queue.put(None)


async def load_dataset(name: str, params: dict[str, Any], writers: int) -> Dataset:
    """Create, migrate and fill the database; returns it with its marker row."""
    from db.engine import create_engine
    from db.migrate import migrate
    from db.partitions import ensure_usage_partitions
    from db.prices import upsert_price
    from gateway.metrics import Metrics
    from gateway.seed import demo_prices
    from ingest.events import TimeWindow, UsageEvent, check_rules
    from ingest.metrics import IngestMetrics
    from ingest.synthetic import Traffic
    from ingest.writer import EventWriter

    url = database_url(name)
    say(f"creating database {name}")
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await _admin(f'CREATE DATABASE "{name}"')
    engine = create_engine(url, pool_size=writers + 1)
    info: dict[str, Any] = {"params": params}
    try:
        revision = await migrate(engine)
        now = dt.datetime.now(dt.UTC)
        prices = demo_prices(now)
        async with engine.begin() as transaction:
            for price in prices:
                await upsert_price(transaction, price, created_by="bench")
        end = now - DATA_END_BEFORE_NOW
        start = end - dt.timedelta(days=params["days"])
        traffic = Traffic(
            seed=params["seed"], events=params["events"], orgs=params["orgs"], models=params["models"],
            span=end - start, start=start, zipf_s=params["zipf_s"], source="//bench/graphql-load",
        )  # fmt: skip
        info |= {"migration": revision, "price_versions": len(prices), "data_start": start.isoformat(),
                 "data_end": end.isoformat(), "loaded_at": now.isoformat()}  # fmt: skip
        say(
            f"loading {params['events']:,} events ({start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC), "
            f"{params['orgs']:,} orgs, {params['models']} models, {LOAD_BATCH:,} a batch, {writers} writers"
        )
        # Partitions first: concurrent writers creating the same day's partition can fail with
        # DuplicateTableError (analytics_ensure_usage_partition re-checks to_regclass after an advisory lock,
        # which does not refresh the catalog snapshot).
        async with engine.connect() as transaction:
            await ensure_usage_partitions(transaction, start.date(), end.date())
            await transaction.commit()
        writer = EventWriter(engine, None, None, IngestMetrics(Metrics.create().meter("bench")))
        window = TimeWindow.around(dt.datetime.now(dt.UTC), 90)
        decoder = msgspec.json.Decoder(list[UsageEvent])
        context = multiprocessing.get_context("spawn")
        handoff = context.Queue(maxsize=8)
        producer = context.Process(target=_produce, args=(traffic, LOAD_BATCH, handoff), daemon=True)
        producer.start()
        bodies: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=writers)
        progress = Progress("loading events", params["events"])
        accepted = 0
        started = time.monotonic()

        async def read() -> None:
            while (body := await asyncio.to_thread(handoff.get)) is not None:
                await bodies.put(body)
            for _ in range(writers):
                await bodies.put(None)

        async def write() -> None:
            nonlocal accepted
            while (body := await bodies.get()) is not None:
                events = decoder.decode(body)
                for event in events:
                    check_rules(event, window)
                written = await writer.write(events, channel="seed")
                accepted += written.accepted  # after the await: the writers share the counter
                progress.advance(len(events))

        try:
            await asyncio.gather(read(), *(write() for _ in range(writers)))
        finally:
            producer.join(timeout=10)
            if producer.is_alive():
                producer.terminate()
        load_s = time.monotonic() - started
        info |= {"events_loaded": accepted, "load_s": round(load_s, 1), "load_events_per_s": round(accepted / load_s)}
        say(f"loaded {accepted:,} events in {load_s:,.0f} s: {accepted / load_s:,.0f} events/s")
        info["rollup_s"] = await roll_up(engine, start)
        connection = await asyncpg.connect(url)
        try:
            say("VACUUM ANALYZE (so that plans and visibility maps are as a settled database's)")
            started = time.monotonic()
            await connection.execute("VACUUM (ANALYZE)")
            info["vacuum_s"] = round(time.monotonic() - started, 1)
            say(f"VACUUM ANALYZE took {info['vacuum_s']} s")
            info |= await largest_org(connection)
            info["database_size"] = await connection.fetchval("SELECT pg_size_pretty(pg_database_size($1))", name)
            info["completed_at"] = dt.datetime.now(dt.UTC).isoformat()
            await connection.execute(
                f"CREATE TABLE IF NOT EXISTS {MARKER_TABLE} (completed_at timestamptz NOT NULL, info jsonb NOT NULL)"
            )
            await connection.execute(f"INSERT INTO {MARKER_TABLE} VALUES (now(), $1::jsonb)", json.dumps(info))
        finally:
            await connection.close()
    finally:
        await engine.dispose()
    say(f"dataset ready: largest org {info['largest_org']} with {info['largest_org_events']:,} events; "
        f"database {info['database_size']}")  # fmt: skip
    return Dataset(name, url, info)


async def roll_up(engine: Any, start: dt.datetime) -> float:
    """``run_cycle`` a day at a time up to now (each cycle rolls the day before its ``now``), with progress."""
    from db.rollup import run_cycle

    started = time.monotonic()
    now = dt.datetime.now(dt.UTC)
    steps = [start + dt.timedelta(days=d) for d in range(1, (now - start).days + 1)] + [now]
    for index, moment in enumerate(steps, 1):
        result = await run_cycle(engine, moment)
        say(f"rollup: cycle {index}/{len(steps)} rolled through {result.rolled_until}  "
            f"({time.monotonic() - started:,.0f} s)")  # fmt: skip
    return round(time.monotonic() - started, 1)


async def largest_org(connection: asyncpg.Connection) -> dict[str, Any]:
    row = await connection.fetchrow(
        "SELECT org_id, sum(requests)::bigint AS n FROM usage_hourly WHERE org_id LIKE 'org\\_%' "
        "GROUP BY org_id ORDER BY n DESC LIMIT 1"
    )
    assert row is not None, "no rolled-up events"
    events = await connection.fetchval("SELECT count(*) FROM usage_events WHERE org_id = $1", row["org_id"])
    orgs = await connection.fetchval("SELECT count(DISTINCT org_id) FROM freshness_status WHERE org_id LIKE 'org\\_%'")
    models = await connection.fetch("SELECT DISTINCT model FROM usage_hourly WHERE org_id = $1", row["org_id"])
    return {
        "events_in_database": int(await connection.fetchval("SELECT count(*) FROM usage_events")),
        "largest_org": row["org_id"],
        "largest_org_events": int(events),
        "largest_org_models": sorted(r["model"] for r in models),
        "orgs_with_events": int(orgs),
    }


async def prepare_dataset(args: argparse.Namespace) -> Dataset:
    params = load_params(args.events)
    name = f"bench_graphql_{args.events}"
    if not args.fresh:
        found = await existing_dataset(name, params)
        if found is not None:
            age = dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(found.info["data_end"])
            say(f"reusing {name} (loaded {found.info['loaded_at']}, data ends {age.total_seconds() / 3600:.1f} h ago)")
            if age > dt.timedelta(days=1):
                say("!! the data ends more than a day ago: 'last 30 days' now covers less of it (--fresh reloads)")
            found.info["reused"] = True
            return found
    await wait_for_other_benchmarks(args)
    dataset = await load_dataset(name, params, args.load_writers)
    dataset.info["reused"] = False
    return dataset


# --- servers ------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# One benchmark token sends from 16-32 connections at once: per-caller limits would measure refusals.
UNLIMITED = {"ANALYTICS_RATE_LIMIT_PER_MINUTE": "1000000000", "ANALYTICS_MAX_CONCURRENT_PER_CALLER": "256"}


def _env(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ANALYTICS_")} | UNLIMITED | extra


def serve_app(port: int) -> None:
    """Child process: the API (settings from ``ANALYTICS_*``) plus the plain endpoints, on uvicorn."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
    from starlette.types import Receive, Scope, Send

    from gateway.app import create_app
    from gateway.gc_policy import GcPauses
    from gateway.logging import configure_logging
    from kernel.settings import Role, load_settings

    settings = load_settings()
    configure_logging(settings.log_level)
    pauses = GcPauses()
    gc.callbacks.append(pauses.callback)

    async def plain(request: Request) -> Response:
        return JSONResponse({"subject": "x"})

    async def gc_stats(request: Request) -> Response:
        return JSONResponse(gc_snapshot(pauses))

    app = create_app(settings, frozenset({Role.API}))
    app.router.routes.insert(0, Route("/bench/plain", plain))  # inside the gateway's middleware
    bare = Starlette(routes=[Route("/bench/bare", plain), Route("/bench/gc", gc_stats)])

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/bench/") and scope["path"] != "/bench/plain":
            await bare(scope, receive, send)
        else:
            await app(scope, receive, send)

    config = uvicorn.Config(
        dispatch, host="127.0.0.1", port=port, log_config=None, access_log=False, log_level="warning", workers=1
    )
    uvicorn.Server(config).run()


def gc_snapshot(pauses: GcPauses) -> dict[str, Any]:
    """The API process's collections so far; the longest pauses since the previous snapshot."""
    out = {
        "count": list(pauses.collections),
        "total_ms": [round(t * 1000, 2) for t in pauses.seconds],
        "longest_ms": [round(t * 1000, 2) for t in pauses.longest],
        "tracked_objects": len(gc.get_objects()),
    }
    pauses.longest = [0.0, 0.0, 0.0]
    return out


async def api_gc(server: Server) -> dict[str, Any] | None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = await http.get("/bench/gc")
            if response.status_code == 200:
                return dict(response.json())
    return None


def gc_delta(before: dict[str, Any] | None, after: dict[str, Any] | None, requests: int) -> dict[str, Any]:
    """The API process's collections during a window: per generation, count, time, longest pause."""
    if before is None or after is None:
        return {}
    count = [a - b for a, b in zip(after["count"], before["count"], strict=True)]
    total = [round(a - b, 2) for a, b in zip(after["total_ms"], before["total_ms"], strict=True)]
    return {
        "collections": count,
        "total_ms": total,
        "longest_ms": after["longest_ms"],
        "ms_per_request": round(sum(total) / max(requests, 1), 3),
        "tracked_objects": after["tracked_objects"],
    }


@dataclasses.dataclass
class Server:
    name: str
    process: asyncio.subprocess.Process
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_server(name: str, command: list[str], env: dict[str, str], port: int, log_dir: Path) -> Server:
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(name, process, port, log_path)
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/readyz", timeout=5)).status_code == 200:
                    say(f"{name} ready on :{port} (pid {process.pid})")
                    return server
            await asyncio.sleep(0.2)
    await stop_server(server)
    raise RuntimeError(f"{name} not ready after {READY_TIMEOUT_S} s; see {log_path}")


async def stop_server(server: Server) -> int | None:
    if server.process.returncode is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(server.process.wait(), 60)
        except TimeoutError:
            server.process.kill()
            await server.process.wait()
    return server.process.returncode


def log_problems(path: Path) -> dict[str, int]:
    """Warning and error events of a JSON-lines log, counted."""
    found: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            if "Error" in line or "Traceback" in line:
                found[line.strip()[:120]] += 1
            continue
        if str(record.get("level")) in ("warning", "error", "critical", "exception"):
            found[f"{record.get('level')}: {record.get('event')}"] += 1
    return dict(found)


# --- load generators ----------------------------------------------------------------------------------------------

WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "errors": {"connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d}, "latency_us": {"min": %d, "max": %d, "mean": %.1f, ' ..
    '"stdev": %.1f, "p50": %d, "p75": %d, "p90": %d, "p99": %d, "p999": %d}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev, latency:percentile(50), latency:percentile(75),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
"""


@dataclasses.dataclass(frozen=True)
class HttpTarget:
    """One request that wrk repeats."""

    path: str
    method: str = "GET"
    body: bytes | None = None
    token: str | None = None

    def lua(self) -> str:
        lines = [f'wrk.method = "{self.method}"']
        if self.body is not None:
            assert b"]==]" not in self.body
            lines += [f"wrk.body = [==[{self.body.decode()}]==]", 'wrk.headers["Content-Type"] = "application/json"']
        if self.token is not None:
            lines.append(f'wrk.headers["Authorization"] = "Bearer {self.token}"')
        return "\n".join(lines) + "\n" + WRK_DONE


def graphql_target(query: str, variables: dict[str, Any] | None, token: str) -> HttpTarget:
    body = orjson.dumps({"query": query, "variables": variables or {}})
    return HttpTarget("/graphql", "POST", body, token)


async def run_wrk(base_url: str, target: HttpTarget, *, connections: int, seconds: float, work: Path) -> dict[str, Any]:
    script = work / f"wrk_{secrets.token_hex(4)}.lua"
    script.write_text(target.lua())
    command = [
        "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "60s", "--latency",
        "-s", str(script), base_url + target.path,
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    text = out.decode(errors="replace")
    line = next((x for x in text.splitlines() if x.startswith("WRK_JSON ")), None)
    if process.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({process.returncode}): {text[-1000:]} {err.decode()[-1000:]}")
    raw = json.loads(line.removeprefix("WRK_JSON "))
    seconds_run = raw["duration_us"] / 1e6
    errors = sum(raw["errors"].values())
    lat = raw["latency_us"]
    return {
        "tool": f"wrk -t1 -c{connections} (Lua script, keep-alive)",
        "connections": connections,
        "requests": raw["requests"],
        "seconds": round(seconds_run, 2),
        "rps": round(raw["requests"] / seconds_run, 1),
        "errors": raw["errors"],
        "error_count": errors,
        "bytes_per_response": round(raw["bytes"] / max(raw["requests"], 1)),
        "latency_ms": {k: round(lat[k] / 1000, 2) for k in ("p50", "p90", "p99", "p999", "max", "mean")},
        "wrk_latency_distribution": _wrk_distribution(text),
    }


def _wrk_distribution(text: str) -> str:
    lines = text.splitlines()
    start = next((i for i, x in enumerate(lines) if "Latency Distribution" in x), None)
    return "\n".join(x.strip() for x in lines[start : start + 5]) if start is not None else ""


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


# The gateway's session settings (db/engine.py), so both run the statement under the same planner settings.
FLOOR_SESSION = {"TimeZone": "UTC", "jit": "off"}


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


# --- the run ------------------------------------------------------------------------------------------------------


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

    async def window(self, label: str, measure: Callable[[], Awaitable[dict[str, Any]]],
                     named: dict[int, str] | None = None,
                     warm: Callable[[], Awaitable[object]] | None = None) -> dict[str, Any]:  # fmt: skip
        """Warm up, then run ``measure`` with CPU accounting; rerun both while other work disturbs the window,
        and keep the least disturbed attempt."""
        attempts = []
        for attempt in range(self.args.retries + 1):
            if warm is not None:
                await warm()
            cpu = CpuWindow(named or {self.api.pid: "api_gateway"}, self.dataset.name)
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
            result["attempt"] = attempt + 1
            result["disturbed"] = usage["foreign_cores"] > self.args.quiet_threshold
            attempts.append(result)
            lat = result.get("latency_ms", {})
            say(f"   {label}: {result.get('rps', 0):,.1f}/s  p50 {lat.get('p50')} ms  p99 {lat.get('p99')} ms  "
                f"(cores: {_cores_line(usage)})")  # fmt: skip
            if not result["disturbed"]:
                break
            if attempt < self.args.retries:
                say(f"!! {label}: other processes used {usage['foreign_cores']:.2f} cores; measuring it again")
                await wait_quiet(60, self.args.quiet_threshold)
        kept = min(attempts, key=lambda r: r["cpu"]["foreign_cores"])
        kept["attempts"] = len(attempts)
        return kept


DB_COUNTERS = ("xact_commit", "xact_rollback", "sessions", "blks_hit", "blks_read", "tup_returned")


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


def _cores_line(usage: dict[str, Any]) -> str:
    cores = usage["cores_used"]
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(cores.items(), key=lambda kv: -kv[1]) if v >= 0.02)


def token_for(secret: str, org_id: str) -> str:
    from kernel.auth import issue_token

    return issue_token(secret, ["org_admin"], subject="bench", org_id=org_id, ttl_seconds=6 * 3600)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A usage query of the benchmark."""

    key: str
    granularity: str
    start: dt.datetime
    end: dt.datetime

    def variables(self, org_id: str) -> dict[str, Any]:
        return {
            "orgId": org_id,
            "granularity": self.granularity,
            "range": {"from": _iso(self.start), "to": _iso(self.end)},
        }


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def shapes(now: dt.datetime) -> list[Shape]:
    """The "last 30 days" as a frontend asks: whole hours for HOUR (720 buckets), whole UTC days for DAY."""
    next_hour = _floor_hour(now) + dt.timedelta(hours=1)
    tomorrow = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    return [
        Shape("hour_30d", "HOUR", next_hour - dt.timedelta(days=30), next_hour),
        Shape("day_30d", "DAY", tomorrow - dt.timedelta(days=30), tomorrow),
        Shape("day_365d", "DAY", tomorrow - dt.timedelta(days=365), tomorrow),
    ]


async def make_floor(dataset: Dataset, shape: Shape) -> Floor:
    """The exact statement and arguments the gateway runs for ``shape`` (same watermark, same prices)."""
    from db.engine import create_engine
    from db.rollup import watermarks
    from db.usage import UsageQuery, usage_statement

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


async def check_usage(run: Run, shape: Shape, token: str, floor: Floor) -> dict[str, Any]:
    """One request through the API, checked against the floor's rows; sizes and bucket count."""
    body = {"query": USAGE_QUERY, "variables": shape.variables(run.dataset.largest_org)}
    async with httpx.AsyncClient(base_url=run.api.base_url, timeout=60) as http:
        response = await http.post("/graphql", json=body, headers={"Authorization": f"Bearer {token}"})
    payload = response.json()
    if response.status_code != 200 or payload.get("errors"):
        raise RuntimeError(f"usage query failed: {response.status_code} {response.text[:1000]}")
    usage = payload["data"]["usage"]
    connection = await asyncpg.connect(run.dataset.url, server_settings={"TimeZone": "UTC"})
    try:
        records = await connection.fetch(floor.sql, *floor.args)
    finally:
        await connection.close()
    floor_requests = sum(int(r["requests"]) for r in records)
    if floor_requests != int(usage["totals"]["requests"]):
        raise RuntimeError(f"gateway totals {usage['totals']['requests']} != floor rows {floor_requests}")
    return {
        "range": {"from": _iso(shape.start), "to": _iso(shape.end)},
        "granularity": shape.granularity,
        "group_by": ["MODEL"],
        "buckets": len(usage["series"]),
        "distinct_bucket_starts": len({b["start"] for b in usage["series"]}),
        "response_bytes": len(response.content),
        "requests_in_range": int(usage["totals"]["requests"]),
        "unpriced_models": usage["unpricedModels"],
        "floor_rows": len(records),
        "floor_json_bytes": len(Floor.encode(records)),
        "rollup_hours_in_plan": round((floor.args[4] - floor.args[3]).total_seconds() / 3600),  # type: ignore[operator]
    }


async def scenario_single(run: Run, shape: Shape, token: str) -> dict[str, Any]:
    """(a) and (b): one client, sequential, the gateway and the floor."""
    say(f"== usage {shape.key}: single client")
    floor = await make_floor(run.dataset, shape)
    check = await check_usage(run, shape, token, floor)
    say(f"   {check['buckets']:,} buckets, response {check['response_bytes']:,} bytes, "
        f"floor {check['floor_rows']:,} rows")  # fmt: skip
    target = graphql_target(USAGE_QUERY, shape.variables(run.dataset.largest_org), token)

    async def warm_gateway() -> object:
        return await run_wrk(run.api.base_url, target, connections=1, seconds=run.warmup, work=run.work)

    async def gateway() -> dict[str, Any]:
        return await run_wrk(run.api.base_url, target, connections=1, seconds=run.seconds, work=run.work)

    entry: dict[str, Any] = {"query": check}
    entry["gateway"] = await run.window(f"gateway {shape.key} c1", gateway, warm=warm_gateway)
    async with FloorClient(run.dataset.url, floor, 1) as client:
        entry["floor"] = await run.window(
            f"floor {shape.key} c1", lambda: client.run(run.seconds), warm=lambda: client.run(run.warmup)
        )
    gw, fl = entry["gateway"]["latency_ms"], entry["floor"]["latency_ms"]
    entry["ratio_gateway_to_floor"] = {k: round(gw[k] / fl[k], 2) for k in ("p50", "p90", "p99") if fl.get(k)}
    return entry


async def scenario_concurrent(run: Run, shape: Shape, token: str, clients: int) -> dict[str, Any]:
    """(c): ``clients`` concurrent clients, the gateway's requests/s against the floor's queries/s."""
    say(f"== usage {shape.key}: {clients} concurrent clients")
    floor = await make_floor(run.dataset, shape)
    target = graphql_target(USAGE_QUERY, shape.variables(run.dataset.largest_org), token)

    async def warm_gateway() -> object:
        return await run_wrk(run.api.base_url, target, connections=clients, seconds=run.warmup, work=run.work)

    async def gateway() -> dict[str, Any]:
        return await run_wrk(run.api.base_url, target, connections=clients, seconds=run.seconds, work=run.work)

    entry: dict[str, Any] = {"query": shape.key, "clients": clients}
    entry["gateway"] = await run.window(f"gateway {shape.key} c{clients}", gateway, warm=warm_gateway)
    async with FloorClient(run.dataset.url, floor, clients) as client:
        entry["floor"] = await run.window(
            f"floor {shape.key} c{clients}", lambda: client.run(run.seconds), warm=lambda: client.run(run.warmup)
        )
    entry["throughput_share_of_floor"] = round(entry["gateway"]["rps"] / entry["floor"]["rps"], 3)
    return entry


async def scenario_trivial(run: Run, token: str, connections: int) -> None:
    """(d): a trivial GraphQL query against a plain JSON endpoint of the same process."""
    say(f"== trivial query vs plain endpoint, {connections} connections")
    targets = {
        "viewer": graphql_target(VIEWER_QUERY, None, token),
        "plain": HttpTarget("/bench/plain"),
        "bare": HttpTarget("/bench/bare"),
    }
    async with httpx.AsyncClient(base_url=run.api.base_url) as http:
        response = await http.post(
            "/graphql", json={"query": VIEWER_QUERY}, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 200 and "errors" not in response.json(), response.text
    entry: dict[str, Any] = {"connections": connections, "viewer_query": VIEWER_QUERY}
    for name, target in targets.items():

        async def warm(target: HttpTarget = target) -> object:
            return await run_wrk(run.api.base_url, target, connections=connections, seconds=run.warmup, work=run.work)

        async def measure(target: HttpTarget = target) -> dict[str, Any]:
            return await run_wrk(run.api.base_url, target, connections=connections, seconds=run.seconds, work=run.work)

        entry[name] = await run.window(f"{name} c{connections}", measure, warm=warm)
    entry["viewer_share_of_plain"] = round(entry["viewer"]["rps"] / entry["plain"]["rps"], 3)
    entry["viewer_share_of_bare"] = round(entry["viewer"]["rps"] / entry["bare"]["rps"], 3)
    entry["plain_share_of_bare"] = round(entry["plain"]["rps"] / entry["bare"]["rps"], 3)
    run.results["trivial"] = entry
    run.save()


# --- (f) profile --------------------------------------------------------------------------------------------------


AREAS = (
    ("schema/execution", "schema.execution (fast list projection)"),
    ("graphql/", "graphql-core (parse, validate, execute)"),
    ("strawberry/", "Strawberry (view, extensions, execution)"),
    ("resolvers/usage_report", "resolvers.usage_report (buckets, Decimal sums)"),
    ("resolvers/", "resolvers (other)"),
    ("schema/", "schema (scalars, audit, errors)"),
    ("db/usage", "db.usage (UsageRow per record)"),
    ("asyncpg", "asyncpg (protocol, row decoding)"),
    ("sqlalchemy", "SQLAlchemy (pool, connection checkout, pre-ping)"),
    ("redis", "redis client (freshness cache)"),
    ("opentelemetry", "OpenTelemetry (ASGI middleware, metrics)"),
    # py-spy shortens the paths of the opentelemetry namespace packages:
    ("metrics/_internal", "OpenTelemetry (ASGI middleware, metrics)"),
    ("attributes/", "OpenTelemetry (ASGI middleware, metrics)"),
    ("_semconv", "OpenTelemetry (ASGI middleware, metrics)"),
    ("instrumentation/", "OpenTelemetry (ASGI middleware, metrics)"),
    ("util/http", "OpenTelemetry (ASGI middleware, metrics)"),
    ("trace/", "OpenTelemetry (ASGI middleware, metrics)"),
    ("context/", "OpenTelemetry (ASGI middleware, metrics)"),
    ("asgi/__init__", "OpenTelemetry (ASGI middleware, metrics)"),  # after strawberry/: its asgi is Strawberry's
    ("gateway/middleware", "gateway.middleware (request id, access log)"),
    ("uuid.py", "uuid (request ids)"),
    ("contextlib.py", "contextlib (context managers: structlog, exit stacks)"),
    ("inspect.py", "inspect (Strawberry's awaitable checks)"),
    ("json/", "stdlib json (request bodies)"),
    ("starlette", "Starlette"),
    ("uvicorn", "uvicorn (HTTP)"),
    ("httptools", "uvicorn (HTTP)"),
    ("orjson", "orjson"),
    ("jwt/", "PyJWT (token verification)"),
    ("gateway/auth", "kernel.auth"),
    ("structlog", "structlog"),
    ("gateway/", "gateway (other)"),
    ("decimal", "decimal"),
    ("asyncio", "asyncio (Python side)"),
    ("collections/", "collections (namedtuple _make: UsageRow)"),
)


NOT_AREAS = ("<frozen runpy>", "bench/", "uvicorn/server.py", "uvicorn/main.py", "uvicorn/_compat.py")


def _area(file: str, func: str) -> str:
    if file == "<string>":  # code made with exec: dataclass __init__s, the compiled list projectors
        return "schema.execution (fast list projection)" if func == "project" else "dataclass __init__ (exec'd)"
    if file.endswith("asyncio/runners.py") or "uvloop" in file:
        return "event loop (uvloop, native: socket I/O, callbacks)"
    return next((name for needle, name in AREAS if needle in file), f"other ({file.split('/')[0]})")


def summarize_profile(collapsed: Path, duration_s: float, rate_hz: int) -> dict[str, Any]:
    """Self and total samples per function, and self samples per area, from py-spy's collapsed stacks."""
    counts = count_stacks(collapsed, _area, NOT_AREAS)
    return {
        "samples": counts.samples,
        "busy_share_of_one_core": counts.busy_share(duration_s, rate_hz),
        "by_area_self": counts.top(counts.area_self, 20),
        "by_area_total": counts.top(counts.area_total, 20),
        "top_self": counts.top(counts.self_samples, 25),
        "top_total": counts.top(counts.total_samples, 40),
    }


def profile_text(summary: dict[str, Any], title: str) -> str:
    lines = [
        title,
        f"py-spy samples: {summary['samples']} (busy share of one core: {summary['busy_share_of_one_core']})",
        "",
    ]
    sections = (
        ("self time by area", "by_area_self"), ("time by area, inclusive", "by_area_total"),
        ("self time by function", "top_self"), ("total (inclusive) time by function", "top_total"),
    )  # fmt: skip
    for heading, key in sections:
        lines.append(f"== {heading}")
        lines += [f"{row['share'] * 100:5.1f}%  {row['samples']:6d}  {row['function']}" for row in summary[key]]
        lines.append("")
    return "\n".join(lines)


async def scenario_profile(run: Run, shape: Shape, token: str, clients: int) -> None:
    """(f): py-spy on the API process while ``clients`` clients run the usage query (the slowest path), then,
    shorter, under the trivial query (where GraphQL's own overhead shows)."""
    if py_spy() is None:
        say("!! py-spy not found (pip install py-spy): no profile")
        return
    usage = graphql_target(USAGE_QUERY, shape.variables(run.dataset.largest_org), token)
    seconds = max(5, round(run.args.profile_seconds))
    run.results["profile"] = await record_profile(
        run, usage, clients, seconds, "graphql_profile", f"{clients} clients of usage {shape.key}"
    )
    run.save()
    viewer = graphql_target(VIEWER_QUERY, None, token)
    run.results["profile_trivial"] = await record_profile(
        run, viewer, 32, max(5, seconds // 2), "graphql_profile_trivial", "32 connections of { viewer { subject } }"
    )
    run.save()


async def record_profile(run: Run, target: HttpTarget, connections: int, seconds: int, name: str,
                         under: str) -> dict[str, Any]:  # fmt: skip
    """py-spy (raw, 100 Hz) of the API while wrk runs ``target``; writes ``<name>.txt`` and ``<name>_raw.txt``."""
    binary = py_spy()
    assert binary is not None
    raw_path, text_path = RESULTS / f"{name}_raw.txt", RESULTS / f"{name}.txt"
    say(f"== profile: py-spy on the API (pid {run.api.pid}) for {seconds} s under {under}")
    await run_wrk(run.api.base_url, target, connections=connections, seconds=run.warmup, work=run.work)
    spy = await asyncio.create_subprocess_exec(
        binary, "record", "--pid", str(run.api.pid), "--duration", str(seconds), "--rate", "100",
        "--format", "raw", "--output", str(raw_path), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    load = await run_wrk(run.api.base_url, target, connections=connections, seconds=seconds + 2, work=run.work)
    _, err = await spy.communicate()
    if spy.returncode != 0 or not raw_path.exists():
        say(f"!! py-spy failed: {err.decode()[-500:]}")
        return {"error": err.decode()[-500:]}
    summary = summarize_profile(raw_path, seconds, 100)
    title = (
        f"py-spy record --rate 100 of the API process for {seconds} s while wrk ran {under}; "
        f"{load['rps']} req/s under the profiler"
    )
    text_path.write_text(profile_text(summary, title))
    say("   top areas (self): " + ", ".join(f"{r['function']} {r['share']:.0%}" for r in summary["by_area_self"][:6]))
    return summary | {
        "under": under,
        "duration_s": seconds,
        "rate_hz": 100,
        "rps_under_profiler": load["rps"],
        "files": [str(text_path.relative_to(ROOT)), str(raw_path.relative_to(ROOT))],
    }


# --- (e) publish-to-visible ---------------------------------------------------------------------------------------


async def delete_topology(prefix: str) -> None:
    import aio_pika

    from ingest.topology import Topology

    topology = Topology.named(prefix)
    connection = await aio_pika.connect_robust(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for queue in (topology.queue, topology.dead_letter_queue):
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        for exchange in (topology.exchange, topology.dead_letter_exchange):
            with contextlib.suppress(Exception):
                await channel.exchange_delete(exchange)


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
            variables = {"orgId": org_id, "range": {"from": _iso(end - dt.timedelta(hours=1)), "to": _iso(end)}}
            sent = time.time()
            response = await http.post("/graphql", json={"query": PROBE_QUERY, "variables": variables}, headers=headers)
            received = time.time()
            payload = response.json()
            if response.status_code != 200 or payload.get("errors"):
                raise RuntimeError(f"probe poll failed: {response.status_code} {response.text[:500]}")
            polls.append(Poll(sent, received, int(payload["data"]["usage"]["totals"]["requests"])))
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def publish_steady(prefix: str, background: list[bytes], bg_batch: int, *, rate: float, seconds: float,
                         probe_org: str, probe_every: float, probes: list[float]) -> dict[str, Any]:  # fmt: skip
    """Publish ``rate`` events/s in total for ``seconds``: background messages of ``bg_batch`` events, and a
    single-event probe for ``probe_org`` every ``probe_every`` s (its publish time appended to ``probes``)."""
    import aio_pika

    from ingest.decode import BATCH, SINGLE
    from ingest.publisher import EventPublisher
    from ingest.topology import Topology

    encoder = msgspec.json.Encoder()
    bg_rate = rate - 1 / probe_every
    connection = await aio_pika.connect_robust(AMQP_URL)
    bg_sent = 0
    async with connection, EventPublisher(connection, Topology.named(prefix), max_in_flight=1000) as publisher:
        started = time.monotonic()
        reported = started
        messages = iter(background)
        while (elapsed := time.monotonic() - started) < seconds:
            due_probe = len(probes) <= elapsed / probe_every
            due_bg = bg_sent < elapsed * bg_rate
            if due_probe:
                sent_at = time.time()
                event = _probe_event(probe_org, len(probes) + 1, sent_at)
                await publisher.publish_body(encoder.encode(event), content_type=SINGLE)
                probes.append(sent_at)
            elif due_bg:
                body = next(messages, None)
                if body is None:
                    break
                await publisher.publish_body(body, content_type=BATCH)
                bg_sent += bg_batch
            else:
                next_bg = started + bg_sent / bg_rate
                next_probe = started + len(probes) * probe_every
                await asyncio.sleep(max(0.0005, min(next_bg, next_probe) - time.monotonic()))
            if time.monotonic() - reported >= 5:
                reported = time.monotonic()
                say(f"   publishing: {bg_sent + len(probes):,} events  "
                    f"{(bg_sent + len(probes)) / (reported - started):,.0f} events/s")  # fmt: skip
        publish_s = time.monotonic() - started
        await publisher.drain()
    return {
        "seconds": round(publish_s, 2),
        "background_events": bg_sent,
        "probe_events": len(probes),
        "events_per_s": round((bg_sent + len(probes)) / publish_s),
        "background_message_events": bg_batch,
    }


def _probe_event(org_id: str, index: int, sent_at: float) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": f"probe-{index:06d}.t{int(sent_at * 1e6)}",
        "source": PROBE_SOURCE,
        "type": "ai.usage.request.v1",
        "time": _iso(dt.datetime.fromtimestamp(sent_at, dt.UTC)),
        "data": {
            "org_id": org_id,
            "model": "gpt-4o-mini",
            "input_tokens": 100,
            "output_tokens": 10,
            "latency_ms": 100.0,
            "status_code": 200,
        },
    }


def background_bodies(events: int, batch: int, seconds: float, seed: int) -> list[bytes]:
    from ingest.synthetic import Traffic, generate

    start = dt.datetime.now(dt.UTC)
    traffic = Traffic(seed=seed, events=events, orgs=200, models=12, span=dt.timedelta(seconds=seconds),
                      start=start, org_prefix=BG_ORG_PREFIX, source=BG_SOURCE)  # fmt: skip
    encoder = msgspec.json.Encoder()
    source = generate(traffic)
    return [encoder.encode(chunk) for chunk in iter(lambda: list(itertools.islice(source, batch)), [])]


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
    from ingest.synthetic import sent_at_from_id

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


async def scenario_publish_to_visible(run: Run) -> None:
    """(e): steady publishing through an ingest gateway while the API is polled for a probe org."""
    rate, seconds, bg_batch = run.args.rate, run.args.visible_seconds, run.args.bg_batch
    probe_every, poll_every = 0.2, 0.05
    say(f"== publish-to-visible: {rate:,} events/s for {seconds} s (background in {bg_batch}-event messages, "
        f"a probe every {probe_every * 1000:.0f} ms, polls every {poll_every * 1000:.0f} ms)")  # fmt: skip
    removed = await remove_publish_events(run.dataset.url)
    if removed:
        say(f"   removed {removed:,} events of earlier publish-to-visible runs")
    prefix = f"bench_gql_{secrets.token_hex(4)}."
    bg_events = int((rate - 1 / probe_every) * seconds)
    attempt: dict[str, Any] = {}

    async def prepare() -> None:
        """Before each attempt (outside its window): a new probe org, and background events never sent before."""
        attempt["probe_org"] = f"{PROBE_ORG_PREFIX}_{secrets.token_hex(4)}"
        attempt["token"] = token_for(run.secret, attempt["probe_org"])
        attempt["background"] = await asyncio.to_thread(
            background_bodies, bg_events, bg_batch, seconds, secrets.randbelow(2**31)
        )
        await wait_quiet(30, run.args.quiet_threshold)

    port = free_port()
    env = _env(
        ANALYTICS_DATABASE_URL=run.dataset.url, ANALYTICS_AMQP_URL=AMQP_URL, ANALYTICS_AMQP_PREFIX=prefix,
        ANALYTICS_REDIS_URL=REDIS_URL, ANALYTICS_REDIS_PREFIX=run.results["settings"]["redis_prefix"],
        ANALYTICS_PORT=str(port), ANALYTICS_LOG_LEVEL="INFO",
    )  # fmt: skip
    entry: dict[str, Any] = {
        "amqp_prefix": prefix, "rate_target": rate, "seconds_target": seconds, "probe_every_s": probe_every,
        "poll_every_s": poll_every,
    }  # fmt: skip
    try:
        import aio_pika

        from ingest.publisher import EventPublisher
        from ingest.topology import Topology

        connection = await aio_pika.connect_robust(AMQP_URL)
        async with connection, EventPublisher(connection, Topology.named(prefix)):
            pass  # declare the queue before anything is published
        ingest = await start_server(
            "ingest_gateway", [sys.executable, "-m", "gateway.cli", "serve", "--role", "ingest,rollup"], env, port,
            run.work,
        )  # fmt: skip
        try:
            await asyncio.sleep(2)

            async def measure() -> dict[str, Any]:
                probe_org, token, background = attempt["probe_org"], attempt["token"], attempt["background"]
                polls: list[Poll] = []
                probes: list[float] = []
                stop = asyncio.Event()
                poller = asyncio.create_task(
                    poll_probe_org(run.api.base_url, probe_org, token, poll_every, polls, stop)
                )
                try:
                    published = await publish_steady(
                        prefix, background, bg_batch, rate=rate, seconds=seconds, probe_org=probe_org,
                        probe_every=probe_every, probes=probes,
                    )  # fmt: skip
                    deadline = time.monotonic() + 30
                    while (not polls or polls[-1].count < len(probes)) and time.monotonic() < deadline:
                        if poller.done():
                            poller.result()
                        await asyncio.sleep(0.1)
                finally:
                    stop.set()
                    await poller
                lags = probe_lags(probes, polls)
                by = [x["visible_by"] for x in lags]
                after = [x["visible_after"] for x in lags]
                poll_ms = [(p.received - p.sent) for p in polls]
                warm = [x["visible_by"] for x in lags if x["published"] >= probes[0] + 5] if probes else []
                return {
                    "probe_org": probe_org,
                    "publish": published,
                    "probes_published": len(probes),
                    "probes_seen": polls[-1].count if polls else 0,
                    "polls": len(polls),
                    "poll_latency_ms": latency_summary_ms(poll_ms),
                    "lag_s": _seconds_summary(by),
                    "lag_s_after_5s": _seconds_summary(warm),
                    "lag_lower_bound_s": _seconds_summary(after),
                    "latency_ms": {k: v * 1000 for k, v in _seconds_summary(by).items() if k != "count"},
                    "rps": published["events_per_s"],
                }

            named = {run.api.pid: "api_gateway", ingest.pid: "ingest_gateway"}
            entry |= await run.window("publish-to-visible", measure, named, warm=prepare)
        finally:
            code = await stop_server(ingest)
        entry["ingest_gateway_exit_code"] = code
        entry["ingest_gateway_log_problems"] = log_problems(ingest.log_path)
        commits = await probe_commits(run.dataset.url)
        entry["publish_to_commit_s"] = _seconds_summary(list(commits.values()))
        lag = entry["lag_s"]
        commit = entry["publish_to_commit_s"]
        say(f"   publish-to-visible: p50 {lag.get('p50')} s  p99 {lag.get('p99')} s  max {lag.get('max')} s "
            f"({lag.get('count')} probes); publish-to-commit p99 {commit.get('p99')} s")  # fmt: skip
    finally:
        await delete_topology(prefix)
    run.results["publish_to_visible"] = entry
    run.save()


def _seconds_summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "p50": round(pct(values, 0.5), 3),
        "p90": round(pct(values, 0.9), 3),
        "p99": round(pct(values, 0.99), 3),
        "max": round(max(values), 3),
        "mean": round(sum(values) / len(values), 3),
    }


# --- API process ----------------------------------------------------------------------------------------------------


async def start_api(env: dict[str, str], work: Path, name: str = "api_gateway") -> Server:
    port = free_port()
    command = [sys.executable, "-m", "bench.graphql_bench", "--serve-app", str(port)]
    return await start_server(name, command, env, port, work)


# --- summary ------------------------------------------------------------------------------------------------------


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Figures against the targets (only what was measured)."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: float, better: str, unit: str) -> None:
        if value is None:
            return
        met = value <= target if better == "lower" else value >= target
        rows.append({"what": name, "value": value, "target": target, "unit": unit, "better": better, "met": met})

    labels = {"hour_30d": "HOUR 30 d", "day_30d": "DAY 30 d", "day_365d": "DAY 365 d"}
    for key, single in results.get("usage_single", {}).items():  # the single-client targets hold for each shape
        label, lat = labels.get(key, key), single["gateway"]["latency_ms"]
        ratio = single["ratio_gateway_to_floor"]
        add(f"usage {label}, 1 client, p50", lat["p50"], TARGETS["usage_single_p50_ms"], "lower", "ms")
        add(f"usage {label}, 1 client, p99", lat["p99"], TARGETS["usage_single_p99_ms"], "lower", "ms")
        add(f"gateway / floor latency, {label}, p50", ratio.get("p50"), TARGETS["gateway_floor_latency_ratio"],
            "lower", "x")  # fmt: skip
        add(f"gateway / floor latency, {label}, p99", ratio.get("p99"), TARGETS["gateway_floor_latency_ratio"],
            "lower", "x")  # fmt: skip
    concurrent = results.get("usage_concurrent")
    if concurrent:
        add("16 clients: gateway req/s / floor queries/s", concurrent["throughput_share_of_floor"],
            TARGETS["concurrent16_throughput_share_of_floor"], "higher", "share")  # fmt: skip
    trivial = results.get("trivial")
    if trivial:
        add("trivial query req/s / plain endpoint req/s", trivial["viewer_share_of_plain"],
            TARGETS["trivial_share_of_plain"], "higher", "share")  # fmt: skip
    visible = results.get("publish_to_visible", {}).get("lag_s")
    if visible and visible.get("count"):
        add("publish-to-visible p99", visible["p99"], TARGETS["publish_to_visible_p99_s"], "lower", "s")
    return {"targets": rows, "all_met": all(r["met"] for r in rows) if rows else None}


# --- orchestration ------------------------------------------------------------------------------------------------


def other_benchmarks() -> list[str]:
    # "[.]" so that a shell whose command line names the module (a wait loop, make) does not match itself
    found = subprocess.run(["pgrep", "-af", r"python.* -m bench[.]ingest_bench"], capture_output=True, text=True,
                           check=False)  # fmt: skip
    return [line for line in found.stdout.splitlines() if line.strip()]


async def wait_for_other_benchmarks(args: argparse.Namespace) -> None:
    """Wait (polling every 30 s) until the ingestion benchmark is not running."""
    if args.no_wait:
        return
    while running := other_benchmarks():
        say(f"waiting for another benchmark to finish: {running[0][:100]}")
        await asyncio.sleep(30)


async def wait_quiet(max_wait_s: float, threshold_cores: float) -> dict[str, float]:
    """Wait until the machine's busy CPU stays under ``threshold_cores`` for 2 s (at most ``max_wait_s``)."""
    started = reported = time.monotonic()
    calm, busy_cores = 0, 0.0
    while time.monotonic() - started < max_wait_s:
        b0, _ = _machine_busy_total()
        await asyncio.sleep(1.0)
        b1, _ = _machine_busy_total()
        busy_cores = b1 - b0
        calm = calm + 1 if busy_cores < threshold_cores else 0
        if calm >= 2:
            break
        if time.monotonic() - reported >= 10:
            reported = time.monotonic()
            say(f"waiting for a quiet machine: {busy_cores:.2f} cores busy")
    return {"waited_s": round(time.monotonic() - started, 1), "busy_cores_at_start": round(busy_cores, 2)}


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty_files": git("status", "--porcelain").splitlines()}


def environment() -> dict[str, Any]:
    def version(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        except OSError:
            return "?"
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else "?"

    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), "?")  # fmt: skip
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": version(["psql", ADMIN_URL, "-Atc", "SELECT version()"]).split(" on ")[0],
        "wrk": version(["wrk", "--version"]).split(" Copyright")[0],
        "py_spy": version([py_spy() or "py-spy", "--version"]),
        "services": "PostgreSQL, RabbitMQ, Redis, the gateway and the load generators on the same machine",
    }


def gateway_settings() -> dict[str, Any]:
    from kernel.settings import Settings

    names = ("db_pool_size", "freshness_cache_ttl_s", "ingest_batch_events", "ingest_prefetch",
             "ingest_batch_max_age_ms", "rollup_interval_s")  # fmt: skip
    return {name: Settings.model_fields[name].default for name in names}


async def main_async(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        say("error: wrk is not installed (apt-get install -y wrk)")
        return 2
    out = Path(args.out) if args.out else RESULTS / ("graphql_quick.json" if args.quick else "graphql.json")
    dataset = await prepare_dataset(args)
    await wait_for_other_benchmarks(args)
    secret = secrets.token_urlsafe(48)
    redis_prefix = f"bench:graphql:{secrets.token_hex(3)}:"
    results: dict[str, Any] = {
        "benchmark": "graphql",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "command": "python -m bench.graphql_bench " + " ".join(sys.argv[1:]),
        "postgres_connection": connection_facts(ADMIN_URL),  # socket or TCP, and the TCP congestion control
        "environment": environment(),
        "targets": TARGETS,
        "dataset": {"database": dataset.name} | dataset.info,
        "settings": {
            "quick": args.quick,
            "window_s": args.seconds,
            "warmup_s": args.warmup,
            "retries": args.retries,
            "quiet_threshold_cores": args.quiet_threshold,
            "clients": args.clients,
            "trivial_connections": 32,
            "rate": args.rate,
            "visible_seconds": args.visible_seconds,
            "bg_message_events": args.bg_batch,
            "api": "create_app(settings, roles={api}) on uvicorn (uvloop, httptools), 1 worker, log level WARNING, "
            "Redis freshness cache",
            "gateway_defaults": gateway_settings(),
            "redis_prefix": redis_prefix,
        },
        "definitions": {
            "gateway": "wrk against /graphql (POST, Lua script), latency from wrk's histogram",
            "floor": "db.usage.usage_statement's SQL and arguments through asyncpg (same watermark and prices), "
            "rows to dicts and orjson.dumps(default=str), timed per query in this process",
            "publish_to_visible": "probe k published at t (wall clock) is visible when a poll's "
            "totals.requests >= k; lag = that poll's response time - t (lower bound: the previous poll's send)",
            "cpu": "utime+stime from /proc over the window; cores = CPU s / wall s; foreign = other + "
            "postgres_other_db (work that is not the benchmark's)",
            "api_gc": "the API process's garbage collections during the window (gc.callbacks in the bench's "
            "wrapper): per generation count, time, longest pause",
            "floor_gc": "this process calls gc.freeze() after setup, so the floor client's collections only "
            "traverse what it allocates while measuring",
            "database": "pg_stat_database deltas of the bench database over the window, per request",
        },
        "usage_single": {},
    }
    from db.engine import create_engine
    from db.rollup import run_cycle

    engine = create_engine(dataset.url, pool_size=1)
    try:
        cycle = await run_cycle(engine, dt.datetime.now(dt.UTC))  # the watermark to the current hour, as in service
        results["dataset"]["materialized_through"] = str(cycle.rolled_until)
    finally:
        await engine.dispose()
    work = Path(tempfile.mkdtemp(prefix="graphql_bench_"))
    env = _env(
        ANALYTICS_DATABASE_URL=dataset.url, ANALYTICS_JWT_SECRET=secret, ANALYTICS_REDIS_URL=REDIS_URL,
        ANALYTICS_REDIS_PREFIX=redis_prefix, ANALYTICS_LOG_LEVEL="WARNING",
    )  # fmt: skip
    api = await start_api(env, work)
    run = Run(args, dataset, api, secret, work, results, out, env)
    only = set(args.only.split(","))
    # The floor's client is this process: freeze what setup allocated, so that its collections stay as short
    # as a lean client's (the gateway's own collections are measured, see api_gc).
    gc.collect()
    gc.freeze()
    try:
        results["quiet"] = await wait_quiet(args.quiet_wait, args.quiet_threshold)
        token = token_for(secret, dataset.largest_org)
        all_shapes = shapes(dt.datetime.now(dt.UTC))
        for key, shape in (("a", all_shapes[0]), ("b", all_shapes[1]), ("b", all_shapes[2])):
            if key in only:
                results["usage_single"][shape.key] = await scenario_single(run, shape, token)
                run.save()
        if "c" in only:
            results["usage_concurrent"] = await scenario_concurrent(run, all_shapes[0], token, args.clients)
            run.save()
        if "d" in only:
            await scenario_trivial(run, token, 32)
        if "f" in only:
            await scenario_profile(run, all_shapes[0], token, args.clients)
        if "e" in only:
            await scenario_publish_to_visible(run)
    finally:
        code = await stop_server(run.api)
        results["api_gateway_exit_code"] = code
        results["api_gateway_log_problems"] = log_problems(run.api.log_path)
        results["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        run.save()
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep_db:
            say(f"dropping {dataset.name} (--keep-db keeps it for the next run)")
            await _admin(f'DROP DATABASE IF EXISTS "{dataset.name}" WITH (FORCE)')
    say(f"results: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    for row in results["summary"]["targets"]:
        say(f"   {'met    ' if row['met'] else 'NOT met'}  {row['what']}: {row['value']} {row['unit']} "
            f"(target {'<=' if row['better'] == 'lower' else '>='} {row['target']})")  # fmt: skip
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.graphql_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=None, help="events to load (default 10,000,000; quick 200,000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 200k events, 10 s windows, 10 s publishing")
    parser.add_argument("--keep-db", action="store_true", help="keep the bench database for the next run")
    parser.add_argument("--fresh", action="store_true", help="rebuild the bench database even if complete")
    parser.add_argument("--only", default="a,b,c,d,e,f", help="scenarios to run (default all: a,b,c,d,e,f)")
    parser.add_argument("--seconds", type=float, default=None, help="measurement window (default 30; quick 10)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up before each window (default 5; quick 3)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of scenario c")
    parser.add_argument("--rate", type=int, default=5000, help="events/s of publish-to-visible")
    parser.add_argument("--visible-seconds", type=float, default=None, help="publishing time (default 60; quick 10)")
    parser.add_argument("--bg-batch", type=int, default=10, help="events per background message")
    parser.add_argument("--profile-seconds", type=float, default=None, help="py-spy recording (default 20; quick 5)")
    parser.add_argument("--load-writers", type=int, default=2, help="concurrent EventWriter batches while loading")
    parser.add_argument("--retries", type=int, default=2, help="reruns of a window that other work disturbed")
    parser.add_argument("--quiet-threshold", type=float, default=0.3, help="foreign cores tolerated in a window")
    parser.add_argument("--quiet-wait", type=float, default=120, help="max seconds to wait for an idle machine")
    parser.add_argument(
        "--no-wait", action="store_true", help="start even while the ingestion benchmark runs (it is waited for)"
    )
    parser.add_argument("--out", default=None, help="results file (default bench/results/graphql.json)")
    parser.add_argument("--serve-app", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.events = args.events or (200_000 if quick else 10_000_000)
    args.seconds = args.seconds or (10 if quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (3 if quick else 5)
    args.visible_seconds = args.visible_seconds or (10 if quick else 60)
    args.profile_seconds = args.profile_seconds or (5 if quick else 20)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_app is not None:
        serve_app(args.serve_app)
        return 0
    return asyncio.run(_cancellable(main_async(args)))


async def _cancellable(coro: Awaitable[int]) -> int:
    """SIGTERM cancels the run like Ctrl-C: servers are stopped and the results written on the way out."""
    task = asyncio.ensure_future(coro)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return int(await task)
    except asyncio.CancelledError:
        say("cancelled")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
