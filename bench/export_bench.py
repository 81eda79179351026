"""The exports benchmark (issue 13, "Performance"): an all-org COST export and an INCIDENT export of 1,000,000
rows each, against the issue's targets (<= 30 s, the worker's RSS growing <= 64 MiB) and against the floor,
``COPY (the same query) TO STDOUT``.

    python -m bench.export_bench                  # full: 1,000,000 rows of each kind, measured twice, S3 (moto)
    python -m bench.export_bench --quick          # smoke run: 100,000 rows, measured once, no profile
    python -m bench.export_bench --keep-db        # keep bench_exports_<rows> for the next run (reused)
    python -m bench.export_bench --storage local  # the local folder store instead of S3

Data (``bench_exports_<rows>``, reused while its marker row says it is complete, with the same parameters, at
the code's migration head; dropped at the end unless ``--keep-db``), written with ``INSERT ... SELECT
generate_series`` straight into ``usage_events`` (after ``ensure_usage_partitions``), then rolled up with
``db.rollup.run_cycle`` a day at a time and vacuumed:

- COST: one event per org x project x model x UTC day, ``orgs`` x 5 projects x 5 models x 20 days, so the all-org
  export has ``rows`` rows (plus the incident org's 25). The month to date when the current month has 20 whole
  days before now; otherwise the last closed month (``month: "YYYY-MM"``; the results say which).
- INCIDENT: ``rows`` events of one org (``org_incident``) in six hours of the month's first day, with realistic
  id lengths, 15 % errors, and ``error_type`` / ``region`` values holding commas, quotes and a leading ``=``,
  ``+``, ``-`` or ``@`` (so CSV quoting and the formula neutralization run).

Measurement (each run, for each kind, after waiting for a quiet machine):

1. the floor: the job's statement (``cost_statement`` / ``incident_statement`` with the job's arguments) as
   ``COPY (...) TO STDOUT (FORMAT csv)`` through asyncpg's ``copy_from_query`` into a sink that counts and
   discards the bytes (``/dev/null``), in a read-only REPEATABLE READ transaction, as the worker reads;
2. the cursor alone: the same statement through a server-side cursor (the worker's ``PREFETCH``), records
   counted and dropped: the database and the driver without CSV, tally or upload;
3. the worker, in a child process of its own (so its RSS is the worker's): it opens the engine and the store
   as the ``export`` role does, creates the job, then ``ExportWorker.run_once`` once; wall time, rows, bytes and
   the growth of its RSS over the RSS before the job (``/proc/self/statm`` sampled every 50 ms in a thread).

CPU per process group (``bench.harness.cpu.CpuWindow``: the worker, postgres, this process, which also runs the
moto S3 server, and foreign work) is recorded for every step, so a disturbed run shows. With py-spy available
(and not ``--quick``) a last worker run of each kind is recorded by py-spy (not one of the measured runs).

Results: ``bench/results/exports.json`` (``exports_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import logging
import math
import multiprocessing
import os
import resource
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg

from bench.api.dataset import still_valid, upgrade_in_place
from bench.harness.cpu import CpuWindow, wait_quiet
from bench.harness.entry import run_cancellable
from bench.harness.output import Progress, say
from bench.harness.runinfo import ROOT, git_commit, machine, postgres_version, py_spy_version, shown
from bench.harness.services import ADMIN_URL, admin, database_url
from bench.postgres import connection_facts
from bench.profiles import count_stacks, py_spy, start_py_spy
from db.export_rows import PREFETCH, cost_statement, incident_statement
from db.exports import NewJob
from db.migrate import current_head
from db.prices import Price
from exports import csv_format
from exports.jobs import COST, INCIDENT, cost_job, incident_job, incident_selection
from ingest.synthetic import MODELS as SYNTHETIC_MODELS

RESULTS = ROOT / "bench" / "results"
TARGETS = {"wall_s": 30.0, "rss_growth_mib": 64.0}
PROJECTS = 5
MODELS = SYNTHETIC_MODELS[:PROJECTS]
DAYS = 20
INCIDENT_ORG = "org_incident"
INCIDENT_HOURS = 6
MARKER_TABLE = "bench_exports_load"
DATA_VERSION = 2  # of the INSERT statements below: a data set written by another version is rebuilt
BUCKET = "bench-exports"
RSS_EVERY_S = 0.05
INSERT_CHUNK = 100_000
PROFILE_RATE_HZ = 100
MIB = 1024 * 1024

# Free text that CSV must quote (comma, double quote) or neutralize (a leading =, +, -, @), among plain values.
ERROR_TYPES = (
    "upstream_timeout", "rate_limited", 'invalid_request: "model" is required, retry', '=HYPERLINK("http://x","y")',
    "+cmd|' /C calc'!A0", "@SUM(A1:A9)", "-2+3", "internal_error",
)  # fmt: skip
REGIONS = ("eu-west-1", "us-east-1", "ap-south-1", 'us-west-2, "zone b"', "=1+1")


# ---------------------------------------------------------------------------------------------- the data set


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """What the data set holds, derived from the row count and the instant it is planned at."""

    rows: int
    orgs: int
    month_start: dt.datetime
    month_to_date: bool
    incident_start: dt.datetime
    incident_end: dt.datetime

    @property
    def month(self) -> str:
        return f"{self.month_start:%Y-%m}"

    @property
    def cost_rows(self) -> int:
        """The all-org COST export's rows: the orgs' (org, project, model, day), and the incident org's."""
        return self.orgs * PROJECTS * len(MODELS) * DAYS + PROJECTS * len(MODELS)

    def params(self) -> dict[str, Any]:
        """What makes two data sets the same (the marker compares it)."""
        return {
            "version": DATA_VERSION, "rows": self.rows, "orgs": self.orgs, "projects": PROJECTS,
            "models": list(MODELS), "days": DAYS,
            "month": self.month, "incident_org": INCIDENT_ORG, "incident_start": self.incident_start.isoformat(),
            "incident_hours": INCIDENT_HOURS, "error_types": list(ERROR_TYPES), "regions": list(REGIONS),
        }  # fmt: skip


