"""Capacity constants for docs/scaling.md (issue 14): what one million fresh events cost the rollup leader, and
how many bytes an event takes on disk in ``usage_events``, ``event_receipts``, the hourly rollups and the
per-minute reliability rollup (``reliability_minute_model``, kept ``db.rollup.MINUTE_DAYS``); plus the capacity
model that turns them (and the other benchmarks' figures) into processes and disk for N events/s and M orgs.

    python -m bench.capacity                  # 1,000,000 events in bench_capacity_1000000 (reused when complete)
    python -m bench.capacity --fresh          # reload the data set
    python -m bench.capacity --events 200000  # a smaller run (the per-event figures hold; the lag scales)

Data: ``--events`` synthetic events (``ingest.synthetic``) over the ``--hours`` before now, ``--orgs`` orgs with
Zipf volume, loaded through ``EventWriter`` by ``bench.api.dataset.load_dataset``. The defaults (1M events, 6 h,
115 orgs) give ~1,450 events per org-hour, the average of the worked example in docs/scaling.md (2,000 events/s
over 5,000 orgs), so the rollups' rows per event are those of that load, not of a sparse 30-day set.

Measurement: the rollups (the minute table too) are emptied and the watermarks reset, then
``db.rollup.run_cycle`` rolls every event (``now`` an hour past the data's end, so the current hour is rolled too,
and every minute row is within ``MINUTE_DAYS``), ``--repeat`` times; then VACUUM ANALYZE and
``pg_total_relation_size`` (heap, indexes, TOAST) of every table against its rows. The machine's busy cores during
each cycle are recorded: other work on the machine slows the cycle and the results say so.

Results: ``bench/results/capacity.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import text

from bench.api.dataset import Dataset, existing_dataset, load_dataset
from bench.harness.cpu import MachineCpu, process_cpu_s
from bench.harness.entry import run_cancellable
from bench.harness.output import say
from bench.harness.runinfo import ROOT, git_commit, machine, postgres_version
from db.engine import create_engine
from db.rollup import HOURLY_TABLES, MINUTE_DAYS, run_cycle

RESULTS = ROOT / "bench" / "results" / "capacity.json"
RAW_TABLES = ("usage_events", "event_receipts")
MILLION = 1_000_000
SECONDS_PER_DAY = 86_400
MINUTES_PER_DAY = 1_440
MINUTE_TABLE = "reliability_minute_model"
# The hourly tables proper: db.rollup's HOURLY_TABLES also names the minute table (deleted and rolled by hour), which
# grows by org-minute and is kept MINUTE_DAYS, not by group and for a year.
HOUR_TABLES = tuple(name for name in HOURLY_TABLES if name != MINUTE_TABLE)


# --- pure parts: sizes per event and the capacity model -----------------------------------------------------------


@dataclass(frozen=True)
class TableSize:
    """One table (all its partitions) on disk: heap, indexes and TOAST, and its rows."""

    rows: int
    bytes: int


def bytes_per_event(sizes: Mapping[str, TableSize], events: int) -> dict[str, float]:
    """Each table's bytes divided by the events loaded, plus ``rollups``: the hourly tables together (not the
    minute table, which has its own entry)."""
    if events <= 0:
        raise ValueError("events must be positive")
    per = {name: size.bytes / events for name, size in sizes.items()}
    per["rollups"] = sum(sizes[name].bytes for name in HOUR_TABLES if name in sizes) / events
    return {name: round(value, 1) for name, value in per.items()}


def rollup_bytes_per_group(sizes: Mapping[str, TableSize]) -> float:
    """Bytes of all hourly tables per ``usage_hourly`` row (one org, hour, model, project, key, status class):
    the unit rollup disk grows by, whatever the events per group."""
    groups = sizes["usage_hourly"].rows
    if groups <= 0:
        raise ValueError("usage_hourly is empty")
    return round(sum(sizes[name].bytes for name in HOUR_TABLES if name in sizes) / groups, 1)


def minute_bytes_per_row(sizes: Mapping[str, TableSize]) -> float:
    """Bytes of ``reliability_minute_model`` (heap, primary key, hour index, TOAST) per row: one org, UTC minute and
    model, with its packed latency sketch."""
    rows = sizes[MINUTE_TABLE].rows
    if rows <= 0:
        raise ValueError(f"{MINUTE_TABLE} is empty")
    return round(sizes[MINUTE_TABLE].bytes / rows, 1)


@dataclass(frozen=True)
class Constants:
    """One process of each part on the 2-core machine, and bytes per event (docs/scaling.md cites each)."""

    ingest_events_per_s: float  # one ingester, 100-event messages, at defaults
    ingest_single_events_per_s: float  # one ingester, one event a message
    api_queries_per_s: float  # one API process, usage HOUR x MODEL 30 d of a large org, 16 clients
    rollup_s_per_million: float  # one run_cycle over a million fresh events
    export_rows_per_s: float  # one export worker, all-org COST
    raw_bytes_per_event: float  # usage_events with its indexes
    receipt_bytes_per_event: float  # event_receipts with its primary key
    rollup_bytes_per_group: float  # all hourly tables per usage_hourly row
    groups_per_org_hour: float  # usage_hourly rows per active org-hour at the measured load
    minute_bytes_per_row: float  # reliability_minute_model per row (org, minute, model)
    minute_rows_per_org_minute: float  # reliability_minute_model rows per active org-minute at the measured load
    postgres_ingest_cpu_s_per_million: float  # PostgreSQL's CPU to write a million events (100-event messages)
    postgres_rollup_cpu_s_per_million: float  # the rollup cycle's backend, a million events
    postgres_query_cpu_s: float  # PostgreSQL's CPU per usage query (HOUR x MODEL 30 d, large org)


@dataclass(frozen=True)
class Demand:
    """What a platform asks of the gateway."""

    events_per_s: float
    orgs: int
    single_event_share: float = 0.0  # events arriving one a message (slower to ingest)
    queries_per_org_per_min: float = 1.0  # usage queries an org's dashboards send (with the page open)
    export_rows_per_day: float = 0.0
    raw_retention_days: int = 90
    headroom: float = 0.5  # run each part at this share of its measured capacity


@dataclass(frozen=True)
class Plan:
    ingesters: int
    api_processes: int
    rollup_leader_busy_share: float  # of one rollup leader's time; above 1 it cannot keep up
    postgres_cores: float  # CPU the primary spends on writes, rollups and usage queries (no headroom)
    export_workers: int
    raw_gb_per_day: float
    receipts_gb_per_day: float
    rollups_gb_per_day: float
    minute_rollups_gb_per_day: float  # reliability_minute_model
    # raw and receipts for the retention (+1 day, the sweeper's cut), hourly rollups for a year, minute rows for
    # MINUTE_DAYS (each cycle prunes them)
    steady_state_gb: float


def processes(load: float, capacity: float, headroom: float) -> int:
    """Processes needed to carry ``load`` when each may run at ``headroom`` of ``capacity`` (at least one)."""
    if capacity <= 0 or not 0 < headroom <= 1:
        raise ValueError("capacity must be positive and headroom in (0, 1]")
    return max(1, math.ceil(load / (capacity * headroom) - 1e-9))


def plan(demand: Demand, c: Constants) -> Plan:
    """The capacity model of docs/scaling.md: processes of each part and disk per day."""
    batched = demand.events_per_s * (1 - demand.single_event_share)
    single = demand.events_per_s * demand.single_event_share
    ingest_load = batched / c.ingest_events_per_s + single / c.ingest_single_events_per_s  # in ingesters
    events_per_day = demand.events_per_s * SECONDS_PER_DAY
    queries_per_s = demand.orgs * demand.queries_per_org_per_min / 60
    # Rollup groups: an org-hour holds at most one group per event; busy orgs hold the measured groups.
    events_per_org_hour = demand.events_per_s * 3600 / max(demand.orgs, 1)
    groups_per_day = demand.orgs * 24 * min(events_per_org_hour, c.groups_per_org_hour)
    # Minute rows likewise: an org-minute holds at most one row per event.
    events_per_org_minute = demand.events_per_s * 60 / max(demand.orgs, 1)
    minute_rows_per_day = demand.orgs * MINUTES_PER_DAY * min(events_per_org_minute, c.minute_rows_per_org_minute)
    raw = events_per_day * c.raw_bytes_per_event / 1e9
    receipts = events_per_day * c.receipt_bytes_per_event / 1e9
    rollups = groups_per_day * c.rollup_bytes_per_group / 1e9
    minutes = minute_rows_per_day * c.minute_bytes_per_row / 1e9
    return Plan(
        ingesters=processes(ingest_load, 1.0, demand.headroom),
        api_processes=processes(queries_per_s, c.api_queries_per_s, demand.headroom),
        rollup_leader_busy_share=round(demand.events_per_s * c.rollup_s_per_million / MILLION, 3),
        postgres_cores=round(
            demand.events_per_s * (c.postgres_ingest_cpu_s_per_million + c.postgres_rollup_cpu_s_per_million) / MILLION
            + queries_per_s * c.postgres_query_cpu_s,
            2,
        ),
        export_workers=processes(demand.export_rows_per_day / SECONDS_PER_DAY, c.export_rows_per_s, demand.headroom),
        raw_gb_per_day=round(raw, 2),
        receipts_gb_per_day=round(receipts, 2),
        rollups_gb_per_day=round(rollups, 3),
        minute_rollups_gb_per_day=round(minutes, 3),
        steady_state_gb=round(
            (raw + receipts) * (demand.raw_retention_days + 1) + rollups * 365 + minutes * MINUTE_DAYS, 1
        ),
    )


def cited_constants(results_dir: Path, measured: Mapping[str, Any]) -> Constants:
    """The constants from the other benchmarks' results files (their latest runs) and this run's figures."""
    ingest_results = json.loads((results_dir / "ingest.json").read_text())
    ingest = ingest_results["summary"]
    at_defaults = [r for r in ingest_results["runs"] if r["scenario"].startswith("batched_")
                   and r["settings"] == ingest_results["setting_defaults"]]  # fmt: skip
    graphql = json.loads((results_dir / "graphql.json").read_text())["usage_concurrent"]
    exports = json.loads((results_dir / "exports.json").read_text())
    cost = [r for r in exports["summary"]["targets"] if r["kind"] == "COST"]
    fastest = min(r["value"] for r in cost if r["what"] == "wall time")  # later runs of a loaded machine are slower
    rows = next(r["value"] for r in cost if r["what"] == "rows exported")
    return Constants(
        ingest_events_per_s=min(ingest["batched"]["at_defaults_events_per_s"]),
        ingest_single_events_per_s=min(ingest["single"]["at_defaults_events_per_s"]),
        api_queries_per_s=float(graphql["gateway"]["rps"]),
        rollup_s_per_million=float(measured["rollup_s_per_million"]),
        export_rows_per_s=round(rows / fastest),
        raw_bytes_per_event=float(measured["bytes_per_event"]["usage_events"]),
        receipt_bytes_per_event=float(measured["bytes_per_event"]["event_receipts"]),
        rollup_bytes_per_group=float(measured["rollup_bytes_per_group"]),
        groups_per_org_hour=float(measured["groups_per_org_hour"]),
        minute_bytes_per_row=float(measured["minute_bytes_per_row"]),
        minute_rows_per_org_minute=float(measured["minute_rows_per_org_minute"]),
        postgres_ingest_cpu_s_per_million=round(
            min(r["cpu"]["cpu_s"]["postgres"] * MILLION / r["ingest"]["events"] for r in at_defaults), 2
        ),
        postgres_rollup_cpu_s_per_million=float(measured["rollup_cpu_s_per_million"]),
        postgres_query_cpu_s=round(graphql["gateway"]["cpu"]["cores_used"]["postgres"] / graphql["gateway"]["rps"], 4),
    )


def cited_runs(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Which run of each cited results file the constants come from (its date and commit)."""
    runs = {}
    for name in ("ingest.json", "graphql.json", "exports.json"):
        results = json.loads((results_dir / name).read_text())
        runs[name] = {"date": results.get("date"), "commit": results.get("git", {}).get("commit")}
    return runs


