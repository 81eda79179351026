"""The throughput scenarios (batched, single, profile): a backlog is published while no ingester runs, then the
gateway is started and drains it; the rate is events / (last commit - start of the first batch)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness.broker import rabbitmq_queue_counts, remove_topology, settled_queue_counts
from bench.harness.cpu import CpuSampler, wait_quiet
from bench.harness.output import say
from bench.harness.runinfo import shown
from bench.harness.servers import Server, log_summary, stop_server, wait_ready
from bench.harness.services import server_counters
from bench.ingestion.commits import batch_stats, count_events, fetch_batches, watch_ingest
from bench.ingestion.gateway import READY_TIMEOUT_S, ReadyProbe, fresh_database, log_file, start_gateway
from bench.ingestion.plan import Plan
from bench.ingestion.profile import ProfileSpec
from bench.ingestion.summary import config_label
from bench.ingestion.traffic import publish_bodies
from ingest.topology import Topology

QUIET_HINT = " (other work running?)"


@dataclasses.dataclass
class Drain:
    """One drain of a backlog: the scenario's name and what it publishes, with which gateway settings."""

    name: str
    bodies: Sequence[bytes]
    batch: int
    events: int
    config: dict[str, int]
    profile: ProfileSpec | None = None


async def run_throughput(plan: Plan, drain: Drain) -> dict[str, Any]:
    """Pre-publish the backlog with no consumer, then start the gateway and time the drain."""
    prefix = f"bench_{secrets.token_hex(4)}."
    say(f"== {drain.name}: {drain.events:,} events, {drain.batch} per message, {config_label(drain.config)}")
    result: dict[str, Any] = {
        "scenario": drain.name, "message_events": drain.batch, "events": drain.events, "messages": len(drain.bodies),
        "settings": dict(drain.config), "amqp_prefix": prefix,
        "mode": "backlog pre-published, then the ingester started",
    }  # fmt: skip
    async with fresh_database(plan.code) as (db_name, url):
        result["database"] = db_name
        try:
            result["publish"] = await publish_bodies(prefix, drain.bodies, batch=drain.batch, events=drain.events)
            result["quiet"] = await wait_quiet(plan.quiet_wait_s, plan.quiet_threshold, QUIET_HINT)
            result |= await _measure(plan, drain, url, db_name, prefix)
            stats = result["ingest"]
            say(
                f"-> {drain.name}: {stats['events_per_s']:,} events/s over {stats['window_s']} s, {stats['batches']} "
                f"batches of {stats['batch_events']['mean']:.0f} events; CPU cores {result['cpu'].get('cores_used')}"
            )
        finally:
            await remove_topology(prefix)
    return result


async def _measure(plan: Plan, drain: Drain, url: str, db_name: str, prefix: str) -> dict[str, Any]:
    log_path = log_file(plan.folder, drain.name)
    server_before = await server_counters()
    gateway = await start_gateway(plan.code, url, prefix, drain.config, log_path)
    sampler = CpuSampler(gateway.pid, db_name)
    sampler.start()
    result: dict[str, Any] = {}
    try:
        result["readyz_during_ingest"] = await _ingest(url, prefix, drain, gateway)
    finally:
        await sampler.stop()
        code = await stop_server(gateway)
    stats = batch_stats(await fetch_batches(url))
    start, end = stats.pop("window")
    result["ingest"] = stats
    result["postgres_server"] = _server_delta(server_before, await server_counters(), drain.events)
    result["cpu"] = sampler.window(start, end)
    result["startup_s"] = round((gateway.ready_at or start) - gateway.started_at, 2)
    result |= await _afterwards(url, prefix, code, log_path)
    if drain.profile is not None:
        result["profile_file"] = str(drain.profile)
    return result


async def _ingest(url: str, prefix: str, drain: Drain, gateway: Server) -> dict[str, Any]:
    """Wait for the gateway, then for every event to be committed, with py-spy from the first commit if asked;
    what ``/readyz`` answered meanwhile."""
    spy: list[asyncio.Task[Any]] = []

    def first_commit() -> None:
        if drain.profile is not None:
            spy.append(asyncio.ensure_future(drain.profile.start(gateway.pid)))

    probe = ReadyProbe(gateway)
    try:
        await wait_ready(gateway, READY_TIMEOUT_S)
        probe.start()
        await watch_ingest(url, prefix, drain.events, gateway, on_first_commit=first_commit)
    finally:
        readyz = await probe.stop()
        if spy:
            process = await spy[0]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 60)
    return readyz


def _server_delta(before: dict[str, int], after: dict[str, int], events: int) -> dict[str, Any]:
    wal = after["wal_lsn"] - before["wal_lsn"]
    return {
        "wal_bytes": wal,
        "wal_bytes_per_event": round(wal / max(events, 1)),
        "checkpoints": {k: after[k] - before[k] for k in ("checkpoints_timed", "checkpoints_req")},
        "note": "whole-server counters from the gateway's start to its stop (other databases included)",
    }


async def _afterwards(url: str, prefix: str, code: int | None, log_path: Path) -> dict[str, Any]:
    """What was stored, what the broker still holds, how the gateway ended."""
    return {
        "stored_rows": await count_events(url),
        "dead_lettered": rabbitmq_queue_counts(Topology.named(prefix).dead_letter_queue),
        "queue_after": await settled_queue_counts(Topology.named(prefix).queue),
        "gateway_exit_code": code,
        "gateway_log": log_summary(log_path),
        "gateway_log_file": shown(log_path),
    }
