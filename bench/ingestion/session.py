"""One run of the ingestion benchmark: its results file (new, or appended to), each scenario rerun while other
work disturbs it, and the scenarios in order (batched and its profile, single, latency)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import functools
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.harness.output import say
from bench.harness.runinfo import git_commit, machine, postgres_version, py_spy_version, shown, tool_version
from bench.harness.services import ADMIN_URL
from bench.ingestion.latency import SteadyRun, run_latency
from bench.ingestion.plan import Plan
from bench.ingestion.profile import SECTIONS, ProfileSpec, summarize_profile
from bench.ingestion.summary import TARGETS, disturbances, foreign_cores, summarize
from bench.ingestion.throughput import Drain, run_throughput
from bench.ingestion.traffic import make_bodies
from bench.postgres import connection_facts
from bench.profiles import profile_text, py_spy

DEFINITIONS = {
    "commit_time": "ingestion_batches.started_at + duration_ms (the last statement before COMMIT)",
    "events_per_s": "accepted events / (last commit time - started_at of the first batch)",
    "latency": "commit time of the event's batch (usage_events.batch_id) - publish wall-clock time "
    "carried in the event id",
    "cpu": "utime+stime from /proc over the measurement window; cores_used = CPU s / wall s",
}
KINDS = ("batched", "single", "latency", "profile")


def command() -> str:
    return "python -m bench.ingest_bench " + " ".join(sys.argv[1:])


def environment() -> dict[str, Any]:
    facts = machine()
    return {
        "cpus": facts["cpus"],
        "memory_gb": facts["memory_gb"],
        "python": facts["python"],
        "postgres": postgres_version(),
        "rabbitmq": tool_version(["rabbitmqctl", "-q", "version"], 60),
        "services": "PostgreSQL, RabbitMQ, Redis and the gateway on the same machine",
        "py_spy": py_spy_version(),
    }


def new_results(code: dict[str, Any], defaults: dict[str, int]) -> dict[str, Any]:
    """The results file before any run."""
    return {
        "benchmark": "ingest",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "code": code,
        "command": command(),
        "environment": environment(),
        "postgres_connection": connection_facts(ADMIN_URL),
        "targets": TARGETS,
        "setting_defaults": defaults,
        "definitions": DEFINITIONS,
        "runs": [],
    }


def appended_results(previous: dict[str, Any], scenarios: set[str], replace: bool) -> dict[str, Any]:
    """``--append``: the earlier file, its runs of the rerun scenarios superseded with ``--replace``."""
    if replace:
        kinds = {k for k in KINDS if k in scenarios}
        for run in previous["runs"]:
            if run.get("kind") in kinds:
                run["kind"] += "_superseded"
                run["superseded"] = "rerun"
    previous.setdefault("appended", []).append(
        {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "command": command()}
    )
    return previous


@dataclasses.dataclass
class Session:
    args: argparse.Namespace
    plan: Plan
    defaults: dict[str, int]
    commit: str
    out: Path

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.plan.results, indent=1, default=str) + "\n")

    def record(self, kind: str, result: dict[str, Any]) -> None:
        result["kind"] = kind
        result["code_commit"] = self.commit
        result["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.plan.results["runs"].append(result)
        self.plan.results["summary"] = summarize(self.plan.results["runs"], self.defaults)
        self.write()

    async def guarded(self, kind: str, make: Callable[[], Awaitable[dict[str, Any]]], label: str) -> None:
        """Run a scenario; rerun it (up to --retries times) while other work disturbs it, and keep the
        least disturbed attempt (the others are kept too, as ``<kind>_superseded``)."""
        attempts: list[dict[str, Any]] = []
        for attempt in range(self.args.retries + 1):
            result = await _attempt(make, label)
            result["attempt"] = attempt + 1
            result["disturbed_by"] = disturbances(result, self.args.quiet_threshold)
            attempts.append(result)
            if not result["disturbed_by"]:
                break
            if attempt < self.args.retries:
                say(f"!! {label} was disturbed ({'; '.join(result['disturbed_by'])}): running it again")
                await asyncio.sleep(10)
        kept = min(attempts, key=lambda r: ("error" in r, len(r["disturbed_by"]), foreign_cores(r)))
        for result in attempts:
            if result is not kept:
                result["superseded"] = True
                self.record(kind + "_superseded", result)
        self.record(kind, kept)

    def profile_summary(self, key: str, spec: ProfileSpec, files: list[Path], extra: dict[str, Any]) -> None:
        """The profile's summary into the results (``key``) and ``<file>_top.txt`` beside the profile."""
        if not spec.path.exists():
            return
        summary = summarize_profile(spec.path, spec.seconds, 100)
        self.plan.results[key] = summary | {"files": [shown(f) for f in files], "duration_s": spec.seconds} | extra
        self.write()
        top = spec.path.with_name(spec.path.stem + "_top.txt")
        top.write_text(profile_text(summary, SECTIONS))


