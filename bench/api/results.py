"""What the results file records besides the figures: the run, the machine, the data, the settings and the
definitions of what is measured."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any

from bench.api.dataset import Dataset
from bench.api.summary import TARGETS
from bench.harness.runinfo import git_commit, machine, postgres_version, py_spy_version, tool_version
from bench.harness.services import ADMIN_URL
from bench.postgres import connection_facts
from kernel.settings import Settings

API = (
    "create_app(settings, roles={api}) on uvicorn (uvloop, httptools), 1 worker, log level WARNING, "
    "Redis freshness cache"
)
DEFINITIONS = {
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
}


def environment() -> dict[str, Any]:
    return machine() | {
        "postgres": postgres_version(),
        "wrk": tool_version(["wrk", "--version"]).split(" Copyright")[0],
        "py_spy": py_spy_version(),
        "services": "PostgreSQL, RabbitMQ, Redis, the gateway and the load generators on the same machine",
    }


def gateway_settings() -> dict[str, Any]:
    names = ("db_pool_size", "freshness_cache_ttl_s", "ingest_batch_events", "ingest_prefetch",
             "ingest_batch_max_age_ms", "rollup_interval_s")  # fmt: skip
    return {name: Settings.model_fields[name].default for name in names}


def new_results(args: argparse.Namespace, dataset: Dataset, redis_prefix: str) -> dict[str, Any]:
    """The results file before any figure."""
    return {
        "benchmark": "graphql",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "command": "python -m bench.graphql_bench " + " ".join(sys.argv[1:]),
        "postgres_connection": connection_facts(ADMIN_URL),  # socket or TCP, and the TCP congestion control
        "environment": environment(),
        "targets": TARGETS,
        "dataset": {"database": dataset.name} | dataset.info,
        "settings": _settings(args, redis_prefix),
        "definitions": DEFINITIONS,
        "usage_single": {},
    }


def _settings(args: argparse.Namespace, redis_prefix: str) -> dict[str, Any]:
    return {
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
        "api": API,
        "gateway_defaults": gateway_settings(),
        "redis_prefix": redis_prefix,
    }
