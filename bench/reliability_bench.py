"""The reliability query's benchmark: the gateway against the bare SQL it runs, and where its time goes.

    python -m bench.reliability_bench                # full: the 10M-event data set, 30 s windows
    python -m bench.reliability_bench --quick        # smoke run: 200k events, 10 s windows
    python -m bench.reliability_bench --keep-db      # keep bench_graphql_<events> for the next run (reused)
    python -m bench.reliability_bench --incident     # on a copy with a latency regression and an error burst

Data: the usage benchmark's (``bench.api.dataset.prepare_dataset``: ``bench_graphql_<events>``, reused while its
marker says it is complete and at the code's migration head), then a rollup cycle to the current hour. The
measured org is the largest.

Server: the API process of ``bench.graphql_bench`` (``create_app(settings, roles={api})`` on uvicorn, 1 worker,
Redis freshness cache, log level WARNING).

Scenarios (one run, so ratios hold; each window is preceded by a warm-up):

    h  ``reliability`` HOUR over the last 30 days, ``groupByModel: true``, percentiles 0.5, 0.95, 0.99, spikes
       (with their top contributors) and breakdown selected: 1 client (wrk -c1) vs the floor
    m  the same with MINUTE over the last 24 h, one overall series (``groupByModel: false``: per model, this
       selection's estimated cost is over the gateway's budget and the query is refused as QUERY_TOO_COMPLEX)
    o  the same as h over the last hour only (the range's statements, the history and the breakdown still run): what
       an answer costs whatever its size, against its own floor (not a target; run it with --only o)
    d  where the time goes: ``build_report`` in this process (each statement's start and end from asyncpg's
       query logger: until the floor's statements end, the Python work until the spike attribution statements
       start, their span, what follows), and PostgreSQL's own time of each floor statement (EXPLAIN ANALYZE,
       median of 5)
    p  py-spy of the API process under (h), or under (o) with ``--profile-shape o`` (give ``--out``: the profile
       files are named after the results file)

The floor: the statements ``reliability.report.build_report`` runs before it explains any spike, at once, each on
its own asyncpg connection (rows to dicts, orjson; packed sketches as hex):
``db.reliability.series_statement`` (``per_model`` as the report asks) for the range
and for the history before it (``reliability.report._history`` of ``lookback``), and
``db.reliability.errors_statement(limit=BREAKDOWN_ROWS)``. When the report finds spikes, the floor of all its SQL
runs the statements that explain them too, after those, at once (``with_attribution``: logged with their arguments
from one ``build_report``), and the ratio target is taken against it; the first-round floor stays in the results.
A window that other work disturbed (more than ``--quiet-threshold`` cores used by processes that are not part of
the benchmark) is rerun (``--retries``) and the least disturbed attempt kept.

Data set: ``--incident`` measures on a copy of it with a latency regression and an error burst injected for the
largest org (``bench/api/incident.py``), so that the report finds spikes and explains them.

Results: ``bench/results/reliability.json`` (``reliability_quick.json`` with ``--quick``,
``reliability_incident.json`` with ``--incident``, its profile ``reliability_profile_incident.txt``), the profile in
``bench/results/reliability_profile.txt`` (top functions) and ``reliability_profile_raw.txt`` (collapsed stacks).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.api import reliability as scenarios
from bench.api.dataset import prepare_dataset
from bench.api.incident import prepare_incident_dataset
from bench.api.queries import token_for
from bench.api.results import environment
from bench.api.run import Run
from bench.api.server import gateway_env, start_api
from bench.graphql_bench import finish, materialize, wait_for_other_benchmarks
from bench.harness.cpu import wait_quiet
from bench.harness.entry import run_cancellable
from bench.harness.output import say
from bench.harness.runinfo import ROOT, git_commit
from bench.harness.services import REDIS_URL

RESULTS = ROOT / "bench" / "results"
TARGETS = {
    "hour_30d_p50_ms": 40.0,
    "hour_30d_p99_ms": 80.0,
    "gateway_floor_latency_ratio": 2.0,
    "minute_24h_p50_ms": 60.0,
}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The figures against the targets (only what was measured)."""
    rows: list[dict[str, Any]] = []

    def add(what: str, value: float | None, target: float, unit: str) -> None:
        if value is not None:
            rows.append({"what": what, "value": value, "target": target, "unit": unit, "better": "lower",
                         "met": value <= target})  # fmt: skip

    single = results.get("single", {})
    if hour := single.get("hour_30d"):
        add("reliability HOUR 30 d, 1 client, p50", hour["gateway"]["latency_ms"]["p50"],
            TARGETS["hour_30d_p50_ms"], "ms")  # fmt: skip
        add("reliability HOUR 30 d, 1 client, p99", hour["gateway"]["latency_ms"]["p99"],
            TARGETS["hour_30d_p99_ms"], "ms")  # fmt: skip
        # The floor of the same SQL: with spikes, the statements that explain them are part of it.
        full = "ratio_gateway_to_floor_with_attribution" in hour
        ratio = hour["ratio_gateway_to_floor_with_attribution" if full else "ratio_gateway_to_floor"]
        for q in ("p50", "p99"):
            add(f"gateway / floor latency{' (with attribution)' if full else ''}, HOUR 30 d, {q}", ratio.get(q),
                TARGETS["gateway_floor_latency_ratio"], "x")  # fmt: skip
    if minute := single.get("minute_24h"):
        add("reliability MINUTE 24 h, 1 client, p50", minute["gateway"]["latency_ms"]["p50"],
            TARGETS["minute_24h_p50_ms"], "ms")  # fmt: skip
    return {"targets": rows, "all_met": all(r["met"] for r in rows) if rows else None}