# --- measurement --------------------------------------------------------------------------------------------------


def dataset_params(events: int, orgs: int, hours: float) -> dict[str, Any]:
    """``load_dataset``'s parameters: ``days`` may be a fraction (the span is ``timedelta(days=...)``)."""
    return {"events": events, "orgs": orgs, "models": 20, "seed": 7, "days": hours / 24, "zipf_s": 1.1}


async def table_sizes(url: str) -> dict[str, TableSize]:
    """Rows and total bytes (every partition, indexes and TOAST included) of the raw and hourly tables."""
    connection = await asyncpg.connect(url)
    try:
        sizes = {}
        for name in (*RAW_TABLES, *HOURLY_TABLES):
            # A partitioned table has no storage of its own: its partitions hold it (pg_partition_tree is empty
            # for a plain table, which is counted by itself).
            total = await connection.fetchval(
                "SELECT pg_total_relation_size($1::regclass) + coalesce((SELECT sum(pg_total_relation_size(relid)) "
                "FROM pg_partition_tree($1::regclass) WHERE relid <> $1::regclass), 0)::bigint",
                name,
            )
            rows = await connection.fetchval(f"SELECT count(*) FROM {name}")  # a fixed table name
            sizes[name] = TableSize(rows=int(rows), bytes=int(total))
        return sizes
    finally:
        await connection.close()