def plan_data(rows: int, now: dt.datetime) -> DataPlan:
    """The month to date when ``DAYS`` whole days of it are before ``now``, else the last closed month; enough
    orgs that the COST export has at least ``rows`` rows."""
    if rows < 1:
        raise ValueError("rows must be positive")
    now = now.astimezone(dt.UTC)
    current = dt.datetime(now.year, now.month, 1, tzinfo=dt.UTC)
    to_date = now >= current + dt.timedelta(days=DAYS)
    start = current if to_date else (current - dt.timedelta(days=1)).replace(day=1)
    orgs = math.ceil(rows / (PROJECTS * len(MODELS) * DAYS))
    return DataPlan(rows, orgs, start, to_date, start, start + dt.timedelta(hours=INCIDENT_HOURS))


def prices_for(plan: DataPlan) -> list[Price]:
    """A price for each model from a month before the data, and a cut on day 10 for the first (so the spend
    join meets two price versions)."""
    since = plan.month_start - dt.timedelta(days=30)
    prices = []
    for rank, model in enumerate(MODELS):
        base = Decimal(rank + 1) * Decimal("0.15")
        prices.append(Price(model, since, base, base * 4, base / 4))
    first = prices[0]
    cut = plan.month_start + dt.timedelta(days=9)
    prices.append(Price(first.model, cut, first.input_per_million * Decimal("0.8"),
                        first.output_per_million * Decimal("0.8"), first.cached_input_per_million))  # fmt: skip
    return prices


_INSERT_COLUMNS = (
    "org_id, event_time, source, event_id, project_id, api_key_id, model, input_tokens, cached_input_tokens, "
    "output_tokens, latency_ms, ttft_ms, status_code, error_type, region"
)

# $1 first index, $2 last index, $3 window start, $4 microseconds between events, $5 models, $6 error types,
# $7 regions. One event per index i: realistic id lengths, 15 % errors, float latencies with long fractions.
INCIDENT_INSERT = f"""
INSERT INTO usage_events ({_INSERT_COLUMNS})
SELECT '{INCIDENT_ORG}', $3::timestamptz + make_interval(secs => i * $4::bigint / 1000000.0),
       '//gateway/' || (ARRAY['eu-west-1','us-east-1','ap-south-1'])[i % 3 + 1] || '/edge-' || (i % 7),
       'evt_' || md5(i::text), 'proj_' || lpad((i / {len(MODELS)} % {PROJECTS})::text, 4, '0'),
       'key_' || left(md5((i % 40)::text), 20), ($5::text[])[i % {len(MODELS)} + 1],
       50 + (i * 7919) % 4000, CASE WHEN i % 3 = 0 THEN 50 ELSE 0 END, 10 + (i * 104729) % 1500,
       ((i * 2654435761) % 1000000) / 313.0, CASE WHEN i % 7 = 0 THEN NULL ELSE ((i * 40503) % 300000) / 977.0 END,
       CASE i % 20 WHEN 0 THEN 500 WHEN 1 THEN 429 WHEN 2 THEN 400 ELSE 200 END,
       CASE WHEN i % 20 < 3 THEN ($6::text[])[i % {len(ERROR_TYPES)} + 1] END,
       ($7::text[])[i % {len(REGIONS)} + 1]
FROM generate_series($1::bigint, $2::bigint) AS i
"""

