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
import datetime as dt
import gc
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.api.dataset import Dataset, prepare_dataset
from bench.api.profile import scenario_profile
from bench.api.queries import USAGE_QUERY, shapes, token_for
from bench.api.results import new_results
from bench.api.run import Run
from bench.api.server import gateway_env, serve_app, start_api
from bench.api.trivial import scenario_trivial
from bench.api.usage import scenario_concurrent, scenario_single
from bench.api.visible import scenario_publish_to_visible
from bench.harness.cpu import wait_quiet
from bench.harness.entry import run_cancellable
from bench.harness.output import say
from bench.harness.runinfo import ROOT
from bench.harness.servers import log_problems, stop_server
from bench.harness.services import REDIS_URL, admin
from db.engine import create_engine
from db.rollup import run_cycle

__all__ = ["USAGE_QUERY", "main"]  # tests send the benchmark's usage query
RESULTS = ROOT / "bench" / "results"


def other_benchmarks() -> list[str]:
    # "[.]" so that a shell whose command line names the module (a wait loop, make) does not match itself
    found = subprocess.run(["pgrep", "-af", r"python.* -m bench[.]ingest_bench"], capture_output=True, text=True,
                           check=False)  # fmt: skip
    return [line for line in found.stdout.splitlines() if line.strip()]


async def wait_for_other_benchmarks(no_wait: bool) -> None:
    """Wait (polling every 30 s) until the ingestion benchmark is not running."""
    if no_wait:
        return
    while running := other_benchmarks():
        say(f"waiting for another benchmark to finish: {running[0][:100]}")
        await asyncio.sleep(30)


async def materialize(dataset: Dataset) -> str:
    """A rollup cycle now: the watermark to the current hour, as in service."""
    engine = create_engine(dataset.url, pool_size=1)
    try:
        cycle = await run_cycle(engine, dt.datetime.now(dt.UTC))
    finally:
        await engine.dispose()
    return str(cycle.rolled_until)


async def main_async(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        say("error: wrk is not installed (apt-get install -y wrk)")
        return 2
    out = Path(args.out) if args.out else RESULTS / ("graphql_quick.json" if args.quick else "graphql.json")
    dataset = await prepare_dataset(args.events, fresh=args.fresh, writers=args.load_writers,
                                    before_load=lambda: wait_for_other_benchmarks(args.no_wait))  # fmt: skip
    await wait_for_other_benchmarks(args.no_wait)
    secret = secrets.token_urlsafe(48)
    redis_prefix = f"bench:graphql:{secrets.token_hex(3)}:"
    results = new_results(args, dataset, redis_prefix)
    results["dataset"]["materialized_through"] = await materialize(dataset)
    work = Path(tempfile.mkdtemp(prefix="graphql_bench_"))
    env = gateway_env(
        ANALYTICS_DATABASE_URL=dataset.url, ANALYTICS_JWT_SECRET=secret, ANALYTICS_REDIS_URL=REDIS_URL,
        ANALYTICS_REDIS_PREFIX=redis_prefix, ANALYTICS_LOG_LEVEL="WARNING",
    )  # fmt: skip
    run = Run(args, dataset, await start_api(env, work), secret, work, results, out, env)
    # The floor's client is this process: freeze what setup allocated, so that its collections stay as short
    # as a lean client's (the gateway's own collections are measured, see api_gc).
    gc.collect()
    gc.freeze()
    try:
        results["quiet"] = await wait_quiet(args.quiet_wait, args.quiet_threshold)
        await run_scenarios(run, set(args.only.split(",")))
    finally:
        await finish(run)
    say(f"results: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    for row in results["summary"]["targets"]:
        say(f"   {'met    ' if row['met'] else 'NOT met'}  {row['what']}: {row['value']} {row['unit']} "
            f"(target {'<=' if row['better'] == 'lower' else '>='} {row['target']})")  # fmt: skip
    return 0


async def run_scenarios(run: Run, only: set[str]) -> None:
    """The scenarios in ``only``, in the order that keeps the profile and the publishing last."""
    token = token_for(run.secret, run.dataset.largest_org)
    all_shapes = shapes(dt.datetime.now(dt.UTC))
    for key, shape in (("a", all_shapes[0]), ("b", all_shapes[1]), ("b", all_shapes[2])):
        if key in only:
            run.results["usage_single"][shape.key] = await scenario_single(run, shape, token)
            run.save()
    if "c" in only:
        run.results["usage_concurrent"] = await scenario_concurrent(run, all_shapes[0], token, run.args.clients)
        run.save()
    if "d" in only:
        await scenario_trivial(run, token, 32)
    if "f" in only:
        await scenario_profile(run, all_shapes[0], token, run.args.clients)
    if "e" in only:
        await scenario_publish_to_visible(run)


async def finish(run: Run) -> None:
    """Stop the API, record how it ended, save, and drop the database unless ``--keep-db``."""
    run.results["api_gateway_exit_code"] = await stop_server(run.api)
    run.results["api_gateway_log_problems"] = log_problems(run.api.log_path)
    run.results["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    run.save()
    shutil.rmtree(run.work, ignore_errors=True)
    if not run.args.keep_db:
        say(f"dropping {run.dataset.name} (--keep-db keeps it for the next run)")
        await admin(f'DROP DATABASE IF EXISTS "{run.dataset.name}" WITH (FORCE)')


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
    return run_cancellable(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
