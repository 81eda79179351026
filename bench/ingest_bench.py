"""Ingestion benchmarks: RabbitMQ -> gateway (``serve --role ingest``) -> PostgreSQL.

    python -m bench.ingest_bench                 # the full run (1M batched, 200k single, 60 s latency, tuning, profile)
    python -m bench.ingest_bench --quick         # a small smoke run (about 2 minutes)

Every scenario gets a fresh database (``bench_ingest_<random>``, migrated with
``python -m gateway.cli migrate``, dropped afterwards), its own AMQP prefix (its
queues and exchanges are deleted afterwards) and its own gateway subprocess.

Scenarios
    batched     a backlog of 100-event messages is published while the ingester is stopped, then the gateway is
                started and drains it; the rate is events / (last commit - start of the first batch).
    single      the same with single-event messages.
    latency     the gateway runs; events are published at a steady rate, each carrying its publish wall-clock
                time in its id; latency = commit time of the batch that stored it - publish time.
    profile     ``batched`` again with py-spy attached to the gateway (figures not used for the targets).

"Commit time" of a batch is ``ingestion_batches.started_at + duration_ms``: ``duration_ms`` is measured by the
last statement of the writer's transaction, just before COMMIT. (``committed_at`` defaults to ``now()``, which
is the *start* of the transaction; both are recorded.)

CPU split: utime+stime from /proc/<pid>/stat of the gateway, every postgres process (backends of the
benchmark's database and the server's own processes; backends of other databases are counted apart),
beam.smp (RabbitMQ), this process, and the rest of the machine (from /proc/stat), over the window from the
first batch's start to the last commit.

Results: ``bench/results/ingest.json`` (and the gateway logs of each scenario under ``bench/results/logs/``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import itertools
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import msgspec

from bench.postgres import admin_url, connection_facts
from bench.profiles import count_stacks, py_spy
from ingest.decode import BATCH, SINGLE
from ingest.publisher import EventPublisher
from ingest.synthetic import Traffic, generate, sent_at_from_id, stamped
from ingest.topology import Topology

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ADMIN_URL = admin_url()  # ANALYTICS_BENCH_POSTGRES_URL, else the Unix socket (bench/postgres.py)
AMQP_URL = os.environ.get("ANALYTICS_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("ANALYTICS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

TARGETS = {"batched_events_per_s": 50_000, "single_events_per_s": 8_000, "latency_p99_s": 1.0}
READY_TIMEOUT_S = 90
STALL_TIMEOUT_S = 120
POLL_S = 0.5
CPU_SAMPLE_S = 0.25
CLK_TCK = os.sysconf("SC_CLK_TCK")


# The gateway code that is measured. Other people edit the working tree while a run goes on (a run takes
# about an hour), so by default the gateway and its migrations run from a snapshot of the committed HEAD
# (``--code worktree``: a copy of the working tree instead), taken once when the run starts.
CODE = ROOT
PRODUCT_DIRS = ("gateway", "ingest", "db", "schema", "resolvers", "exports")


def snapshot_code(mode: str) -> tuple[Path, dict[str, Any]]:
    """A private copy of the product code; returns (folder, description for the results)."""
    import tarfile
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="ingest_bench_code_"))
    git = git_commit()
    dirty = [line for line in git["dirty_files"] if line[3:].split("/", 1)[0] in PRODUCT_DIRS]
    if mode == "head":
        archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, capture_output=True, check=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(folder, filter="data")
    else:
        for name in (*PRODUCT_DIRS, "pyproject.toml"):
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
            elif source.exists():
                shutil.copy2(source, folder / name)
    return folder, {
        "mode": mode,
        "commit": git["commit"],
        "uncommitted_product_changes": dirty,
        "measured": "the committed HEAD (uncommitted changes above not included)"
        if mode == "head"
        else "the working tree as it was when the run started",
    }


def setting_defaults() -> dict[str, int]:
    """The ingest defaults of the measured code (read in a subprocess, from the snapshot)."""
    script = (
        "import json; from kernel.settings import Settings as S; f = S.model_fields; "
        "print(json.dumps({'batch_events': f['ingest_batch_events'].default, 'prefetch': f['ingest_prefetch'].default,"
        " 'max_age_ms': f['ingest_batch_max_age_ms'].default}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=CODE, env=_env(), capture_output=True, text=True, check=True
    )
    return {k: int(v) for k, v in json.loads(out.stdout).items()}


# --- output -------------------------------------------------------------------------------------------------------

_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# --- CPU accounting from /proc ------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()  # fields from 3 (state) on


def process_cpu_s(pid: int) -> float | None:
    """utime + stime of a process, in seconds."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / CLK_TCK