# One event per org x project x model on day $1 (0-based) of the month starting $2; $3 orgs, $4 models.
COST_INSERT = f"""
INSERT INTO usage_events ({_INSERT_COLUMNS})
SELECT 'org_' || lpad(o::text, 5, '0'),
       $2::timestamptz + make_interval(days => $1::int, mins => (o * 37 + p * 11 + m * 7) % 1440, secs => o % 60),
       '//gateway/eu-west-1/edge-1', 'evt_' || md5(concat_ws('/', o, p, m, $1::int)),
       'proj_' || lpad(p::text, 4, '0'), 'key_' || left(md5(o::text), 20), ($4::text[])[m + 1],
       100 + (o * 31 + m * 17 + $1::int) % 5000, (o + m) % 50, 20 + (o * 13 + p) % 2000,
       ((o * 977 + m) % 20000) / 7.0, NULL,
       CASE WHEN (o + p + m + $1::int) % 25 = 0 THEN 503 ELSE 200 END,
       CASE WHEN (o + p + m + $1::int) % 25 = 0 THEN 'overloaded' END, 'eu-west-1'
FROM generate_series(0, $3::int - 1) AS o, generate_series(0, {PROJECTS - 1}) AS p,
     generate_series(0, {len(MODELS) - 1}) AS m
"""


@dataclasses.dataclass
class Dataset:
    name: str
    url: str
    plan: DataPlan
    info: dict[str, Any]


async def prepare_dataset(plan: DataPlan, *, fresh: bool) -> Dataset:
    name = f"bench_exports_{plan.rows}"
    url = database_url(name)
    info = None if fresh else await _complete_marker(name, plan.params())
    if info is not None:
        say(f"reusing {name} (loaded {info['loaded_at']}, month {plan.month})")
        return Dataset(name, url, plan, info | {"reused": True})
    info = await _load(name, url, plan)
    return Dataset(name, url, plan, info | {"reused": False})


async def _complete_marker(name: str, params: dict[str, Any]) -> dict[str, Any] | None:
    connection = await asyncpg.connect(ADMIN_URL)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
    finally:
        await connection.close()
    if not exists:
        return None
    connection = await asyncpg.connect(database_url(name))
    try:
        if not await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", MARKER_TABLE):
            return None
        row = await connection.fetchval(f"SELECT info FROM {MARKER_TABLE} ORDER BY completed_at DESC LIMIT 1")
    finally:
        await connection.close()
    info: dict[str, Any] | None = None if row is None else json.loads(row)
    if info is None or not still_valid(name, info, params):
        return None
    if info.get("migration") != current_head():
        await upgrade_in_place(name, info)
    return info


async def _load(name: str, url: str, plan: DataPlan) -> dict[str, Any]:
    from sqlalchemy import text

    from bench.api.dataset import roll_up
    from db.engine import create_engine
    from db.migrate import migrate
    from db.partitions import ensure_usage_partitions
    from db.prices import upsert_price

    say(f"creating database {name}")
    await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin(f'CREATE DATABASE "{name}"')
    engine = create_engine(url, pool_size=2)
    info: dict[str, Any] = {"params": plan.params(), "loaded_at": dt.datetime.now(dt.UTC).isoformat()}
    try:
        info["migration"] = await migrate(engine)
        async with engine.begin() as transaction:
            for price in prices_for(plan):
                await upsert_price(transaction, price, created_by="bench")
            last_day = (plan.month_start + dt.timedelta(days=DAYS)).date()
            await ensure_usage_partitions(transaction, plan.month_start.date(), last_day)
            # Rolled from the month's start (no ingestion_batches rows say where the data begins).
            await transaction.execute(
                text("UPDATE rollup_state SET materialized_through = :m, dirty_before = :m"), {"m": plan.month_start}
            )
        raw = await asyncpg.connect(url)
        try:
            info["incident_insert_s"] = await _insert_incident(raw, plan)
            info["cost_insert_s"] = await _insert_cost(raw, plan)
        finally:
            await raw.close()
        info["rollup_s"] = await roll_up(engine, plan.month_start)
    finally:
        await engine.dispose()
    settle = await asyncpg.connect(url)
    try:
        say("VACUUM ANALYZE")
        started = time.monotonic()
        await settle.execute("VACUUM (ANALYZE)")
        info["vacuum_s"] = round(time.monotonic() - started, 1)
        info["events"] = int(await settle.fetchval("SELECT count(*) FROM usage_events"))
        info["database_size"] = await settle.fetchval("SELECT pg_size_pretty(pg_database_size($1))", name)
        info["completed_at"] = dt.datetime.now(dt.UTC).isoformat()
        await settle.execute(
            f"CREATE TABLE IF NOT EXISTS {MARKER_TABLE} (completed_at timestamptz NOT NULL, info jsonb NOT NULL)"
        )
        await settle.execute(f"INSERT INTO {MARKER_TABLE} VALUES (now(), $1::jsonb)", json.dumps(info))
    finally:
        await settle.close()
    say(f"data set ready: {info['events']:,} events, {info['database_size']}")
    return info