async def groups_per_org_hour(url: str) -> float:
    connection = await asyncpg.connect(url)
    try:
        value = await connection.fetchval("SELECT count(*)::float8 / count(DISTINCT (org_id, hour)) FROM usage_hourly")
    finally:
        await connection.close()
    return round(float(value), 1)


async def minute_rows_per_org_minute(url: str) -> float:
    connection = await asyncpg.connect(url)
    try:
        value = await connection.fetchval(
            f"SELECT count(*)::float8 / count(DISTINCT (org_id, minute)) FROM {MINUTE_TABLE}"
        )
    finally:
        await connection.close()
    return round(float(value), 2)


async def reset_rollups(url: str) -> None:
    """Empty the hourly tables (the minute table among them) and the watermarks, as before the first cycle."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f"TRUNCATE {', '.join(HOURLY_TABLES)}, rollup_dirty")
        await connection.execute(
            "UPDATE rollup_state SET materialized_through = NULL, dirty_before = NULL, minute_from = NULL"
        )
    finally:
        await connection.close()


async def vacuum(url: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("VACUUM (ANALYZE)")
    finally:
        await connection.close()


async def timed_cycle(url: str, until: dt.datetime) -> dict[str, Any]:
    """One ``run_cycle`` over every event (rollups reset first): seconds and the machine's busy cores."""
    await reset_rollups(url)
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:  # the pool's one connection: the cycle's backend
            backend = int(await connection.scalar(text("SELECT pg_backend_pid()")))
        cpu_before, before, started = process_cpu_s(backend), MachineCpu.read(), time.monotonic()
        result = await run_cycle(engine, until)
        seconds = time.monotonic() - started
        busy = (MachineCpu.read().busy - before.busy) / seconds
        cpu_after = process_cpu_s(backend)
    finally:
        await engine.dispose()
    assert result.ran, "another rollup held the lock"
    backend_cpu = None if cpu_before is None or cpu_after is None else round(cpu_after - cpu_before, 2)
    return {"seconds": round(seconds, 2), "postgres_backend_cpu_s": backend_cpu, "machine_busy_cores": round(busy, 2)}