def _start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def _machine_ticks() -> tuple[int, int, int]:
    """(busy, total, interrupts) jiffies of the whole machine."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (parts + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait, irq + softirq


def _uptime_ticks() -> float:
    return float(Path("/proc/uptime").read_text().split()[0]) * CLK_TCK


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _is_kernel_thread(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and (pid == 2 or fields[1] == "2")  # kthreadd and its children


def find_pids(comm: str) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _comm(int(p.name)) == comm]


@dataclass
class CpuSample:
    at: float  # wall clock (unix seconds), comparable with the database's timestamps
    groups: dict[str, float]  # cumulative CPU seconds since the sampler started
    machine_busy: float
    machine_total: float
    machine_irq: float


class CpuSampler:
    """Samples the CPU time of the processes of interest every ``CPU_SAMPLE_S``.

    Processes that exit keep their last value; processes that start later count from zero.
    Groups: gateway, postgres (the benchmark database's backends and the server's own processes),
    rabbitmq (beam.smp), redis (redis-server: the freshness announcements), kernel (kernel threads: I/O,
    memory), interrupts (irq + softirq time of the machine), postgres_other_db (backends of other databases:
    other people's work), bench (this process), other (the rest: machine busy time minus the groups).
    """

    def __init__(self, gateway_pid: int | None, database: str) -> None:
        self.gateway_pid = gateway_pid
        self.database = database
        self.samples: list[CpuSample] = []
        self._base: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._group: dict[int, str] = {}
        self._start_ticks = _uptime_ticks()
        self._machine0 = _machine_ticks()
        self._task: asyncio.Task[None] | None = None
        self._scan(first=True)

    def _classify(self, pid: int, comm: str) -> str | None:
        if pid == self.gateway_pid:
            return "gateway"
        if pid == os.getpid():
            return "bench"
        if comm == "beam.smp":  # the broker, not a rabbitmqctl run (also a beam.smp)
            return "rabbitmq" if "rabbitmqctl" not in _cmdline(pid) else None
        if comm == "redis-server":
            return "redis"
        if _is_kernel_thread(pid):
            return "kernel"
        if comm == "postgres":
            cmd = _cmdline(pid)
            # backends: "postgres: 15/main: <user> <database> <client> <state>"
            match = re.match(r"postgres: [^:]+: (\S+) (\S+) (\S+)", cmd)
            if match and (match.group(3).startswith(("127.", "[", "::")) or "(" in match.group(3)):
                return "postgres" if match.group(2) == self.database else "postgres_other_db"
            return "postgres"
        return None

    def _scan(self, first: bool = False) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid not in self._group:
                comm = _comm(pid)
                group = self._classify(pid, comm)
                if group is None:
                    self._group[pid] = ""
                    continue
                self._group[pid] = group
                cpu = process_cpu_s(pid)
                if cpu is None:
                    continue
                started = _start_ticks(pid) or 0
                self._base[pid] = cpu if (first or started < self._start_ticks) else 0.0
                self._last[pid] = cpu
            elif self._group[pid]:
                cpu = process_cpu_s(pid)
                if cpu is not None:
                    self._last[pid] = cpu
        if self.gateway_pid and self.gateway_pid not in self._group:
            self._group[self.gateway_pid] = "gateway"

    def sample(self) -> CpuSample:
        self._scan()
        groups: dict[str, float] = defaultdict(float)
        for pid, last in self._last.items():
            groups[self._group[pid]] += last - self._base.get(pid, 0.0)
        busy, total, irq = _machine_ticks()
        sample = CpuSample(
            time.time(), dict(groups), (busy - self._machine0[0]) / CLK_TCK, (total - self._machine0[1]) / CLK_TCK,
            (irq - self._machine0[2]) / CLK_TCK,
        )  # fmt: skip
        self.samples.append(sample)
        return sample

    def start(self) -> None:
        async def loop() -> None:
            while True:
                self.sample()
                await asyncio.sleep(CPU_SAMPLE_S)

        self._task = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()

    def window(self, start: float, end: float) -> dict[str, Any]:
        """CPU seconds per group, and cores (CPU s / wall s), between the samples nearest ``start`` and ``end``."""
        if len(self.samples) < 2:
            return {}
        before = max((s for s in self.samples if s.at <= start), key=lambda s: s.at, default=self.samples[0])
        after = min((s for s in self.samples if s.at >= end), key=lambda s: s.at, default=self.samples[-1])
        wall = max(after.at - before.at, 1e-6)
        names = ("gateway", "postgres", "rabbitmq", "redis", "bench", "kernel", "postgres_other_db")
        seconds = {n: after.groups.get(n, 0.0) - before.groups.get(n, 0.0) for n in names}
        seconds["interrupts"] = after.machine_irq - before.machine_irq
        busy = after.machine_busy - before.machine_busy
        seconds["other"] = max(busy - sum(seconds.values()), 0.0)
        cores = (after.machine_total - before.machine_total) / wall
        return {
            "wall_s": round(wall, 3),
            "cpu_s": {k: round(v, 2) for k, v in seconds.items()},
            "cores_used": {k: round(v / wall, 3) for k, v in seconds.items()},
            "machine_busy_cores": round(busy / wall, 3),
            "machine_cores": round(cores, 2),
        }


async def wait_quiet(max_wait_s: float, threshold_cores: float) -> dict[str, float]:
    """Wait until the machine's busy CPU (all processes) stays under ``threshold_cores`` for 2 s."""
    started = reported = time.monotonic()
    calm = 0
    busy_cores = 0.0
    while time.monotonic() - started < max_wait_s:
        b0, *_ = _machine_ticks()
        await asyncio.sleep(1.0)
        b1, *_ = _machine_ticks()
        busy_cores = (b1 - b0) / CLK_TCK / 1.0
        calm = calm + 1 if busy_cores < threshold_cores else 0
        if calm >= 2:
            break
        if time.monotonic() - reported >= 10:
            reported = time.monotonic()
            say(f"waiting for a quiet machine: {busy_cores:.2f} cores busy (other work running?)")
    return {"waited_s": round(time.monotonic() - started, 1), "busy_cores_at_start": round(busy_cores, 2)}


# --- services -----------------------------------------------------------------------------------------------------


def database_url(name: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANALYTICS_")}
    return env | extra


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[tuple[str, str]]:
    """(name, url) of a new, migrated database, dropped afterwards."""
    name = f"bench_ingest_{secrets.token_hex(5)}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = database_url(name)
    try:
        done = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "migrate", cwd=CODE, env=_env(ANALYTICS_DATABASE_URL=url),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await done.communicate()
        if done.returncode != 0:
            raise RuntimeError(f"migrate failed: {err.decode()[-2000:]}")
        yield name, url
    finally:
        admin = await asyncpg.connect(ADMIN_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def delete_topology(prefix: str) -> None:
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


async def queue_depth(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    queue = await channel.declare_queue(name, passive=True)
    return int(queue.declaration_result.message_count or 0)


def rabbitmq_queue_counts(name: str) -> tuple[int, int] | None:
    """(ready, unacknowledged) from rabbitmqctl (authoritative, but costs ~1 s of CPU: only outside windows)."""
    try:
        output = subprocess.run(
            ["rabbitmqctl", "-q", "list_queues", "--formatter", "json", "name", "messages_ready",
             "messages_unacknowledged"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    for queue in json.loads(output):
        if queue["name"] == name:
            return int(queue["messages_ready"]), int(queue["messages_unacknowledged"])
    return None


async def settled_queue_counts(name: str) -> tuple[int, int] | None:
    """Queue counts once RabbitMQ's (lagging) quorum-queue statistics show an empty queue, or after 15 s."""
    counts = None
    for _ in range(4):
        counts = await asyncio.to_thread(rabbitmq_queue_counts, name)
        if counts == (0, 0):
            break
        await asyncio.sleep(5)
    return counts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Gateway:
    process: asyncio.subprocess.Process
    port: int
    log_path: Path
    started_at: float
    ready_at: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


async def start_gateway(url: str, prefix: str, config: dict[str, int], log_path: Path) -> Gateway:
    port = free_port()
    env = _env(
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
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--role", "ingest", cwd=CODE, env=env,
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    return Gateway(process, port, log_path, time.time())


async def wait_ready(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}") as http:
        deadline = time.monotonic() + READY_TIMEOUT_S
        answers: Counter[str] = Counter()
        while time.monotonic() < deadline:
            if gateway.process.returncode is not None:
                raise RuntimeError(f"gateway exited with {gateway.process.returncode}; see {gateway.log_path}")
            try:
                response = await http.get("/readyz", timeout=5)
            except httpx.TransportError as exc:
                answers[type(exc).__name__] += 1
            else:
                if response.status_code == 200:
                    gateway.ready_at = time.time()
                    return
                answers[f"{response.status_code} {response.text[:200]}"] += 1
            await asyncio.sleep(0.1)
    raise RuntimeError(f"gateway not ready after {READY_TIMEOUT_S} s ({dict(answers)}); see {gateway.log_path}")


class ReadyProbe:
    """``GET /readyz`` once a second while the gateway ingests: is it still responsive (as a health check)?"""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.latencies: list[float] = []
        self.failures: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.gateway.port}") as http:
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


def log_file(name: str) -> Path:
    """``logs/<name>.log``, or ``<name>.2.log`` ... when an earlier attempt's log is there."""
    folder = RESULTS / "logs"
    path, n = folder / f"{name}.log", 1
    while path.exists():
        n += 1
        path = folder / f"{name}.{n}.log"
    return path


async def stop_gateway(gateway: Gateway) -> int | None:
    if gateway.process.returncode is None:
        gateway.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(gateway.process.wait(), 60)
        except TimeoutError:
            gateway.process.kill()
            await gateway.process.wait()
    return gateway.process.returncode


def summarize_log(path: Path) -> dict[str, Any]:
    """Counts of log levels and the distinct warning/error events of a gateway log."""
    levels: Counter[str] = Counter()
    notable: Counter[str] = Counter()
    examples: dict[str, str] = {}
    other_lines = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            other_lines += bool(line.strip())
            if line.strip() and ("Error" in line or "Traceback" in line):
                notable[line.strip()[:120]] += 1
            continue
        level = str(record.get("level", "?"))
        levels[level] += 1
        if level in ("warning", "error", "critical", "exception"):
            key = f"{level}: {record.get('event')}"
            notable[key] += 1
            examples.setdefault(key, line[:500])
    return {
        "levels": dict(levels),
        "warnings_and_errors": dict(notable),
        "examples": examples,
        "non_json_lines": other_lines,
    }


# --- the events ---------------------------------------------------------------------------------------------------


def make_bodies(events: int, batch: int, seed: int) -> list[bytes]:
    """Message bodies of ``events`` distinct generated events, ``batch`` per message (1: single-event bodies)."""
    traffic = Traffic(seed=seed, events=events, orgs=200, models=12, span=dt.timedelta(hours=1))
    encoder = msgspec.json.Encoder()
    bodies: list[bytes] = []
    chunk: list[dict[str, object]] = []
    reported = time.monotonic()
    for index, event in enumerate(generate(traffic), 1):
        if batch == 1:
            bodies.append(encoder.encode(event))
        else:
            chunk.append(event)
            if len(chunk) == batch:
                bodies.append(encoder.encode(chunk))
                chunk = []
        if time.monotonic() - reported > 2:
            reported = time.monotonic()
            say(f"generating: {index:,}/{events:,} events")
    if chunk:
        bodies.append(encoder.encode(chunk))
    return bodies


async def publish_bodies(prefix: str, bodies: Sequence[bytes], *, batch: int, events: int) -> dict[str, Any]:
    """Publish pre-encoded bodies as fast as confirms allow; returns the publish rate."""
    content_type = BATCH if batch > 1 else SINGLE
    connection = await aio_pika.connect_robust(AMQP_URL)
    started = time.monotonic()
    reported = started
    async with connection, EventPublisher(connection, Topology.named(prefix), max_in_flight=1000) as publisher:
        for index, body in enumerate(bodies, 1):
            await publisher.publish_body(body, content_type=content_type)
            if time.monotonic() - reported >= 2:
                reported = time.monotonic()
                done = min(index * batch, events)
                say(f"publishing backlog: {done:,}/{events:,} events  {done / (reported - started):,.0f} events/s")
        await publisher.drain()
    seconds = time.monotonic() - started
    say(f"published {events:,} events in {len(bodies):,} messages: {events / seconds:,.0f} events/s")
    return {
        "seconds": round(seconds, 2),
        "events_per_s": round(events / seconds),
        "messages_per_s": round(len(bodies) / seconds),
    }


# --- measuring what was committed ---------------------------------------------------------------------------------

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


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1), nearest-rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def batch_stats(rows: Sequence[asyncpg.Record]) -> dict[str, Any]:
    sizes = [r["accepted"] + r["duplicates"] + r["rejected"] for r in rows]
    durations = [r["duration_ms"] for r in rows]
    start = min(r["started"] for r in rows)
    end = max(r["committed"] for r in rows)
    events = sum(r["accepted"] for r in rows)
    # Events committed per whole second of the window, and the longest time without a commit.
    per_second: Counter[int] = Counter()
    for r in rows:
        per_second[int(r["committed"] - start)] += r["accepted"]
    timeline = [per_second.get(s, 0) for s in range(int(end - start) + 1)]
    commits = sorted(r["committed"] for r in rows)
    gaps = [b - a for a, b in itertools.pairwise(commits)]
    busy = sum(durations) / 1000
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
        "writer_busy_share": round(busy / max(end - start, 1e-6), 3),
        "longest_gap_between_commits_s": round(max(gaps, default=0.0), 3),
        "committed_at_column_lag_ms_mean": round(
            sum(r["committed"] - r["committed_at_column"] for r in rows) / len(rows) * 1000, 1
        ),
        "per_second": timeline,
        "window": (start, end),
    }


async def watch_ingest(url: str, prefix: str, expected: int, gateway: Gateway, *, on_first_commit: Any = None) -> None:
    """Poll until ``expected`` events were seen by committed batches (or the gateway stalls or dies)."""
    connection = await asyncpg.connect(url)
    amqp = await aio_pika.connect_robust(AMQP_URL)
    started = time.monotonic()
    last_change, last_seen, last_report, first, reported_seen = started, -1, 0.0, False, 0
    queue = Topology.named(prefix).queue
    try:
        channel = await amqp.channel()
        depth = None
        while True:
            row = await connection.fetchrow(PROGRESS_SQL)
            seen = int(row["seen"])
            now = time.monotonic()
            if seen != last_seen:
                last_seen, last_change = seen, now
            if seen and not first:
                first = True
                if on_first_commit is not None:
                    on_first_commit()
            if now - last_report >= 2 or seen >= expected:
                with contextlib.suppress(Exception):
                    depth = await queue_depth(channel, queue)
                recent = (seen - reported_seen) / max(now - last_report, 1e-6) if last_report else 0.0
                last_report, reported_seen = now, seen
                say(
                    f"committed {int(row['accepted']):,}/{expected:,} events in {row['batches']:,} batches  "
                    f"{recent:,.0f} events/s (last interval); queue ~{depth} messages ready"
                )
            if seen >= expected:
                return
            if gateway.process.returncode is not None:
                raise RuntimeError(f"gateway exited with {gateway.process.returncode}; see {gateway.log_path}")
            if now - last_change > STALL_TIMEOUT_S:
                raise RuntimeError(f"no commit for {STALL_TIMEOUT_S} s at {seen:,}/{expected:,}: stalled")
            await asyncio.sleep(POLL_S)
    finally:
        await connection.close()
        await amqp.close()


# --- py-spy -------------------------------------------------------------------------------------------------------


def _area(file: str, func: str) -> str:
    areas = (
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
    for needle, name in areas:
        if needle in file:
            return name
    return f"other ({file.split('/')[0]})"


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


# --- scenarios ----------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    batched_events: int
    single_events: int
    latency_seconds: int
    latency_runs: list[tuple[int, int, dict[str, int | None] | None]]
    configs_batched: list[dict[str, int]]
    configs_single: list[dict[str, int]]
    profile: bool
    quiet_wait_s: float
    quiet_threshold: float
    seed: int = 7
    results: dict[str, Any] = field(default_factory=dict)


def config_label(config: dict[str, int]) -> str:
    return f"batch_events={config['batch_events']} prefetch={config['prefetch']} max_age_ms={config['max_age_ms']}"


async def run_throughput(
    name: str, bodies: Sequence[bytes], *, batch: int, events: int, config: dict[str, int], plan: Plan,
    profile: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Pre-publish ``bodies`` with no consumer, then start the gateway and time the drain."""
    prefix = f"bench_{secrets.token_hex(4)}."
    say(f"== {name}: {events:,} events, {batch} per message, {config_label(config)}")
    result: dict[str, Any] = {
        "scenario": name, "message_events": batch, "events": events, "messages": len(bodies),
        "settings": dict(config), "amqp_prefix": prefix, "mode": "backlog pre-published, then the ingester started",
    }  # fmt: skip
    async with fresh_database() as (db_name, url):
        result["database"] = db_name
        try:
            result["publish"] = await publish_bodies(prefix, bodies, batch=batch, events=events)
            result["quiet"] = await wait_quiet(plan.quiet_wait_s, plan.quiet_threshold)
            log_path = log_file(name)
            server_before = await server_counters()
            gateway = await start_gateway(url, prefix, config, log_path)
            sampler = CpuSampler(gateway.pid, db_name)
            sampler.start()
            spy: list[asyncio.subprocess.Process] = []
            spy_started: list[float] = []

            def first_commit() -> None:
                if profile is None:
                    return
                spy_started.append(time.time())
                spy.append(asyncio.ensure_future(start_py_spy(gateway.pid, profile)))  # type: ignore[arg-type]

            probe = ReadyProbe(gateway)
            try:
                await wait_ready(gateway)
                probe.start()
                await watch_ingest(url, prefix, events, gateway, on_first_commit=first_commit)
            finally:
                result["readyz_during_ingest"] = await probe.stop()
                await sampler.stop()
                if spy:
                    process = await spy[0]  # type: ignore[misc]
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(process.wait(), 60)
                code = await stop_gateway(gateway)
            server_after = await server_counters()
            rows = await _batches(url)
            stats = batch_stats(rows)
            start, end = stats.pop("window")
            result["ingest"] = stats
            wal = server_after["wal_lsn"] - server_before["wal_lsn"]
            result["postgres_server"] = {
                "wal_bytes": wal,
                "wal_bytes_per_event": round(wal / max(events, 1)),
                "checkpoints": {
                    k: server_after[k] - server_before[k] for k in ("checkpoints_timed", "checkpoints_req")
                },
                "note": "whole-server counters from the gateway's start to its stop (other databases included)",
            }
            result["cpu"] = sampler.window(start, end)
            result["startup_s"] = round((gateway.ready_at or start) - gateway.started_at, 2)
            result["stored_rows"] = await _count(url)
            result["dead_lettered"] = rabbitmq_queue_counts(Topology.named(prefix).dead_letter_queue)
            result["queue_after"] = await settled_queue_counts(Topology.named(prefix).queue)
            result["gateway_exit_code"] = code
            result["gateway_log"] = summarize_log(log_path)
            result["gateway_log_file"] = str(log_path.relative_to(ROOT))
            if profile is not None:
                result["profile_file"] = profile
            say(
                f"-> {name}: {stats['events_per_s']:,} events/s over {stats['window_s']} s, {stats['batches']} "
                f"batches of {stats['batch_events']['mean']:.0f} events; CPU cores {result['cpu'].get('cores_used')}"
            )
        finally:
            await delete_topology(prefix)
    return result


async def server_counters() -> dict[str, int]:
    """The server's WAL position (bytes) and checkpoint counts."""
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        row = await admin.fetchrow(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint AS wal_lsn, checkpoints_timed, "
            "checkpoints_req FROM pg_stat_bgwriter"
        )
    finally:
        await admin.close()
    return {k: int(v) for k, v in dict(row).items()}


async def start_py_spy(pid: int, spec: str) -> asyncio.subprocess.Process:
    """``spec`` is "<format>:<path>:<seconds>"."""
    fmt, path, seconds = spec.split(":")
    binary = py_spy()
    assert binary is not None
    say(f"py-spy: recording {fmt} for {seconds} s into {path}")
    return await asyncio.create_subprocess_exec(
        binary, "record", "--pid", str(pid), "--duration", seconds, "--rate", "100", "--format", fmt,
        "--output", str(ROOT / path), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _batches(url: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url)
    try:
        return list(await connection.fetch(BATCHES_SQL))
    finally:
        await connection.close()


async def _count(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM usage_events"))
    finally:
        await connection.close()


async def run_latency(plan: Plan, rate: int, batch: int, config: dict[str, int], name: str) -> dict[str, Any]:
    """The gateway runs; publish at a steady rate for a while, every event stamped with its publish time."""
    seconds = plan.latency_seconds
    total = rate * seconds
    prefix = f"bench_{secrets.token_hex(4)}."
    say(f"== {name}: {rate:,} events/s for {seconds} s, {batch} per message, {config_label(config)}")
    traffic = Traffic(seed=plan.seed + 1, events=total, orgs=200, models=12, span=dt.timedelta(minutes=5))
    events = list(generate(traffic))
    result: dict[str, Any] = {
        "scenario": name, "message_events": batch, "rate_target": rate, "seconds_target": seconds,
        "settings": dict(config), "amqp_prefix": prefix, "mode": "steady publishing while the ingester runs",
    }  # fmt: skip
    async with fresh_database() as (db_name, url):
        result["database"] = db_name
        try:
            # Declare the topology first, so that the gateway's queue exists before publishing starts.
            connection = await aio_pika.connect_robust(AMQP_URL)
            async with connection, EventPublisher(connection, Topology.named(prefix)):
                pass
            result["quiet"] = await wait_quiet(plan.quiet_wait_s, plan.quiet_threshold)
            log_path = log_file(name)
            gateway = await start_gateway(url, prefix, config, log_path)
            try:
                await wait_ready(gateway)
                await asyncio.sleep(2)  # let start-up work settle
                sampler = CpuSampler(gateway.pid, db_name)
                sampler.start()
                publish_start = time.time()
                published, publisher_stats = await _steady_publish(prefix, events, batch=batch, rate=rate)
                publish_end = time.time()
                await watch_ingest(url, prefix, total, gateway)
                await sampler.stop()
            finally:
                code = await stop_gateway(gateway)
            result["publish"] = {
                "events": published, "seconds": round(publish_end - publish_start, 2),
                "events_per_s": round(published / (publish_end - publish_start)), "publisher": publisher_stats,
            }  # fmt: skip
            rows = await _latencies(url)
            measured = [lat for _, lat, _ in rows]
            by_column = [lat for _, _, lat in rows]
            warm = [lat for sent, lat, _ in rows if sent >= publish_start + 5]
            result["latency_s"] = _latency_summary(measured)
            result["latency_s_after_5s_warmup"] = _latency_summary(warm)
            result["latency_s_by_committed_at_column"] = _latency_summary(by_column)
            stats = batch_stats(await _batches(url))
            stats.pop("window")
            result["ingest"] = stats
            result["cpu"] = sampler.window(publish_start, publish_end)
            result["stored_rows"] = len(rows)
            result["dead_lettered"] = rabbitmq_queue_counts(Topology.named(prefix).dead_letter_queue)
            result["gateway_exit_code"] = code
            result["gateway_log"] = summarize_log(log_path)
            result["gateway_log_file"] = str(log_path.relative_to(ROOT))
            lat = result["latency_s"]
            say(f"-> {name}: p50 {lat['p50']:.3f} s, p99 {lat['p99']:.3f} s, max {lat['max']:.3f} s")
        finally:
            await delete_topology(prefix)
    return result


def foreign_cores(result: dict[str, Any]) -> float:
    """Cores that processes unrelated to the benchmark used during its window."""
    cores = result.get("cpu", {}).get("cores_used", {})
    return float(cores.get("other", 0.0) + cores.get("postgres_other_db", 0.0))


def disturbances(result: dict[str, Any], threshold_cores: float) -> list[str]:
    """Why a run's figures cannot be trusted: other work on the machine, or faults injected by others."""
    reasons = []
    foreign = foreign_cores(result)
    if foreign > threshold_cores:
        reasons.append(f"other processes used {foreign:.2f} cores")
    log = result.get("gateway_log", {}).get("warnings_and_errors", {})
    if any("CONNECTION_FORCED" in k or "connection close" in k.lower() for k in log):
        reasons.append("the broker closed the gateway's connection (someone ran rabbitmqctl close_connection)")
    if "error" in result:
        reasons.append(result["error"])
    return reasons


def _latency_summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "count": len(values),
        "p50": round(pct(values, 0.5), 4),
        "p90": round(pct(values, 0.9), 4),
        "p99": round(pct(values, 0.99), 4),
        "p999": round(pct(values, 0.999), 4),
        "max": round(max(values), 4),
        "mean": round(sum(values) / len(values), 4),
    }


async def _steady_publish(
    prefix: str, events: list[dict[str, object]], *, batch: int, rate: int
) -> tuple[int, dict[str, Any]]:
    """Publish ``events`` at ``rate`` events/s, stamping each message's events with the time it is handed over.

    Also returns where the publisher itself spent time: waiting for one of its 1,000 in-flight slots after
    stamping (counted in the latency), how many messages were in flight (awaiting the broker's confirm), and
    how far behind its schedule it fell (a publisher short of CPU offers less than ``rate``).
    """
    content_type = BATCH if batch > 1 else SINGLE
    encoder = msgspec.json.Encoder()
    connection = await aio_pika.connect_robust(AMQP_URL)
    published, slot_waits, in_flight, behind = 0, [], [], 0.0
    async with connection, EventPublisher(connection, Topology.named(prefix), max_in_flight=1000) as publisher:
        pending = getattr(publisher, "_pending", None)  # the publisher's unconfirmed sends (diagnostics only)
        started = reported = sampled = time.monotonic()
        for index in range(0, len(events), batch):
            ahead = started + published / rate - time.monotonic()
            if ahead > 0.002:
                await asyncio.sleep(ahead)
            behind = max(behind, -ahead)
            chunk = stamped(events[index : index + batch], time.time_ns())
            handed = time.monotonic()
            await publisher.publish_body(encoder.encode(chunk if batch > 1 else chunk[0]), content_type=content_type)
            now = time.monotonic()
            slot_waits.append(now - handed)
            published += len(chunk)
            if pending is not None and now - sampled >= 0.05:
                sampled = now
                in_flight.append(len(pending))
            if now - reported >= 2:
                reported = now
                say(f"publishing: {published:,}/{len(events):,} events  {published / (now - started):,.0f} events/s")
        await publisher.drain()
    seconds = time.monotonic() - started
    messages_per_s = len(slot_waits) / max(seconds, 1e-6)
    mean_in_flight = sum(in_flight) / len(in_flight) if in_flight else None
    return published, {
        "slot_wait_s": _latency_summary(slot_waits),
        "in_flight_mean": round(mean_in_flight, 1) if mean_in_flight is not None else None,
        "in_flight_max": max(in_flight) if in_flight else None,
        # Little's law: the mean time from hand-over to the broker's confirm
        "confirm_s_mean_estimate": round(mean_in_flight / messages_per_s, 4) if mean_in_flight else None,
        "max_behind_schedule_s": round(behind, 3),
    }


async def _latencies(url: str) -> list[tuple[float, float, float]]:
    """(sent, commit - sent, committed_at column - sent) per stored event."""
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            """
            SELECT e.event_id,
                   extract(epoch FROM b.started_at)::float8 + b.duration_ms / 1000 AS committed,
                   extract(epoch FROM b.committed_at)::float8 AS committed_at_column
            FROM usage_events e JOIN ingestion_batches b ON b.id = e.batch_id
            """
        )
    finally:
        await connection.close()
    out = []
    for row in rows:
        sent = sent_at_from_id(row["event_id"])
        if sent is not None:
            out.append((sent, row["committed"] - sent, row["committed_at_column"] - sent))
    return out


# --- the whole run ------------------------------------------------------------------------------------------------


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty_files": git("status", "--porcelain").splitlines()}


def environment() -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False).stdout.strip()
        except OSError:
            return "?"

    rabbit = version(["rabbitmqctl", "-q", "version"])
    postgres = version(["psql", ADMIN_URL, "-Atc", "SELECT version()"])
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "postgres": postgres.split(" on ")[0],
        "rabbitmq": rabbit,
        "services": "PostgreSQL, RabbitMQ, Redis and the gateway on the same machine",
        "py_spy": version([py_spy() or "py-spy", "--version"]),
    }


def write_results(plan: Plan, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan.results, indent=1, default=str) + "\n")


def summarize(plan: Plan, defaults: dict[str, int]) -> dict[str, Any]:
    runs = plan.results["runs"]

    def best(kind: str) -> dict[str, Any] | None:
        candidates = [r for r in runs if r.get("kind") == kind and "ingest" in r]
        return max(candidates, key=lambda r: r["ingest"]["events_per_s"], default=None)

    def at_defaults(kind: str) -> list[dict[str, Any]]:
        return [r for r in runs if r.get("kind") == kind and r["settings"] == defaults and "ingest" in r]

    summary: dict[str, Any] = {}
    for kind, target in (("batched", "batched_events_per_s"), ("single", "single_events_per_s")):
        default_runs = at_defaults(kind)
        top = best(kind)
        if not default_runs and not top:
            continue
        rates = [r["ingest"]["events_per_s"] for r in default_runs]
        summary[kind] = {
            "target_events_per_s": TARGETS[target],
            "at_defaults_events_per_s": rates,
            "met_at_defaults": bool(rates) and max(rates) >= TARGETS[target],
            "best_events_per_s": top["ingest"]["events_per_s"] if top else None,
            "best_settings": top["settings"] if top else None,
            "met_at_best": bool(top) and top["ingest"]["events_per_s"] >= TARGETS[target],
        }
    latency = [r for r in runs if r.get("kind") == "latency" and "latency_s" in r]
    if latency:
        summary["latency"] = {
            "target_p99_s": TARGETS["latency_p99_s"],
            "runs": {
                # the rate belongs in the key: runs at several rates share a message size and settings
                f"{r['rate_target']:,} events/s, batch={r['message_events']} {config_label(r['settings'])}": {
                    "p50": r["latency_s"]["p50"],
                    "p99": r["latency_s"]["p99"],
                    "max": r["latency_s"]["max"],
                    "met": r["latency_s"]["p99"] <= TARGETS["latency_p99_s"],
                    "publish_events_per_s": r["publish"]["events_per_s"],
                }
                for r in latency
            },
        }
    return summary


# 5,000 events/s as 1, 10 and 100 events a message; single-event messages at lower rates (on 2 cores the
# publisher, the broker and the gateway together saturate the machine well below 5,000 messages/s);
# and 10-event messages with the larger prefetch that single-event throughput prefers.
DEFAULT_LATENCY_RUNS = "5000x1,5000x10,5000x100,2500x1,1000x1,5000x10@/8000/"


def parse_latency_runs(text: str) -> list[tuple[int, int, dict[str, int | None] | None]]:
    """``RATExBATCH[@batch_events/prefetch/max_age_ms]``; an empty value keeps the default."""
    runs = []
    for part in text.split(","):
        spec, _, config = part.strip().partition("@")
        rate, _, batch = spec.partition("x")
        values = [int(v) if v else None for v in config.split("/")] if config else None
        keys = ("batch_events", "prefetch", "max_age_ms")
        runs.append((int(rate), int(batch or 1), dict(zip(keys, values, strict=True)) if values else None))
    return runs


def parse_configs(text: str | None, defaults: dict[str, int]) -> list[dict[str, int]] | None:
    """``"5000/2000/100,1000/2000/100"`` (batch_events/prefetch/max_age_ms) as configs."""
    if not text:
        return None
    configs = []
    for part in text.split(","):
        values = [int(v) if v else None for v in part.strip().split("/")]
        keys = ("batch_events", "prefetch", "max_age_ms")
        configs.append({k: (v if v is not None else defaults[k]) for k, v in zip(keys, values, strict=True)})
    return configs


def default_sweep(defaults: dict[str, int], *, single: bool) -> list[dict[str, int]]:
    """The defaults first and last (to see the noise), each setting varied on its own in between."""
    variants = {
        "batch_events": [1000, 5000, 10000, 20000, 50000] if not single else [1000, 5000, 20000],
        "prefetch": [500, 1000, 8000] if not single else [500, 8000, 20000],
        "max_age_ms": [20, 500],
    }
    sweep = [dict(defaults)]
    for key, values in variants.items():
        sweep += [defaults | {key: v} for v in values if v != defaults[key]]
    return [*sweep, dict(defaults)]


async def main_async(args: argparse.Namespace) -> int:
    global CODE
    CODE, code = snapshot_code(args.code)
    say(f"measuring {code['measured']} ({code['commit'][:12]}), copied to {CODE}")
    try:
        return await _run_all(args, code)
    finally:
        shutil.rmtree(CODE, ignore_errors=True)


async def _run_all(args: argparse.Namespace, code: dict[str, Any]) -> int:
    defaults = setting_defaults()
    if args.quick:
        plan = Plan(
            batched_events=args.events or 50_000, single_events=args.single_events or 20_000,
            latency_seconds=args.latency_seconds or 10, latency_runs=parse_latency_runs(args.latency_runs or "5000x10"),
            configs_batched=[defaults], configs_single=[defaults],
            profile=False, quiet_wait_s=args.quiet_wait, quiet_threshold=args.quiet_threshold,
        )  # fmt: skip
    else:
        plan = Plan(
            batched_events=args.events or 1_000_000, single_events=args.single_events or 200_000,
            latency_seconds=args.latency_seconds or 60,
            latency_runs=parse_latency_runs(args.latency_runs or DEFAULT_LATENCY_RUNS),
            configs_batched=default_sweep(defaults, single=False), configs_single=default_sweep(defaults, single=True),
            profile=not args.no_profile, quiet_wait_s=args.quiet_wait, quiet_threshold=args.quiet_threshold,
        )  # fmt: skip
    plan.configs_batched = parse_configs(args.configs_batched, defaults) or plan.configs_batched
    plan.configs_single = parse_configs(args.configs_single, defaults) or plan.configs_single
    scenarios = set(args.scenarios.split(","))
    out = Path(args.out) if args.out else RESULTS / ("ingest_quick.json" if args.quick else "ingest.json")
    previous = json.loads(out.read_text()) if args.append and out.exists() else None
    if previous is not None and previous.get("code", {}).get("commit") != code["commit"]:
        say(f"!! --append: {out} measured {previous.get('code', {}).get('commit')}, this is {code['commit']}: refused")
        return 2
    plan.results = previous or {
        "benchmark": "ingest",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "code": code,
        "command": "python -m bench.ingest_bench " + " ".join(sys.argv[1:]),
        "environment": environment(),
        "postgres_connection": connection_facts(ADMIN_URL),
        "targets": TARGETS,
        "setting_defaults": defaults,
        "definitions": {
            "commit_time": "ingestion_batches.started_at + duration_ms (the last statement before COMMIT)",
            "events_per_s": "accepted events / (last commit time - started_at of the first batch)",
            "latency": "commit time of the event's batch (usage_events.batch_id) - publish wall-clock time "
            "carried in the event id",
            "cpu": "utime+stime from /proc over the measurement window; cores_used = CPU s / wall s",
        },
        "runs": [],
    }
    if previous is not None and args.replace:
        kinds = {k for k in ("batched", "single", "latency", "profile") if k in scenarios}
        for run in previous["runs"]:
            if run.get("kind") in kinds:
                run["kind"] += "_superseded"
                run["superseded"] = "rerun"
    if previous is not None:
        plan.results.setdefault("appended", []).append(
            {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
             "command": "python -m bench.ingest_bench " + " ".join(sys.argv[1:])}
        )  # fmt: skip
    runs: list[dict[str, Any]] = plan.results["runs"]

    def record(kind: str, result: dict[str, Any]) -> None:
        result["kind"] = kind
        result["code_commit"] = code["commit"]
        result["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        runs.append(result)
        plan.results["summary"] = summarize(plan, defaults)
        write_results(plan, out)

    async def guarded(kind: str, make: Any, label: str) -> None:
        """Run a scenario; rerun it (up to --retries times) while other work disturbs it, and keep the
        least disturbed attempt (the others are kept too, as ``<kind>_superseded``)."""
        attempts: list[dict[str, Any]] = []
        for attempt in range(args.retries + 1):
            try:
                result = await make()
            except Exception as exc:  # noqa: BLE001 - keep going: one failed scenario should not lose the others
                say(f"!! {label} failed: {type(exc).__name__}: {exc}")
                result = {"scenario": label, "error": f"{type(exc).__name__}: {exc}", "settings": {}}
            result["attempt"] = attempt + 1
            result["disturbed_by"] = disturbances(result, args.quiet_threshold)
            attempts.append(result)
            if not result["disturbed_by"]:
                break
            if attempt < args.retries:
                say(f"!! {label} was disturbed ({'; '.join(result['disturbed_by'])}): running it again")
                await asyncio.sleep(10)
        kept = min(attempts, key=lambda r: ("error" in r, len(r["disturbed_by"]), foreign_cores(r)))
        for result in attempts:
            if result is not kept:
                result["superseded"] = True
                record(kind + "_superseded", result)
        record(kind, kept)

    if "batched" in scenarios or "profile" in scenarios:
        say(f"generating {plan.batched_events:,} events as 100-event messages")
        bodies = make_bodies(plan.batched_events, 100, plan.seed)
        if "batched" in scenarios:
            for i, config in enumerate(plan.configs_batched):
                await guarded("batched", lambda i=i, config=config: run_throughput(
                    f"batched_{i}", bodies, batch=100, events=plan.batched_events, config=config, plan=plan,
                ), f"batched_{i}")  # fmt: skip
        if "profile" in scenarios and plan.profile and py_spy():
            for fmt, path in (
                ("raw", "bench/results/ingest_profile.txt"),
                ("flamegraph", "bench/results/ingest_profile.svg"),
            ):
                await guarded("profile", lambda fmt=fmt, path=path: run_throughput(
                    f"profile_{fmt}", bodies, batch=100, events=plan.batched_events, config=defaults, plan=plan,
                    profile=f"{fmt}:{path}:{args.profile_seconds}",
                ), f"profile_{fmt}")  # fmt: skip
            collapsed = ROOT / "bench/results/ingest_profile.txt"
            if collapsed.exists():
                summary = summarize_profile(collapsed, args.profile_seconds, 100)
                plan.results["profile"] = summary | {
                    "files": ["bench/results/ingest_profile.txt", "bench/results/ingest_profile.svg"],
                    "duration_s": args.profile_seconds,
                    "rate_hz": 100,
                }
                write_results(plan, out)
                (RESULTS / "ingest_profile_top.txt").write_text(_profile_text(summary))
        del bodies
    if "single" in scenarios or "profile_single" in scenarios:
        say(f"generating {plan.single_events:,} events as single-event messages")
        singles = make_bodies(plan.single_events, 1, plan.seed)
        if "single" in scenarios:
            for i, config in enumerate(plan.configs_single):
                await guarded("single", lambda i=i, config=config: run_throughput(
                    f"single_{i}", singles, batch=1, events=plan.single_events, config=config, plan=plan,
                ), f"single_{i}")  # fmt: skip
        if "profile_single" in scenarios and py_spy():
            # Not part of the default run: where the time goes with single-event messages.
            path = "bench/results/ingest_profile_single.txt"
            await guarded("profile_single", lambda: run_throughput(
                "profile_single_raw", singles, batch=1, events=plan.single_events, config=defaults, plan=plan,
                profile=f"raw:{path}:{args.profile_seconds}",
            ), "profile_single_raw")  # fmt: skip
            if (ROOT / path).exists():
                summary = summarize_profile(ROOT / path, args.profile_seconds, 100)
                plan.results["profile_single"] = summary | {"files": [path], "duration_s": args.profile_seconds}
                write_results(plan, out)
                (RESULTS / "ingest_profile_single_top.txt").write_text(_profile_text(summary))
        del singles
    if "latency" in scenarios:
        for i, (rate, batch, config) in enumerate(plan.latency_runs):
            name = f"latency_{i}_{rate}eps_batch{batch}"
            settings = defaults | {k: v for k, v in (config or {}).items() if v is not None}
            await guarded("latency", lambda rate=rate, batch=batch, settings=settings, name=name: run_latency(
                plan, rate, batch, settings, name,
            ), name)  # fmt: skip
    plan.results["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    write_results(plan, out)
    say(f"results: {out}")
    print(json.dumps(plan.results.get("summary", {}), indent=1), file=sys.stderr)
    return 0


def _profile_text(summary: dict[str, Any]) -> str:
    lines = [f"py-spy samples: {summary['samples']} (busy share of one core: {summary['busy_share_of_one_core']})", ""]
    for title, key in (("self time by area", "by_area_self"), ("self time", "top_self"), ("total time", "top_total")):
        lines.append(f"== {title}")
        lines += [f"{row['share'] * 100:5.1f}%  {row['samples']:6d}  {row['function']}" for row in summary[key]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=None, help="events of the batched scenario (default 1,000,000)")
    parser.add_argument("--single-events", type=int, default=None, help="events of the single scenario (200,000)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run: 50k/20k events, defaults only")
    parser.add_argument(
        "--scenarios", default="batched,single,latency,profile,profile_single",
        help="which scenarios to run (batched, single, latency, profile, profile_single)",
    )  # fmt: skip
    parser.add_argument("--configs-batched", default=None, help="batch_events/prefetch/max_age_ms,... to try")
    parser.add_argument("--configs-single", default=None, help="batch_events/prefetch/max_age_ms,... to try")
    parser.add_argument(
        "--latency-runs", default=None,
        help=f"latency runs, RATExBATCH[@batch_events/prefetch/max_age_ms],... (default {DEFAULT_LATENCY_RUNS})",
    )  # fmt: skip
    parser.add_argument("--latency-seconds", type=int, default=None, help="seconds of publishing (default 60)")
    parser.add_argument("--profile-seconds", type=int, default=20, help="py-spy recording length")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy runs")
    parser.add_argument("--quiet-wait", type=float, default=120, help="max seconds to wait for an idle machine")
    parser.add_argument(
        "--quiet-threshold", type=float, default=0.3,
        help="busy cores counted as an idle machine, and the most other processes may use during a window",
    )  # fmt: skip
    parser.add_argument(
        "--code", choices=("head", "worktree"), default="head",
        help="measure the committed HEAD (default) or the working tree, copied when the run starts",
    )  # fmt: skip
    parser.add_argument("--retries", type=int, default=3, help="reruns of a scenario that others disturbed")
    parser.add_argument(
        "--append", action="store_true",
        help="add the runs to the results file (same code commit only) instead of starting a new one",
    )  # fmt: skip
    parser.add_argument(
        "--replace", action="store_true", help="with --append: mark earlier runs of the same scenarios superseded"
    )
    parser.add_argument("--out", default=None, help="results file (default bench/results/ingest.json)")
    return asyncio.run(_cancellable(main_async(parser.parse_args(argv))))


async def _cancellable(coro: Any) -> int:
    """Run ``coro`` so that SIGTERM cancels it like Ctrl-C does: the gateway is stopped, the database dropped
    and the queues deleted on the way out."""
    task = asyncio.ensure_future(coro)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return int(await task)
    except asyncio.CancelledError:
        say("cancelled")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