async def _insert_incident(connection: asyncpg.Connection, plan: DataPlan) -> float:
    step_us = (plan.incident_end - plan.incident_start) // plan.rows // dt.timedelta(microseconds=1)
    progress = Progress(f"INCIDENT events of {INCIDENT_ORG}", plan.rows)
    started = time.monotonic()
    for first in range(0, plan.rows, INSERT_CHUNK):
        last = min(first + INSERT_CHUNK, plan.rows) - 1
        await connection.execute(INCIDENT_INSERT, first, last, plan.incident_start, step_us, list(MODELS),
                                 list(ERROR_TYPES), list(REGIONS))  # fmt: skip
        progress.advance(last - first + 1)
    return round(time.monotonic() - started, 1)


async def _insert_cost(connection: asyncpg.Connection, plan: DataPlan) -> float:
    per_day = plan.orgs * PROJECTS * len(MODELS)
    progress = Progress(f"COST events ({plan.orgs:,} orgs, one a day per project and model)", per_day * DAYS)
    started = time.monotonic()
    for day in range(DAYS):
        await connection.execute(COST_INSERT, day, plan.month_start, plan.orgs, list(MODELS))
        progress.advance(per_day)
    return round(time.monotonic() - started, 1)


# ------------------------------------------------------------------------------------------------ the jobs


def jobs_for(plan: DataPlan, now: dt.datetime) -> dict[str, NewJob]:
    """The two jobs measured: the all-org COST export (month to date, or the closed month), the INCIDENT
    window of the incident org (no filter)."""
    cost = cost_job(org_id=None, month=None if plan.month_to_date else plan.month, requested_by="bench",
                    key=None, now=now)  # fmt: skip
    incident = incident_job(org_id=INCIDENT_ORG, start=plan.incident_start, end=plan.incident_end,
                            requested_by="bench", key=None)  # fmt: skip
    return {COST: cost, INCIDENT: incident}


def statement_for(job: NewJob, materialized_through: dt.datetime | None) -> tuple[str, tuple[object, ...]]:
    """The statement the worker runs for ``job`` (exports/export_file.py ``_source``)."""
    if job.kind == COST:
        return cost_statement(job.org_id, job.range_from, job.range_to, materialized_through)
    return incident_statement(incident_selection(job))


# ---------------------------------------------------------------------------------------- the worker (child)


class RssSampler:
    """The process's resident set, read from ``/proc/self/statm`` every ``every_s`` in a thread; the peak."""

    def __init__(self, every_s: float = RSS_EVERY_S) -> None:
        self.every_s = every_s
        self.baseline = rss_bytes()
        self.peak = self.baseline
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        self.peak = max(self.peak, rss_bytes())
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child_entry(pipe: Connection, spec: dict[str, Any]) -> None:
    """The worker process: set up as the export role does, say ready, wait for go, run one job, report."""
    try:
        result = asyncio.run(_child(pipe, spec))
    except BaseException as error:  # reported to the parent, which fails the run
        pipe.send({"failure": f"{type(error).__name__}: {error}"})
        raise
    pipe.send(result)