async def measure(dataset: Dataset, repeat: int) -> dict[str, Any]:
    events = int(dataset.info["events_loaded"])
    until = dt.datetime.fromisoformat(dataset.info["data_end"]) + dt.timedelta(hours=1)
    cycles = []
    for index in range(repeat):
        say(f"rollup: run_cycle over {events:,} events ({index + 1}/{repeat}), rollups reset first")
        cycles.append(await timed_cycle(dataset.url, until))
        say(
            f"rollup: {cycles[-1]['seconds']} s (its backend {cycles[-1]['postgres_backend_cpu_s']} CPU s), "
            f"machine busy {cycles[-1]['machine_busy_cores']} cores of 2"
        )
    say("VACUUM ANALYZE, then sizes")
    await vacuum(dataset.url)
    sizes = await table_sizes(dataset.url)
    for name, size in sizes.items():
        say(f"{name}: {size.rows:,} rows, {size.bytes / 2**20:,.1f} MiB")
    best = min(c["seconds"] for c in cycles)
    cpu = [c["postgres_backend_cpu_s"] for c in cycles if c["postgres_backend_cpu_s"] is not None]
    return {
        "events": events,
        "rollup_cycles": cycles,
        "rollup_s_per_million": round(best * MILLION / events, 2),
        # The cycle's PostgreSQL backend alone: what it costs where the machine is not shared.
        "rollup_cpu_s_per_million": round(min(cpu) * MILLION / events, 2) if cpu else None,
        "sizes": {name: asdict(size) for name, size in sizes.items()},
        "bytes_per_event": bytes_per_event(sizes, events),
        "rollup_bytes_per_group": rollup_bytes_per_group(sizes),
        "groups_per_org_hour": await groups_per_org_hour(dataset.url),
        "events_per_group": round(events / sizes["usage_hourly"].rows, 2),
        "minute_bytes_per_row": minute_bytes_per_row(sizes),
        "minute_rows_per_org_minute": await minute_rows_per_org_minute(dataset.url),
        "events_per_minute_row": round(events / sizes[MINUTE_TABLE].rows, 2),
    }