async def _attempt(make: Callable[[], Awaitable[dict[str, Any]]], label: str) -> dict[str, Any]:
    try:
        return await make()
    except Exception as exc:  # noqa: BLE001 - keep going: one failed scenario should not lose the others
        say(f"!! {label} failed: {type(exc).__name__}: {exc}")
        return {"scenario": label, "error": f"{type(exc).__name__}: {exc}", "settings": {}}


async def batched(session: Session, scenarios: set[str]) -> None:
    """The batched sweep, then (full runs) the profiles of a drain at the defaults."""
    plan = session.plan
    say(f"generating {plan.batched_events:,} events as 100-event messages")
    bodies = make_bodies(plan.batched_events, 100, plan.seed)
    if "batched" in scenarios:
        for i, config in enumerate(plan.configs_batched):
            drain = Drain(f"batched_{i}", bodies, 100, plan.batched_events, config)
            await session.guarded("batched", functools.partial(run_throughput, plan, drain), drain.name)
    if "profile" in scenarios and plan.profile and py_spy():
        seconds = session.args.profile_seconds
        specs = [ProfileSpec(fmt, plan.folder / name, seconds)
                 for fmt, name in (("raw", "ingest_profile.txt"), ("flamegraph", "ingest_profile.svg"))]  # fmt: skip
        for spec in specs:
            drain = Drain(f"profile_{spec.fmt}", bodies, 100, plan.batched_events, session.defaults, spec)
            await session.guarded("profile", functools.partial(run_throughput, plan, drain), drain.name)
        session.profile_summary("profile", specs[0], [s.path for s in specs], {"rate_hz": 100})


async def single(session: Session, scenarios: set[str]) -> None:
    """The single-event sweep, then (only when asked) where the time goes with single-event messages."""
    plan = session.plan
    say(f"generating {plan.single_events:,} events as single-event messages")
    bodies = make_bodies(plan.single_events, 1, plan.seed)
    if "single" in scenarios:
        for i, config in enumerate(plan.configs_single):
            drain = Drain(f"single_{i}", bodies, 1, plan.single_events, config)
            await session.guarded("single", functools.partial(run_throughput, plan, drain), drain.name)
    if "profile_single" in scenarios and py_spy():
        spec = ProfileSpec("raw", plan.folder / "ingest_profile_single.txt", session.args.profile_seconds)
        drain = Drain("profile_single_raw", bodies, 1, plan.single_events, session.defaults, spec)
        await session.guarded("profile_single", functools.partial(run_throughput, plan, drain), drain.name)
        session.profile_summary("profile_single", spec, [spec.path], {})


async def latency(session: Session) -> None:
    for i, (rate, batch, config) in enumerate(session.plan.latency_runs):
        settings = session.defaults | {k: v for k, v in (config or {}).items() if v is not None}
        run = SteadyRun(f"latency_{i}_{rate}eps_batch{batch}", rate, batch, settings)
        await session.guarded("latency", functools.partial(run_latency, session.plan, run), run.name)