async def _child(pipe: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    from sqlalchemy import text

    from db.engine import create_engine
    from exports.jobs import create_job
    from exports.metrics import ExportMetrics
    from exports.storage.configured import open_storage
    from exports.worker import ExportWorker
    from gateway.metrics import Metrics
    from kernel.settings import Settings

    settings = Settings(**spec["settings"])
    url = spec["url"]
    engine = create_engine(url, pool_size=settings.db_pool_size)  # as gateway.resources.open_database
    try:
        async with open_storage(settings) as storage:
            worker = ExportWorker(engine, storage, None, settings, ExportMetrics(Metrics.create().meter("bench")))
            async with engine.connect() as connection:  # the pool's first connection, as a running worker has
                await connection.execute(text("SELECT 1"))
            gc.collect()
            pipe.send({"ready": os.getpid()})
            await asyncio.to_thread(pipe.recv)
            started = time.perf_counter()
            async with engine.begin() as connection:
                job, _ = await create_job(connection, spec["job"])
            created_s = time.perf_counter() - started
            maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            with RssSampler() as rss:
                started = time.perf_counter()
                ended = await worker.run_once()
                wall = time.perf_counter() - started
            maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    finally:
        await engine.dispose()
    if ended is None or ended.id != job.id:
        raise RuntimeError(f"run_once ran {None if ended is None else ended.id}, not the job created ({job.id})")
    return {
        "job_id": str(job.id), "status": ended.status, "error": ended.error, "rows": ended.row_count,
        "object_key": ended.object_key, "checksum_sha256": ended.checksum_sha256, "totals": ended.totals,
        "snapshot_at": str(ended.snapshot_at), "create_job_s": round(created_s, 4), "wall_s": round(wall, 3),
        "rss_before_mib": round(rss.baseline / MIB, 1), "rss_peak_mib": round(rss.peak / MIB, 1),
        "rss_growth_mib": round((rss.peak - rss.baseline) / MIB, 1), "rss_samples": rss.samples,
        "ru_maxrss_before_mib": round(maxrss_before / MIB, 1), "ru_maxrss_after_mib": round(maxrss_after / MIB, 1),
    }  # fmt: skip


class Store:
    """The store the worker writes to, as this process sees it: its settings for the child, an object's size,
    deleting it. S3: a moto server in this process; local: a temporary data dir."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.data_dir = Path(tempfile.mkdtemp(prefix="export_bench_"))
        self.endpoint: str | None = None
        self._server: Any = None

    async def __aenter__(self) -> Store:
        if self.kind == "s3":
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request

            os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self._server.start()
            host, port = self._server.get_host_and_port()
            self.endpoint = f"http://{host}:{port}"
            async with self._client() as s3:
                await s3.create_bucket(Bucket=BUCKET)
            say(f"moto S3 server at {self.endpoint}, bucket {BUCKET}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _client(self) -> Any:
        import aioboto3

        return aioboto3.Session().client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def settings(self, url: str) -> dict[str, Any]:
        common = {"database_url": url, "data_dir": self.data_dir, "export_link_secret": secrets.token_urlsafe(48)}
        if self.kind == "s3":
            return common | {"s3_bucket": BUCKET, "s3_endpoint_url": self.endpoint}
        return common

    async def size_and_delete(self, key: str) -> int:
        """The stored object's size; then it is deleted (a 1M-row file is 100-200 MB, held in moto's memory)."""
        if self.kind == "s3":
            async with self._client() as s3:
                size = int((await s3.head_object(Bucket=BUCKET, Key=key))["ContentLength"])
                await s3.delete_object(Bucket=BUCKET, Key=key)
            return size
        path = self.data_dir / key
        size = path.stat().st_size
        path.unlink()
        return size


async def run_worker(dataset: Dataset, store: Store, job: NewJob, args: argparse.Namespace,
                     profile_to: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """One worker run in a child process, after a quiet wait, with its CPU window (and py-spy if asked)."""
    await _cancel_leftover_jobs(dataset.url)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    spec = {"url": dataset.url, "settings": store.settings(dataset.url), "job": job}
    child = context.Process(target=_child_entry, args=(theirs, spec), name="export worker")
    child.start()
    spy = None
    try:
        ready = await asyncio.to_thread(ours.recv)
        if "failure" in ready:
            raise RuntimeError(f"the worker process failed to start: {ready['failure']}")
        quiet = await wait_quiet(args.quiet_wait, args.quiet_threshold)
        if profile_to is not None:
            spy = await start_py_spy(ready["ready"], 600, "raw", profile_to)
            await asyncio.sleep(1.0)  # py-spy attaches
        window = CpuWindow({ready["ready"]: "worker"}, dataset.name)
        window.start()
        ours.send("go")
        result: dict[str, Any] = await asyncio.to_thread(ours.recv)
        cpu = await window.stop()
        if "failure" in result:
            raise RuntimeError(f"the worker process failed: {result['failure']}")
        await asyncio.to_thread(child.join, 60)
        if spy is not None:
            _, err = await asyncio.wait_for(spy.communicate(), 60)
            result["py_spy_stderr"] = err.decode(errors="replace")[-500:]
    finally:
        if child.is_alive():
            child.terminate()
        if spy is not None and spy.returncode is None:
            spy.terminate()
    if result["status"] == "SUCCEEDED" and result["object_key"]:
        result["bytes"] = await store.size_and_delete(result["object_key"])
    return result | {"quiet": quiet, "cpu": cpu}


async def _cancel_leftover_jobs(url: str) -> None:
    """Jobs an interrupted earlier run left QUEUED or RUNNING would be claimed first: cancelled."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            "UPDATE export_jobs SET status = 'CANCELLED', finished_at = now(), lease_owner = NULL, "
            "lease_expires_at = NULL WHERE status IN ('QUEUED', 'RUNNING')"
        )
    finally:
        await connection.close()


# ------------------------------------------------------------------------------------ the floor and cursor


@contextlib.asynccontextmanager
async def _snapshot(url: str) -> AsyncIterator[tuple[asyncpg.Connection, dt.datetime | None]]:
    """A read-only REPEATABLE READ transaction on a connection set up as the workers' (UTC, no JIT)."""
    connection = await asyncpg.connect(url, server_settings={"TimeZone": "UTC", "jit": "off"})
    try:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            through = await connection.fetchval("SELECT materialized_through FROM rollup_state")
            yield connection, through
    finally:
        await connection.close()


async def run_copy(dataset: Dataset, job: NewJob, args: argparse.Namespace) -> dict[str, Any]:
    """The floor: ``COPY (statement) TO STDOUT (FORMAT csv)``, bytes counted and discarded."""
    quiet = await wait_quiet(args.quiet_wait, args.quiet_threshold)
    size = 0

    async def sink(data: bytes) -> None:
        nonlocal size
        size += len(data)

    window = CpuWindow({}, dataset.name)
    async with _snapshot(dataset.url) as (connection, through):
        sql, values = statement_for(job, through)
        window.start()
        started = time.perf_counter()
        status = await connection.copy_from_query(sql, *values, output=sink, format="csv")
        wall = time.perf_counter() - started
    cpu = await window.stop()
    return {"rows": copy_rows(status), "bytes": size, "wall_s": round(wall, 3), "quiet": quiet, "cpu": cpu}