async def prepared(args: argparse.Namespace) -> Dataset:
    """The data set: reused when its marker says it is complete with these parameters, else loaded."""
    params = dataset_params(args.events, args.orgs, args.hours)
    name = f"bench_capacity_{args.events}"
    found = None if args.fresh else await existing_dataset(name, params)
    if found is not None:
        say(f"reusing {name} (loaded {found.info['loaded_at']})")
        return found
    return await load_dataset(name, params, writers=args.writers)


def worked_example(constants: Constants) -> dict[str, Any]:
    demand = Demand(events_per_s=2000, orgs=5000, single_event_share=0.1, queries_per_org_per_min=1.0,
                    export_rows_per_day=5000 * 200)  # fmt: skip
    return {"demand": asdict(demand), "plan": asdict(plan(demand, constants))}


async def main_async(args: argparse.Namespace) -> int:
    dataset = await prepared(args)
    load = os.getloadavg()
    measured = await measure(dataset, args.repeat)
    constants = cited_constants(RESULTS.parent, measured)
    results = {
        "benchmark": "capacity",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "command": "python -m bench.capacity " + " ".join(args.argv),
        "environment": machine()
        | {
            "postgres": postgres_version(),
            "load_average_at_start": load,
            "load_average_at_end": os.getloadavg(),
        },
        "dataset": {
            "name": dataset.name,
            "params": dataset.info["params"],
            "loaded_at": dataset.info["loaded_at"],
            "load_events_per_s": dataset.info.get("load_events_per_s"),
        },
        "measured": measured,
        "constants": asdict(constants),
        "constants_from": cited_runs(RESULTS.parent),
        "worked_example": worked_example(constants),
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    say(f"wrote {RESULTS.relative_to(ROOT)}: rollup {measured['rollup_s_per_million']} s per million events, "
        f"bytes per event {measured['bytes_per_event']}")  # fmt: skip
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=MILLION)
    parser.add_argument("--orgs", type=int, default=115)
    parser.add_argument("--hours", type=float, default=6.0)
    parser.add_argument("--repeat", type=int, default=2, help="rollup cycles timed (the fastest counts)")
    parser.add_argument("--writers", type=int, default=2, help="concurrent batches while loading")
    parser.add_argument("--fresh", action="store_true", help="reload the data set")
    args = parser.parse_args(argv)
    args.argv = list(argv or [])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_cancellable(main_async(parse_args(argv)))


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
