"""A reproducible generator of realistic usage-event traffic.

The same seed and settings give the same events, in the same order:

- orgs with Zipf-distributed volume, each using a few models and projects;
- log-normal token counts and latencies;
- a share of duplicates (exact re-sends of earlier events, as producer retries
  and redeliveries are), late events (hours behind), and error bursts (a model
  returning 5xx for a while).

``ground_truth`` computes, independently of the gateway, what it should store.

    python -m bench.loadgen jsonl --events 100000 --seed 7 > events.jsonl
    python -m bench.loadgen publish --events 1000000 --batch 100 --rate 0
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

MODELS = (
    "gpt-4o-mini", "gpt-4o", "o3-mini", "claude-3-5-haiku", "claude-3-7-sonnet", "llama-3.1-70b",
    "llama-3.1-8b", "mistral-large", "mistral-small", "gemini-1.5-flash", "gemini-1.5-pro", "qwen-2.5-72b",
    "deepseek-v3", "command-r", "command-r-plus", "phi-4", "gpt-4.1", "gpt-4.1-mini", "o4-mini", "embed-v3",
)  # fmt: skip
REGIONS = ("eu-west-1", "us-east-1", "ap-south-1")
CLIENT_ERRORS = ((400, "invalid_request"), (401, "unauthorized"), (429, "rate_limited"))
SERVER_ERRORS = ((500, "internal_error"), (502, "bad_gateway"), (503, "overloaded"), (504, "timeout"))


@dataclass(frozen=True)
class Traffic:
    """What to generate. ``start`` defaults to ``span`` before now."""

    seed: int = 7
    events: int = 10_000
    orgs: int = 20
    models: int = 6
    span: dt.timedelta = dt.timedelta(hours=1)
    start: dt.datetime | None = None
    zipf_s: float = 1.1
    duplicate_share: float = 0.0
    late_share: float = 0.0
    late_hours: float = 6.0
    error_bursts: int = 2
    burst_minutes: float = 5.0
    org_prefix: str = "org"
    source: str = "//api/loadgen"

    def first_time(self) -> dt.datetime:
        return self.start or (dt.datetime.now(dt.UTC) - self.span)


@dataclass(frozen=True)
class Org:
    org_id: str
    models: tuple[str, ...]
    projects: tuple[str, ...]


@dataclass
class Totals:
    requests: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    errors: int = 0
    by_model: dict[str, int] = field(default_factory=dict)


def generate(traffic: Traffic) -> Iterator[dict[str, object]]:
    """``traffic.events`` distinct events, plus the duplicates, in send order."""
    rng = random.Random(traffic.seed)
    orgs = _orgs(traffic, rng)
    cumulative = list(itertools.accumulate(1 / (rank**traffic.zipf_s) for rank in range(1, len(orgs) + 1)))
    bursts = _bursts(traffic, rng)
    sent: list[dict[str, object]] = []
    start, step = traffic.first_time(), traffic.span / max(traffic.events, 1)
    for index in range(traffic.events):
        org = orgs[bisect.bisect(cumulative, rng.random() * cumulative[-1])]
        when = start + step * index
        if rng.random() < traffic.late_share:
            when -= dt.timedelta(hours=rng.uniform(1, traffic.late_hours))
        event = _event(traffic, rng, index, org, when, bursts)
        yield event
        sent.append(event)
        if rng.random() < traffic.duplicate_share:
            yield sent[rng.randrange(len(sent))]


def _orgs(traffic: Traffic, rng: random.Random) -> list[Org]:
    models = MODELS[: traffic.models]
    return [
        Org(
            org_id=f"{traffic.org_prefix}_{n:04d}",
            models=tuple(rng.sample(models, k=min(len(models), rng.randint(1, 4)))),
            projects=tuple(f"proj_{n:04d}_{p}" for p in range(rng.randint(1, 5))),
        )
        for n in range(traffic.orgs)
    ]


def _bursts(traffic: Traffic, rng: random.Random) -> list[tuple[dt.datetime, dt.datetime, str]]:
    start, length = traffic.first_time(), dt.timedelta(minutes=traffic.burst_minutes)
    models = MODELS[: traffic.models]
    return [
        (at, at + length, rng.choice(models))
        for at in (start + traffic.span * rng.random() for _ in range(traffic.error_bursts))
    ]


def _event(
    traffic: Traffic, rng: random.Random, index: int, org: Org, when: dt.datetime,
    bursts: list[tuple[dt.datetime, dt.datetime, str]],
) -> dict[str, object]:  # fmt: skip
    model = rng.choice(org.models)
    project = rng.choice(org.projects)
    input_tokens = min(int(rng.lognormvariate(6.5, 1.1)), 100_000_000)
    cached = int(input_tokens * rng.choice((0, 0, 0.25, 0.5, 0.9)))
    output_tokens = min(int(rng.lognormvariate(5.0, 1.0)), 100_000_000)
    latency = round(rng.lognormvariate(math.log(300 + output_tokens * 8), 0.5), 3)
    status, error_type = _status(rng, model, when, bursts)
    return {
        "specversion": "1.0",
        "id": f"{traffic.seed:x}-{index:012d}",
        "source": traffic.source,
        "type": "ai.usage.request.v1",
        "time": when.isoformat().replace("+00:00", "Z"),
        "data": {
            "org_id": org.org_id,
            "project_id": project,
            "api_key_id": f"key_{project[5:]}_{rng.randint(0, 1)}",
            "model": model,
            "input_tokens": input_tokens,
            "cached_input_tokens": cached,
            "output_tokens": output_tokens,
            "latency_ms": latency,
            "ttft_ms": round(latency * rng.uniform(0.05, 0.3), 3),
            "status_code": status,
            "error_type": error_type,
            "region": rng.choice(REGIONS),
        },
    }


def _status(
    rng: random.Random, model: str, when: dt.datetime, bursts: list[tuple[dt.datetime, dt.datetime, str]]
) -> tuple[int, str | None]:
    in_burst = any(start <= when < end and model == burst_model for start, end, burst_model in bursts)
    roll = rng.random()
    if roll < (0.25 if in_burst else 0.005):
        return rng.choice(SERVER_ERRORS)
    if roll > 0.98:
        return rng.choice(CLIENT_ERRORS)
    return 200, None


def ground_truth(events: Iterator[dict[str, object]] | list[dict[str, object]]) -> dict[str, Totals]:
    """Per-org totals of the distinct events, first (source, id) wins."""
    seen: set[tuple[object, object]] = set()
    totals: dict[str, Totals] = {}
    for event in events:
        key = (event["source"], event["id"])
        if key in seen:
            continue
        seen.add(key)
        data = event["data"]
        assert isinstance(data, dict)
        org = totals.setdefault(data["org_id"], Totals())
        org.requests += 1
        org.input_tokens += data["input_tokens"]
        org.cached_input_tokens += data["cached_input_tokens"]
        org.output_tokens += data["output_tokens"]
        org.errors += data["status_code"] >= 500
        org.by_model[data["model"]] = org.by_model.get(data["model"], 0) + 1
    return totals