async def run_cursor(dataset: Dataset, job: NewJob, args: argparse.Namespace) -> dict[str, Any]:
    """The statement through a server-side cursor (``PREFETCH`` rows a round trip), records dropped."""
    quiet = await wait_quiet(args.quiet_wait, args.quiet_threshold)
    rows = 0
    window = CpuWindow({}, dataset.name)
    async with _snapshot(dataset.url) as (connection, through):
        sql, values = statement_for(job, through)
        window.start()
        started = time.perf_counter()
        async for _ in connection.cursor(sql, *values, prefetch=PREFETCH):
            rows += 1
        wall = time.perf_counter() - started
    cpu = await window.stop()
    return {"rows": rows, "wall_s": round(wall, 3), "quiet": quiet, "cpu": cpu}


def copy_rows(status: str) -> int:
    """The row count of a ``COPY n`` command tag."""
    tag, _, count = status.partition(" ")
    if tag != "COPY" or not count.isdigit():
        raise ValueError(f"not a COPY command tag: {status!r}")
    return int(count)


# -------------------------------------------------------------------------------------------- the results


def figures(worker: dict[str, Any], floor: dict[str, Any], cursor: dict[str, Any] | None) -> dict[str, Any]:
    """Rows/s of the worker, the floor and the cursor, and the worker's as a ratio to the floor's."""

    def rate(entry: dict[str, Any]) -> float:
        return round(float(entry["rows"]) / max(float(entry["wall_s"]), 1e-9), 1)

    out: dict[str, Any] = {
        "worker_rows_per_s": rate(worker),
        "floor_rows_per_s": rate(floor),
        "worker_to_floor_rows_per_s": round(rate(worker) / max(rate(floor), 1e-9), 3),
        "worker_bytes_per_s": round(worker.get("bytes", 0) / max(worker["wall_s"], 1e-9)),
    }
    if cursor is not None:
        out["cursor_rows_per_s"] = rate(cursor)
        out["cursor_to_floor_rows_per_s"] = round(rate(cursor) / max(rate(floor), 1e-9), 3)
    return out


def summarize(results: dict[str, Any], expected_rows: dict[str, int]) -> dict[str, Any]:
    """Each measured run of each kind against the targets: wall time, RSS growth, and at least the planned rows
    (rows/s to the floor is reported, with no target)."""
    rows: list[dict[str, Any]] = []
    for index, run in enumerate(results.get("runs", []), 1):
        for kind, entry in run.items():
            worker = entry["worker"]
            checks = (
                ("wall time", worker["wall_s"], TARGETS["wall_s"], "s", worker["wall_s"] <= TARGETS["wall_s"]),
                ("worker RSS growth", worker["rss_growth_mib"], TARGETS["rss_growth_mib"], "MiB",
                 worker["rss_growth_mib"] <= TARGETS["rss_growth_mib"]),
                ("rows exported", worker["rows"], expected_rows[kind], "rows",
                 worker["status"] == "SUCCEEDED" and (worker["rows"] or 0) >= expected_rows[kind]),
            )  # fmt: skip
            for what, value, target, unit, met in checks:
                bound = ">=" if unit == "rows" else "<="
                rows.append({"run": index, "kind": kind, "what": what, "value": value, "target": target,
                             "bound": bound, "unit": unit, "met": met})  # fmt: skip
    return {"targets": rows, "all_met": all(r["met"] for r in rows) if rows else None}


AREAS = (
    ("exports/csv_format", "exports.csv_format (cells, csv writer, encode)"),
    ("exports/export_file", "exports.export_file (tally, row pass-on)"),
    ("db/export_rows", "db.export_rows (cursor loop)"),
    ("exports/storage", "exports.storage (sha256, part buffers)"),
    ("asyncpg", "asyncpg (protocol, record decoding)"),
    ("aiobotocore", "S3 client (aiobotocore, botocore, aiohttp)"),
    ("botocore", "S3 client (aiobotocore, botocore, aiohttp)"),
    ("aiohttp", "S3 client (aiobotocore, botocore, aiohttp)"),
    ("decimal", "decimal"),
    ("datetime", "datetime"),
    ("asyncio", "asyncio (Python side)"),
    ("sqlalchemy", "SQLAlchemy"),
)
NOT_AREAS = ("<frozen runpy>", "bench/", "multiprocessing/")


def area_of(file: str, func: str) -> str:
    if file.endswith("asyncio/runners.py") or "uvloop" in file:
        return "event loop (native: socket I/O, callbacks)"
    return next((name for needle, name in AREAS if needle in file), f"other ({file.split('/')[0]})")


