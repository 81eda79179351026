"""What a run measures: event counts, the settings to try, the latency runs, and where it writes."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# 5,000 events/s as 1, 10 and 100 events a message; single-event messages at lower rates (on 2 cores the
# publisher, the broker and the gateway together saturate the machine well below 5,000 messages/s);
# and 10-event messages with the larger prefetch that single-event throughput prefers.
DEFAULT_LATENCY_RUNS = "5000x1,5000x10,5000x100,2500x1,1000x1,5000x10@/8000/"
CONFIG_KEYS = ("batch_events", "prefetch", "max_age_ms")
LatencyRun = tuple[int, int, dict[str, int | None] | None]


@dataclass
class Plan:
    batched_events: int
    single_events: int
    latency_seconds: int
    latency_runs: list[LatencyRun]
    configs_batched: list[dict[str, int]]
    configs_single: list[dict[str, int]]
    profile: bool
    quiet_wait_s: float
    quiet_threshold: float
    seed: int = 7
    results: dict[str, Any] = field(default_factory=dict)
    code: Path = Path()  # the measured code's copy
    folder: Path = Path()  # where logs and profiles go: beside the results file


def make_plan(args: argparse.Namespace, defaults: dict[str, int], code: Path, folder: Path) -> Plan:
    """The plan of ``--quick`` (defaults only, small counts) or of the full run (sweeps), with the flags' overrides."""
    quick = args.quick
    plan = Plan(
        batched_events=args.events or (50_000 if quick else 1_000_000),
        single_events=args.single_events or (20_000 if quick else 200_000),
        latency_seconds=args.latency_seconds or (10 if quick else 60),
        latency_runs=parse_latency_runs(args.latency_runs or ("5000x10" if quick else DEFAULT_LATENCY_RUNS)),
        configs_batched=[defaults] if quick else default_sweep(defaults, single=False),
        configs_single=[defaults] if quick else default_sweep(defaults, single=True),
        profile=not quick and not args.no_profile, quiet_wait_s=args.quiet_wait, quiet_threshold=args.quiet_threshold,
        code=code, folder=folder,
    )  # fmt: skip
    plan.configs_batched = parse_configs(args.configs_batched, defaults) or plan.configs_batched
    plan.configs_single = parse_configs(args.configs_single, defaults) or plan.configs_single
    return plan


def parse_latency_runs(text: str) -> list[LatencyRun]:
    """``RATExBATCH[@batch_events/prefetch/max_age_ms]``; an empty value keeps the default."""
    runs: list[LatencyRun] = []
    for part in text.split(","):
        spec, _, config = part.strip().partition("@")
        rate, _, batch = spec.partition("x")
        values = [int(v) if v else None for v in config.split("/")] if config else None
        runs.append((int(rate), int(batch or 1), dict(zip(CONFIG_KEYS, values, strict=True)) if values else None))
    return runs


def parse_configs(text: str | None, defaults: dict[str, int]) -> list[dict[str, int]] | None:
    """``"5000/2000/100,1000/2000/100"`` (batch_events/prefetch/max_age_ms) as configs."""
    if not text:
        return None
    configs = []
    for part in text.split(","):
        values = [int(v) if v else None for v in part.strip().split("/")]
        configs.append({k: (v if v is not None else defaults[k]) for k, v in zip(CONFIG_KEYS, values, strict=True)})
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