class ReliabilityRun(Run):
    """The usage benchmark's run (windows, CPU accounting, reruns) with this benchmark's summary."""

    def save(self) -> None:
        self.results["summary"] = summarize(self.results)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=1, default=str) + "\n")


async def main_async(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        say("error: wrk is not installed (apt-get install -y wrk)")
        return 2
    default = "reliability_quick.json" if args.quick else "reliability_incident.json" if args.incident else None
    out = Path(args.out) if args.out else RESULTS / (default or "reliability.json")
    dataset = await prepare_dataset(args.events, fresh=args.fresh, writers=args.load_writers,
                                    before_load=lambda: wait_for_other_benchmarks(args.no_wait))  # fmt: skip
    if args.incident:
        dataset = await prepare_incident_dataset(dataset, fresh=args.fresh)
    await wait_for_other_benchmarks(args.no_wait)
    secret = secrets.token_urlsafe(48)
    redis_prefix = f"bench:reliability:{secrets.token_hex(3)}:"
    results = new_results(args, dataset.name, dataset.info)
    results["dataset"]["materialized_through"] = await materialize(dataset)
    work = Path(tempfile.mkdtemp(prefix="reliability_bench_"))
    env = gateway_env(
        ANALYTICS_DATABASE_URL=dataset.url, ANALYTICS_JWT_SECRET=secret, ANALYTICS_REDIS_URL=REDIS_URL,
        ANALYTICS_REDIS_PREFIX=redis_prefix, ANALYTICS_LOG_LEVEL="WARNING",
    )  # fmt: skip
    run = ReliabilityRun(args, dataset, await start_api(env, work), secret, work, results, out, env)
    gc.collect()
    gc.freeze()  # as the usage benchmark: the floor client's collections stay those of a lean client
    try:
        results["quiet"] = await wait_quiet(args.quiet_wait, args.quiet_threshold)
        await run_scenarios(run, set(args.only.split(",")))
    finally:
        await finish(run)
    say(f"results: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    for row in results["summary"]["targets"]:
        say(f"   {'met    ' if row['met'] else 'NOT met'}  {row['what']}: {row['value']} {row['unit']} "
            f"(target <= {row['target']})")  # fmt: skip
    return 0


async def run_scenarios(run: Run, only: set[str]) -> None:
    token = token_for(run.secret, run.dataset.largest_org)
    hour, minute = scenarios.shapes(dt.datetime.now(dt.UTC))
    for key, shape in (("h", hour), ("m", minute), ("o", scenarios.last_hour(hour))):
        if key in only:
            run.results["single"][shape.key] = await scenarios.scenario_single(run, shape, token)
            run.save()
    if "d" in only:
        for shape in (hour, minute):
            say(f"== where the time goes: build_report {shape.key} in this process, then EXPLAIN ANALYZE")
            entry = await scenarios.decompose(run.dataset, shape, runs=run.args.decompose_runs)
            entry["server_side"] = await scenarios.server_times(run.dataset, shape)
            run.results["where_the_time_goes"][shape.key] = entry
            say(
                f"   build_report p50 {entry['build_report_ms'].get('p50')} ms: series statements "
                f"end at {entry['series_statements_end_ms'].get('p50')} ms, Python until attribution "
                f"{entry['python_until_attribution_ms'].get('p50')} ms, attribution ({entry['spikes']} spikes, "
                f"{entry['attribution_statements_per_run']} statements) spans "
                f"{entry['attribution_span_ms'].get('p50')} ms, then {entry['after_attribution_ms'].get('p50')} ms "
                f"(the breakdown, beside them, ends at {entry['breakdown_end_ms'].get('p50')} ms)"
            )
            run.save()
    if "p" in only:
        profiled = scenarios.last_hour(hour) if run.args.profile_shape == "o" else hour
        run.results["profile"] = await scenarios.scenario_profile(run, profiled, token,
                                                                  round(run.args.profile_seconds))  # fmt: skip
        run.save()


def new_results(args: argparse.Namespace, name: str, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "benchmark": "reliability",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "command": "python -m bench.reliability_bench " + " ".join(sys.argv[1:]),
        "environment": environment(),
        "targets": TARGETS,
        "dataset": {"database": name} | info,
        "settings": {
            "quick": args.quick,
            "window_s": args.seconds,
            "warmup_s": args.warmup,
            "retries": args.retries,
            "quiet_threshold_cores": args.quiet_threshold,
            "percentiles": list(scenarios.PERCENTILES),
            "query": scenarios.RELIABILITY_QUERY,
        },
        "definitions": {
            "gateway": "wrk -t1 -c1 against /graphql (POST, Lua script), latency from wrk's histogram",
            "floor": "build_report's statements before spike attribution (series of the range, series of the "
            "history, breakdown) at once, each on its own asyncpg connection, rows to dicts and orjson (the "
            "packed sketches as hex)",
            "floor_with_attribution": "the floor, then (when the report finds spikes) the statements that explain "
            "them, as build_report ran them once on this data set (logged with their arguments), at once, each on "
            "its own connection: the floor of all of the gateway's SQL, which the ratio target is taken against",
            "where_the_time_goes": "build_report in the benchmark process on a gateway-configured connection; each "
            "statement's start and end from asyncpg's query logger (client side: send, execute, receive, decode): "
            "until the floor's statements have ended, the Python work until the attribution statements start, "
            "their span (they overlap the report's last Python steps), what follows; server_side = EXPLAIN "
            "(ANALYZE, BUFFERS) of each floor statement, median of 5",
            "cpu": "utime+stime from /proc over the window; foreign = other + postgres_other_db",
        },
        "single": {},
        "where_the_time_goes": {},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.reliability_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=None, help="events to load (default 10,000,000; quick 200,000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 200k events, 10 s windows")
    parser.add_argument("--keep-db", action="store_true", help="keep the bench database for the next run")
    parser.add_argument("--fresh", action="store_true", help="rebuild the bench database even if complete")
    parser.add_argument("--incident", action="store_true",
                        help="on a copy with two injected incidents (bench/api/incident.py)")  # fmt: skip
    parser.add_argument("--only", default="h,m,d,p", help="scenarios to run (default all: h,m,d,p)")
    parser.add_argument("--seconds", type=float, default=None, help="measurement window (default 30; quick 10)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up before each window (default 5; quick 3)")
    parser.add_argument("--decompose-runs", type=int, default=30, help="build_report runs of scenario d")
    parser.add_argument("--profile-seconds", type=float, default=None, help="py-spy recording (default 20; quick 5)")
    parser.add_argument(
        "--profile-shape",
        choices=("h", "o"),
        default="h",
        help="the question profiled by p: h (default) or o, the last hour (what every answer costs)",
    )
    parser.add_argument("--load-writers", type=int, default=2, help="concurrent EventWriter batches while loading")
    parser.add_argument("--retries", type=int, default=2, help="reruns of a window that other work disturbed")
    parser.add_argument("--quiet-threshold", type=float, default=0.3, help="foreign cores tolerated in a window")
    parser.add_argument("--quiet-wait", type=float, default=120, help="max seconds to wait for an idle machine")
    parser.add_argument("--no-wait", action="store_true", help="start even while the ingestion benchmark runs")
    parser.add_argument("--out", default=None, help="results file (default bench/results/reliability.json)")
    args = parser.parse_args(argv)
    args.events = args.events or (200_000 if args.quick else 10_000_000)
    args.seconds = args.seconds or (10 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    args.profile_seconds = args.profile_seconds or (5 if args.quick else 20)
    return args


def main(argv: list[str] | None = None) -> int:
    return run_cancellable(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