def main_thread_stacks(collapsed: Path) -> tuple[Path, int]:
    """py-spy's collapsed stacks without those of other threads (the RSS sampler, the executor's idle
    workers: py-spy counts their timed waits as active), in a file beside it; and the samples left out."""
    kept, dropped = [], 0
    for line in collapsed.read_text().splitlines():
        if line.startswith(("_bootstrap (threading.py", "Thread._bootstrap (threading.py")):
            dropped += int(line.rpartition(" ")[2] or 0)
        else:
            kept.append(line)
    main = collapsed.with_name(collapsed.stem + "_main.txt")
    main.write_text("\n".join(kept) + "\n")
    return main, dropped


def summarize_profile(collapsed: Path, duration_s: float) -> dict[str, Any]:
    """The worker's main thread (the event loop: everything the export does) by function and area."""
    main, other_threads = main_thread_stacks(collapsed)
    counts = count_stacks(main, area_of, NOT_AREAS)
    return {
        "samples": counts.samples,
        "other_threads_samples": other_threads,
        "busy_share_of_one_core": counts.busy_share(duration_s, PROFILE_RATE_HZ),
        "by_area_self": counts.top(counts.area_self, 15),
        "by_area_total": counts.top(counts.area_total, 15),
        "top_self": counts.top(counts.self_samples, 20),
        "top_total": counts.top(counts.total_samples, 30),
    }


def new_results(args: argparse.Namespace, dataset: Dataset, jobs: dict[str, NewJob]) -> dict[str, Any]:
    plan = dataset.plan
    return {
        "benchmark": "exports",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "command": "python -m bench.export_bench " + " ".join(sys.argv[1:]),
        "environment": machine()
        | {
            "postgres": postgres_version(),
            "py_spy": py_spy_version(),
            "services": "PostgreSQL, the moto S3 server (in the benchmark process) and the worker on the same machine",
        }
        | connection_facts(ADMIN_URL),
        "targets": TARGETS,
        "dataset": {
            "database": dataset.name,
            "month": plan.month,
            "month_to_date": plan.month_to_date,
            "orgs": plan.orgs,
            "cost_rows_planned": plan.cost_rows,
            "incident_rows_planned": plan.rows,
        }
        | dataset.info,
        "jobs": {
            kind: {
                "org_id": job.org_id,
                "params": job.params,
                "range_from": job.range_from.isoformat(),
                "range_to": job.range_to.isoformat(),
            }
            for kind, job in jobs.items()
        },
        "settings": {
            "quick": args.quick,
            "storage": args.storage,
            "runs": args.runs,
            "quiet_threshold_cores": args.quiet_threshold,
            "part_size": csv_format.PART_SIZE,
            "prefetch": PREFETCH,
            "rss_sample_every_s": RSS_EVERY_S,
        },
        "definitions": {
            "worker": "a child process set up as the export role (engine with the default pool, the configured "
            "store, no pub/sub); create_job, then ExportWorker.run_once once: wall_s is run_once (claim, read in "
            "one snapshot, CSV, upload, SUCCEEDED); rss_growth_mib is the peak RSS (/proc/self/statm every 50 ms) "
            "minus the RSS just before run_once",
            "floor": "COPY (the job's statement, arguments inlined by asyncpg) TO STDOUT (FORMAT csv) through "
            "asyncpg copy_from_query into a sink that counts and discards the bytes, in a read-only REPEATABLE "
            "READ transaction; run just before the worker",
            "cursor": "the same statement through a server-side cursor (prefetch as the worker's), records "
            "counted and dropped: database and driver, without CSV, tally or upload",
            "cpu": "cores per process group over the step (utime+stime from /proc); bench = this process, which "
            "runs the moto S3 server; foreign = work that is not the benchmark's",
            "ru_maxrss": "getrusage's peak RSS, for reference only: Linux carries it over exec from the parent "
            "(this process, which holds the moto server's objects), so it is not the worker's own",
            "profile": "py-spy record --format raw at 100 Hz of one more worker run of each kind (not a measured run); "
            "shares are of the main thread's samples (the event loop, where the export runs); self time of a "
            "Python frame includes the C it calls (csv.writer.writerow under PartEncoder.add, asyncpg's record "
            "decoding under the transport's data_received)",
        },
        "runs": [],
    }


def save(results: dict[str, Any], out: Path, expected: dict[str, int]) -> None:
    results["summary"] = summarize(results, expected)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")


def _line(kind: str, worker: dict[str, Any], floor: dict[str, Any], rates: dict[str, Any]) -> str:
    size = worker.get("bytes", 0) / MIB
    return (f"   {kind}: worker {worker['rows']:,} rows, {size:,.1f} MiB in {worker['wall_s']} s "
            f"({rates['worker_rows_per_s']:,.0f} rows/s), RSS +{worker['rss_growth_mib']} MiB; floor COPY "
            f"{floor['wall_s']} s ({rates['floor_rows_per_s']:,.0f} rows/s): ratio "
            f"{rates['worker_to_floor_rows_per_s']}; foreign cores {worker['cpu']['foreign_cores']}")  # fmt: skip


