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

Results: ``bench/results/ingest.json`` (and the gateway logs of each scenario under ``bench/results/logs/``; with
``--out``, the logs and profiles go beside the results file).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.harness.entry import run_cancellable
from bench.harness.output import say
from bench.harness.runinfo import ROOT
from bench.ingestion.code import setting_defaults, snapshot_code
from bench.ingestion.plan import DEFAULT_LATENCY_RUNS, make_plan
from bench.ingestion.session import Session, appended_results, batched, latency, new_results, single

RESULTS = ROOT / "bench" / "results"


async def main_async(args: argparse.Namespace) -> int:
    code_dir, code = snapshot_code(args.code)
    say(f"measuring {code['measured']} ({code['commit'][:12]}), copied to {code_dir}")
    try:
        return await run_all(args, code_dir, code)
    finally:
        shutil.rmtree(code_dir, ignore_errors=True)


async def run_all(args: argparse.Namespace, code_dir: Path, code: dict[str, Any]) -> int:
    """The scenarios ``--scenarios`` names, into a new results file or (``--append``) the previous one."""
    defaults = setting_defaults(code_dir)
    scenarios = set(args.scenarios.split(","))
    out = Path(args.out) if args.out else RESULTS / ("ingest_quick.json" if args.quick else "ingest.json")
    plan = make_plan(args, defaults, code_dir, out.parent)
    previous = json.loads(out.read_text()) if args.append and out.exists() else None
    if previous is not None and previous.get("code", {}).get("commit") != code["commit"]:
        say(f"!! --append: {out} measured {previous.get('code', {}).get('commit')}, this is {code['commit']}: refused")
        return 2
    plan.results = appended_results(previous, scenarios, args.replace) if previous else new_results(code, defaults)
    session = Session(args, plan, defaults, code["commit"], out)
    if "batched" in scenarios or "profile" in scenarios:
        await batched(session, scenarios)
    if "single" in scenarios or "profile_single" in scenarios:
        await single(session, scenarios)
    if "latency" in scenarios:
        await latency(session)
    plan.results["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    session.write()
    say(f"results: {out}")
    print(json.dumps(plan.results.get("summary", {}), indent=1), file=sys.stderr)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_cancellable(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
