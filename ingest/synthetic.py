"""A reproducible generator of realistic usage-event traffic.

The same seed and settings give the same events, in the same order:

- orgs with Zipf-distributed volume, each using a few models and projects;
- log-normal token counts and latencies;
- a share of duplicates (exact re-sends of earlier events, as producer retries
  and redeliveries are), late events (hours behind), and error bursts (a model
  returning 5xx for a while).

``ground_truth`` computes, independently of the gateway, what it should store.

    python -m ingest.synthetic jsonl --events 100000 --seed 7 > events.jsonl
    python -m ingest.synthetic publish --events 1000000 --batch 100 --rate 0
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime as dt
import itertools
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import msgspec

from ingest.publisher import EventPublisher
from ingest.topology import Topology

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
    rng = random.Random(traffic.seed)  # noqa: S311 - synthetic events, not secrets
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


# --- command line -------------------------------------------------------------------------------------------------
# ``python -m ingest.synthetic jsonl|publish ...``. Progress goes to stderr; JSON Lines go to stdout or --out.

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PROGRESS_EVERY_S = 2.0


class Progress:
    """A throttled one-line-per-update progress report on stderr (no terminal tricks, so it logs well)."""

    def __init__(self, what: str, total: int | None = None, *, enabled: bool = True, every_s: float = PROGRESS_EVERY_S):

        self._clock = time.monotonic
        self._out = sys.stderr
        self.what, self.total, self.enabled, self.every_s = what, total, enabled, every_s
        self.started = self._last = self._clock()
        self.done = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.enabled and self._clock() - self._last >= self.every_s:
            self.report()

    def report(self, final: bool = False) -> None:
        now = self._clock()
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        share = f" ({100 * self.done / self.total:5.1f}%)" if self.total else ""
        of = f"/{self.total:,}" if self.total else ""
        print(
            f"{'done: ' if final else ''}{self.what} {self.done:,}{of}{share}  {self.done / elapsed:,.0f}/s  "
            f"{elapsed:,.1f} s",
            file=self._out,
            flush=True,
        )

    def finish(self) -> None:
        if self.enabled:
            self.report(final=True)


def traffic_from_args(args: object) -> Traffic:
    """The ``Traffic`` that the shared generation options describe."""
    return Traffic(
        seed=args.seed,  # type: ignore[attr-defined]
        events=args.events,  # type: ignore[attr-defined]
        orgs=args.orgs,  # type: ignore[attr-defined]
        models=args.models,  # type: ignore[attr-defined]
        duplicate_share=args.duplicates,  # type: ignore[attr-defined]
        late_share=args.late,  # type: ignore[attr-defined]
        span=dt.timedelta(hours=args.span_hours),  # type: ignore[attr-defined]
        source=args.source,  # type: ignore[attr-defined]
        start=dt.datetime.fromisoformat(args.start.replace("Z", "+00:00")) if args.start else None,  # type: ignore[attr-defined]
    )


def stamped(events: list[dict[str, object]], sent_at_ns: int) -> list[dict[str, object]]:
    """Copies of ``events`` carrying the publish wall-clock time, for publish-to-commit latency.

    The time goes into the event id (``<id>.t<unix µs>``, so it is stored with the row) and into
    ``data.bench_sent_at`` (an extra field: the schema allows it, the gateway does not store it).
    """
    micros = sent_at_ns // 1000
    iso = dt.datetime.fromtimestamp(micros / 1e6, dt.UTC).isoformat().replace("+00:00", "Z")
    return [
        {**event, "id": f"{event['id']}.t{micros}", "data": {**event["data"], "bench_sent_at": iso}}  # type: ignore[dict-item]
        for event in events
    ]


def sent_at_from_id(event_id: str) -> float | None:
    """The publish time (unix seconds) that :func:`stamped` put into an event id, if any."""
    _, marker, micros = event_id.rpartition(".t")
    return int(micros) / 1e6 if marker and micros.isdigit() else None


async def publish_events(
    events: Iterator[dict[str, object]] | list[dict[str, object]],
    *,
    amqp_url: str = DEFAULT_AMQP_URL,
    prefix: str = "",
    batch: int = 100,
    rate: float = 0.0,
    in_flight: int = 1000,
    stamp: bool = False,
    delivery_limit: int = 20,
    progress: Progress | None = None,
) -> int:
    """Publish ``events`` with :class:`ingest.publisher.EventPublisher`, ``batch`` per message
    (1: single-event messages), at a steady ``rate`` events/s (0: as fast as confirms allow).

    Returns how many events were confirmed by the broker.
    """

    published = 0
    connection = await aio_pika.connect_robust(amqp_url)
    async with (
        connection,
        EventPublisher(
            connection, Topology.named(prefix), max_in_flight=in_flight, delivery_limit=delivery_limit
        ) as publisher,
    ):
        started = time.monotonic()
        source = iter(events)
        while chunk := list(itertools.islice(source, batch)):
            if rate > 0:
                # Steady pacing: the message goes out when the events before it are due; only sleep
                # when ahead by more than 2 ms, so that small sleeps do not add up to a slower rate.
                ahead = started + published / rate - time.monotonic()
                if ahead > 0.002:
                    await asyncio.sleep(ahead)
            if stamp:
                chunk = stamped(chunk, time.time_ns())
            await publisher.publish(chunk, as_batch=batch > 1)
            published += len(chunk)
            if progress is not None:
                progress.advance(len(chunk))
    if progress is not None:
        progress.finish()
    return published


def _parser() -> object:

    parser = argparse.ArgumentParser(
        prog="python -m ingest.synthetic", description="Reproducible usage-event traffic: write JSON Lines or publish."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def generation(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--events", type=int, required=True, help="distinct events to generate")
        sub.add_argument("--seed", type=int, default=7, help="same seed, same events (default 7)")
        sub.add_argument("--orgs", type=int, default=20, help="number of orgs (Zipf-distributed volume; default 20)")
        sub.add_argument("--models", type=int, default=6, help=f"models in use, 1-{len(MODELS)} (default 6)")
        sub.add_argument("--duplicates", type=float, default=0.0, help="share of extra exact re-sends (e.g. 0.2)")
        sub.add_argument("--late", type=float, default=0.0, help="share of events 1-6 hours late (e.g. 0.05)")
        sub.add_argument("--span-hours", type=float, default=1.0, help="event times span the last H hours")
        sub.add_argument("--source", default="//api/loadgen", help="CloudEvents source of every event")
        sub.add_argument("--start", default=None, help="time of the first event, ISO 8601 (default: span before now)")
        sub.add_argument("--quiet", action="store_true", help="no progress on stderr")

    jsonl = commands.add_parser("jsonl", help="write events as JSON Lines")
    generation(jsonl)
    jsonl.add_argument("--out", help="file to write (default: stdout)")

    publish = commands.add_parser("publish", help="publish events to the AMQP exchange (publisher confirms)")
    generation(publish)
    publish.add_argument("--batch", type=int, default=100, help="events per message; 1 = single-event messages")
    publish.add_argument("--rate", type=float, default=0.0, help="steady events/s; 0 = as fast as possible")
    publish.add_argument("--amqp-url", default=None, help="default: ANALYTICS_AMQP_URL or the local broker")
    publish.add_argument("--prefix", default=None, help="exchange/queue name prefix (default: ANALYTICS_AMQP_PREFIX)")
    publish.add_argument("--in-flight", type=int, default=1000, help="messages awaiting confirms at once")
    publish.add_argument(
        "--stamp", action="store_true", help="put the publish time into each event id and data.bench_sent_at"
    )
    return parser


def _write_jsonl(args: object) -> int:

    traffic = traffic_from_args(args)
    expected = int(traffic.events * (1 + traffic.duplicate_share))
    progress = Progress("events written", expected, enabled=not args.quiet and traffic.events >= 10_000)  # type: ignore[attr-defined]
    encoder = msgspec.json.Encoder()
    out = Path(args.out).open("wb") if args.out else sys.stdout.buffer  # type: ignore[attr-defined]  # noqa: SIM115
    buffer = bytearray()
    try:
        for event in generate(traffic):
            encoder.encode_into(event, buffer, -1)
            buffer.extend(b"\n")
            if len(buffer) >= 1 << 20:
                out.write(buffer)
                buffer.clear()
            progress.advance()
        out.write(buffer)
        out.flush()
    except BrokenPipeError:  # e.g. piped into head
        return 0
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    progress.finish()
    return 0


def _publish(args: object) -> int:

    if args.batch < 1 or args.batch > 10_000:  # type: ignore[attr-defined]
        print("error: --batch must be 1-10000 (the gateway's batch limit)", file=sys.stderr)
        return 2
    traffic = traffic_from_args(args)
    expected = int(traffic.events * (1 + traffic.duplicate_share))
    progress = Progress("events published", expected, enabled=not args.quiet)  # type: ignore[attr-defined]
    published = asyncio.run(
        publish_events(
            generate(traffic),
            amqp_url=args.amqp_url or os.environ.get("ANALYTICS_AMQP_URL", DEFAULT_AMQP_URL),  # type: ignore[attr-defined]
            prefix=args.prefix if args.prefix is not None else os.environ.get("ANALYTICS_AMQP_PREFIX", ""),  # type: ignore[attr-defined]
            batch=args.batch,  # type: ignore[attr-defined]
            rate=args.rate,  # type: ignore[attr-defined]
            in_flight=args.in_flight,  # type: ignore[attr-defined]
            stamp=args.stamp,  # type: ignore[attr-defined]
            progress=progress,
        )
    )
    print(f"published {published:,} events (confirmed)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # type: ignore[attr-defined]
    return _write_jsonl(args) if args.command == "jsonl" else _publish(args)


if __name__ == "__main__":
    raise SystemExit(main())