async def main_async(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else RESULTS / ("exports_quick.json" if args.quick else "exports.json")
    now = dt.datetime.now(dt.UTC)
    plan = plan_data(args.rows, now)
    say(f"data: {plan.rows:,} INCIDENT events, {plan.orgs:,} orgs for {plan.cost_rows:,} COST rows, month "
        f"{plan.month} ({'to date' if plan.month_to_date else 'closed: the current month has < 20 days'})")  # fmt: skip
    dataset = await prepare_dataset(plan, fresh=args.fresh)
    jobs = jobs_for(plan, now)
    expected = {COST: plan.cost_rows, INCIDENT: plan.rows}
    results = new_results(args, dataset, jobs)
    kinds = [k for k in (COST, INCIDENT) if k.lower() in args.kinds.split(",")]
    gc.collect()
    try:
        async with Store(args.storage) as store:
            for index in range(1, args.runs + 1):
                run: dict[str, Any] = {}
                results["runs"].append(run)
                for kind in kinds:
                    job = jobs[kind]
                    if index == 1:
                        say(f"== {kind}: warm-up COPY (unmeasured: reads the data into the caches)")
                        await run_copy(dataset, job, args)
                    say(f"== run {index}/{args.runs} {kind}: floor COPY, cursor, then the worker")
                    floor = await run_copy(dataset, job, args)
                    cursor = await run_cursor(dataset, job, args)
                    worker = await run_worker(dataset, store, job, args)
                    rates = figures(worker, floor, cursor)
                    run[kind] = {"worker": worker, "floor": floor, "cursor": cursor, "figures": rates}
                    say(_line(kind, worker, floor, rates))
                    save(results, out, expected)
            if args.profile and py_spy() is not None:
                results["profile"] = await profile_runs(dataset, store, jobs, kinds, args)
                save(results, out, expected)
    finally:
        if not args.keep_db:
            say(f"dropping {dataset.name} (--keep-db keeps it)")
            await admin(f'DROP DATABASE IF EXISTS "{dataset.name}" WITH (FORCE)')
    say(f"results: {shown(out)}")
    for row in results["summary"]["targets"]:
        say(f"   {'met    ' if row['met'] else 'NOT met'}  run {row['run']} {row['kind']} {row['what']}: "
            f"{row['value']} {row['unit']} (target {row['bound']} {row['target']})")  # fmt: skip
    return 0


async def profile_runs(dataset: Dataset, store: Store, jobs: dict[str, NewJob], kinds: Sequence[str],
                       args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """One more worker run of each kind under py-spy (raw stacks at 100 Hz); its top functions and areas."""
    profiles: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="export_bench_profile_"))
    try:
        for kind in kinds:
            say(f"== profile: the worker under py-spy, {kind}")
            raw = work / f"{kind.lower()}.txt"
            worker = await run_worker(dataset, store, jobs[kind], args, profile_to=raw)
            entry: dict[str, Any] = {"wall_s": worker["wall_s"], "rows": worker["rows"]}
            if raw.exists():
                entry |= summarize_profile(raw, worker["wall_s"])
                for row in entry["by_area_self"][:8]:
                    say(f"   {row['share'] * 100:5.1f}%  {row['function']}")
            else:
                entry["error"] = worker.get("py_spy_stderr", "py-spy wrote nothing")
            profiles[kind] = entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return profiles


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.export_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 100,000 rows, one run, no profile")
    parser.add_argument("--keep-db", action="store_true", help="keep the bench database for the next run")
    parser.add_argument("--fresh", action="store_true", help="rebuild the bench database even if complete")
    parser.add_argument("--storage", choices=("s3", "local"), default="s3", help="moto S3 (default) or local folder")
    parser.add_argument("--rows", type=int, default=None, help="rows of each export (default 1,000,000; quick 100,000)")
    parser.add_argument("--runs", type=int, default=None, help="measured runs of each kind (default 2; quick 1)")
    parser.add_argument("--kinds", default="cost,incident", help="exports to measure (default cost,incident)")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the py-spy runs")
    parser.add_argument("--quiet-threshold", type=float, default=0.3, help="busy cores that count as quiet")
    parser.add_argument("--quiet-wait", type=float, default=None, help="max s to wait for quiet (30; quick 10)")
    parser.add_argument("--out", default=None, help="results file (default bench/results/exports.json)")
    args = parser.parse_args(argv)
    args.rows = args.rows or (100_000 if args.quick else 1_000_000)
    args.runs = args.runs or (1 if args.quick else 2)
    args.quiet_wait = args.quiet_wait if args.quiet_wait is not None else (10 if args.quick else 30)
    if args.quick:
        args.profile = False
    unknown = set(args.kinds.split(",")) - {"cost", "incident"}
    if unknown:
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_cancellable(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
