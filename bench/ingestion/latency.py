"""The latency scenario: the gateway runs; events are published at a steady rate, each carrying its publish
wall-clock time in its id; latency = commit time of the batch that stored it - publish time."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import secrets
import time
from typing import Any

from bench.harness.broker import declare_topology, rabbitmq_queue_counts, remove_topology
from bench.harness.cpu import CpuSampler, wait_quiet
from bench.harness.output import say
from bench.harness.runinfo import shown
from bench.harness.servers import log_summary, stop_server, wait_ready
from bench.harness.stats import fine_seconds_summary
from bench.ingestion.commits import batch_stats, fetch_batches, latencies, watch_ingest
from bench.ingestion.gateway import READY_TIMEOUT_S, fresh_database, log_file, start_gateway
from bench.ingestion.plan import Plan
from bench.ingestion.summary import config_label
from bench.ingestion.throughput import QUIET_HINT
from bench.ingestion.traffic import steady_publish
from ingest.synthetic import Traffic, generate
from ingest.topology import Topology


@dataclasses.dataclass(frozen=True)
class SteadyRun:
    """One latency run: ``rate`` events/s in ``batch``-event messages, with gateway settings ``config``."""

    name: str
    rate: int
    batch: int
    config: dict[str, int]


async def run_latency(plan: Plan, run: SteadyRun) -> dict[str, Any]:
    """The gateway runs; publish at a steady rate for a while, every event stamped with its publish time."""
    seconds = plan.latency_seconds
    prefix = f"bench_{secrets.token_hex(4)}."
    say(f"== {run.name}: {run.rate:,} events/s for {seconds} s, {run.batch} per message, {config_label(run.config)}")
    traffic = Traffic(seed=plan.seed + 1, events=run.rate * seconds, orgs=200, models=12, span=dt.timedelta(minutes=5))
    events = list(generate(traffic))
    result: dict[str, Any] = {
        "scenario": run.name, "message_events": run.batch, "rate_target": run.rate, "seconds_target": seconds,
        "settings": dict(run.config), "amqp_prefix": prefix, "mode": "steady publishing while the ingester runs",
    }  # fmt: skip
    async with fresh_database(plan.code) as (db_name, url):
        result["database"] = db_name
        try:
            # Declare the topology first, so that the gateway's queue exists before publishing starts.
            await declare_topology(prefix)
            result["quiet"] = await wait_quiet(plan.quiet_wait_s, plan.quiet_threshold, QUIET_HINT)
            result |= await _measure(plan, run, events, url, db_name, prefix)
            lat = result["latency_s"]
            say(f"-> {run.name}: p50 {lat['p50']:.3f} s, p99 {lat['p99']:.3f} s, max {lat['max']:.3f} s")
        finally:
            await remove_topology(prefix)
    return result


async def _measure(plan: Plan, run: SteadyRun, events: list[dict[str, object]], url: str, db_name: str,
                   prefix: str) -> dict[str, Any]:  # fmt: skip
    log_path = log_file(plan.folder, run.name)
    gateway = await start_gateway(plan.code, url, prefix, run.config, log_path)
    try:
        await wait_ready(gateway, READY_TIMEOUT_S)
        await asyncio.sleep(2)  # let start-up work settle
        sampler = CpuSampler(gateway.pid, db_name)
        sampler.start()
        publish_start = time.time()
        published, publisher_stats = await steady_publish(prefix, events, batch=run.batch, rate=run.rate)
        publish_end = time.time()
        await watch_ingest(url, prefix, len(events), gateway)
        await sampler.stop()
    finally:
        code = await stop_server(gateway)
    result: dict[str, Any] = {"publish": {
        "events": published, "seconds": round(publish_end - publish_start, 2),
        "events_per_s": round(published / (publish_end - publish_start)), "publisher": publisher_stats,
    }}  # fmt: skip
    rows = await latencies(url)
    result |= _latency_figures(rows, publish_start)
    stats = batch_stats(await fetch_batches(url))
    stats.pop("window")
    result["ingest"] = stats
    result["cpu"] = sampler.window(publish_start, publish_end)
    result["stored_rows"] = len(rows)
    result["dead_lettered"] = rabbitmq_queue_counts(Topology.named(prefix).dead_letter_queue)
    result["gateway_exit_code"] = code
    result["gateway_log"] = log_summary(log_path)
    result["gateway_log_file"] = shown(log_path)
    return result


def _latency_figures(rows: list[tuple[float, float, float]], publish_start: float) -> dict[str, Any]:
    """Publish-to-commit, all of it, after the first 5 s, and by the ``committed_at`` column."""
    return {
        "latency_s": fine_seconds_summary([lat for _, lat, _ in rows]),
        "latency_s_after_5s_warmup": fine_seconds_summary([lat for sent, lat, _ in rows if sent >= publish_start + 5]),
        "latency_s_by_committed_at_column": fine_seconds_summary([lat for _, _, lat in rows]),
    }
