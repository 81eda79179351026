"""``reliability`` end to end: events through the real AMQP ingester, rollups, the GraphQL answer.

Three orgs of the same run over three days of hourly traffic on three models (log-normal latencies with a few
60 s timeouts, a 1 % background of 500s): ``steady`` has nothing else; ``incident`` has a two-hour burst of
503 ``overloaded`` errors on one model; ``slow`` has two hours in which one model answers four times slower.
Every count must equal the ground truth, every percentile be within 1 % of the exact one computed here from the
events, the burst and the slowdown be found in their hours and explained by their model, and the steady org show
no spike.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import json
import math
import os
import random
import signal
import uuid
import warnings
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest

import reliability.report
import reliability.spikes
import resolvers.reliability
from db.engine import create_engine
from db.usage import UsageQuery
from gateway.resources import Resources
from ingest.topology import Topology
from kernel.hours import floor_hour
from kernel.offload import Offload
from kernel.settings import Settings
from reliability.report import SPLIT_BUCKETS, build_report
from reliability.sketch import exact_percentile
from tests.conftest import TokenFactory
from tests.helpers import graphql
from tests.integration.ingest_support import drained, eventually, publish_mixed, publisher, stored

HOUR = dt.timedelta(hours=1)
HOURS = 72
PER_HOUR = 180  # requests per org and hour over three models: >= 40 per model and hour, above the minimum volume
BURST_HOURS = (-12, -11)  # relative to the current hour
BURST_MODEL = "rel-model-b"
MODELS = ("rel-model-a", BURST_MODEL, "rel-model-c")
PERCENTILES = [0.5, 0.95, 0.99]


@dataclass
class Org:
    org_id: str
    events: list[dict[str, Any]] = field(default_factory=list)

    def latencies(self, start: dt.datetime, end: dt.datetime, model: str | None = None) -> list[float]:
        return [e["data"]["latency_ms"] for e in self.in_range(start, end, model)]

    def in_range(self, start: dt.datetime, end: dt.datetime, model: str | None = None) -> list[dict[str, Any]]:
        return [
            e for e in self.events
            if start <= dt.datetime.fromisoformat(e["time"]) < end and model in (None, e["data"]["model"])
        ]  # fmt: skip


@dataclass
class World:
    steady: Org
    incident: Org
    slow: Org
    now: dt.datetime
    this_hour: dt.datetime


def _traffic(
    org_id: str, source: str, this_hour: dt.datetime, rng: random.Random, burst: bool, slow: bool = False
) -> Org:
    """The same traffic whenever the test runs (hours relative to the current one, every draw made whether or not
    the event lies in the future): its spikes do not depend on the time of day (with the wall clock's hour in
    the daily wave, and draws skipped for future events, about one run in 25 found the slowdown an hour wide)."""
    org = Org(org_id)
    now = dt.datetime.now(dt.UTC)
    for h in range(-HOURS, 1):
        hour = this_hour + h * HOUR
        seasonal = 1 + 0.3 * math.sin(2 * math.pi * (h % 24) / 24)
        for _ in range(int(PER_HOUR * seasonal)):
            model = rng.choice(MODELS)
            offset = dt.timedelta(seconds=rng.uniform(0, 3599))
            timeout, body, failed, overloaded = (
                rng.random(),
                rng.lognormvariate(math.log(400), 0.6),
                rng.random(),
                rng.random(),
            )
            if hour + offset > now:
                continue
            latency = 60_000.0 if timeout < 0.003 else round(body, 3)
            if slow and h in BURST_HOURS and model == BURST_MODEL:
                latency = round(latency * 4, 3)
            status, error_type = 200, None
            if failed < 0.01:
                status, error_type = 500, "internal"
            elif burst and h in BURST_HOURS and model == BURST_MODEL and overloaded < 0.5:
                status, error_type = 503, "overloaded"
            org.events.append({
                "specversion": "1.0", "id": f"{org_id}-{len(org.events)}", "source": source,
                "type": "ai.usage.request.v1", "time": (hour + offset).isoformat(),
                "data": {"org_id": org_id, "project_id": "proj_1", "api_key_id": "key_1", "model": model,
                         "input_tokens": 10, "output_tokens": 5, "latency_ms": latency, "status_code": status,
                         "error_type": error_type},
            })  # fmt: skip
    return org


@pytest.fixture(scope="module")
async def world(settings: Settings, database_url: str, app: object) -> AsyncIterator[World]:
    tag = uuid.uuid4().hex[:8]
    source = f"//reliability-test/{tag}"
    now = dt.datetime.now(dt.UTC)
    this_hour = floor_hour(now)
    rng = random.Random(20261130)  # noqa: S311 - reproducible traffic, not secrets
    steady = _traffic(f"rel{tag}_steady", source, this_hour, rng, burst=False)
    incident = _traffic(f"rel{tag}_incident", source, this_hour, rng, burst=True)
    slow = _traffic(f"rel{tag}_slow", source, this_hour, rng, burst=False, slow=True)
    everything = steady.events + incident.events + slow.events
    async with publisher(settings.amqp_prefix) as pub:
        await publish_mixed(pub, everything)
    await drained(Topology.named(settings.amqp_prefix).queue)

    async def all_stored() -> bool:
        return len(await stored(database_url, source)) == len(everything)

    await eventually(all_stored, what="every event stored")
    yield World(steady, incident, slow, now, this_hour)


RELIABILITY = """query($org: ID!, $r: TimeRange!, $g: Granularity!, $m: Boolean!, $p: [Float!]!, $tz: String! = "UTC") {
  reliability(orgId: $org, range: $r, granularity: $g, groupByModel: $m, percentiles: $p, timeZone: $tz) {
    orgId from to granularity
    totals { requests errors clientErrors errorRate latency { percentile ms } }
    series { start end model requests errors clientErrors errorRate latency { percentile ms } }
    spikes { start end metric observed baseline severity model
             topContributors { model statusCode errorType errors share } }
    breakdown { model statusCode errorType errors share }
    freshness { status }
  }
}"""


async def _report(
    client: httpx.AsyncClient, token: str, org: str, start: dt.datetime, end: dt.datetime,
    granularity: str = "HOUR", by_model: bool = False, percentiles: list[float] = PERCENTILES,
    time_zone: str = "UTC",
) -> dict[str, Any]:  # fmt: skip
    variables = {"org": org, "r": {"from": start.isoformat(), "to": end.isoformat()}, "g": granularity,
                 "m": by_model, "p": percentiles, "tz": time_zone}  # fmt: skip
    body = (await graphql(client, RELIABILITY, token, variables)).json()
    assert "errors" not in body, body["errors"]
    report: dict[str, Any] = body["data"]["reliability"]
    return report


def _close(estimate: float, exact: float) -> bool:
    return abs(estimate - exact) <= 0.01 * exact * (1 + 1e-12)


def _check_buckets(org: Org, report: dict[str, Any], by_model: bool) -> None:
    truth: dict[tuple[str, str | None], list[dict[str, Any]]] = defaultdict(list)
    for bucket in report["series"]:
        start, end = dt.datetime.fromisoformat(bucket["start"]), dt.datetime.fromisoformat(bucket["end"])
        lo = max(start, dt.datetime.fromisoformat(report["from"]))
        events = org.in_range(lo, end, bucket["model"])
        truth[(bucket["start"], bucket["model"])] = events
        statuses = [e["data"]["status_code"] for e in events]
        assert bucket["requests"] == len(events), bucket
        assert bucket["errors"] == sum(s >= 500 for s in statuses), bucket
        assert bucket["clientErrors"] == sum(400 <= s < 500 for s in statuses), bucket
        assert bucket["model"] is None or by_model
        latencies = [e["data"]["latency_ms"] for e in events]
        for item in bucket["latency"]:
            assert _close(item["ms"], exact_percentile(latencies, item["percentile"])), (bucket["start"], item)
    assert sum(b["requests"] for b in report["series"]) == report["totals"]["requests"]


def _check_breakdown(org: Org, report: dict[str, Any]) -> None:
    """The breakdown counts every error of the range by model, status code and error type, whatever the
    granularity (whole hours from errors_hourly, the edges from raw events)."""
    events = org.in_range(dt.datetime.fromisoformat(report["from"]), dt.datetime.fromisoformat(report["to"]))
    truth = Counter(
        (e["data"]["model"], e["data"]["status_code"], e["data"].get("error_type"))
        for e in events
        if e["data"]["status_code"] >= 500
    )
    got = {(row["model"], row["statusCode"], row["errorType"]): row["errors"] for row in report["breakdown"]}
    assert truth and got == dict(truth)


async def test_counts_and_percentiles_match_the_events(
    client: httpx.AsyncClient, make_token: TokenFactory, world: World
) -> None:
    org = world.incident
    start, end = world.this_hour - 30 * HOUR + dt.timedelta(minutes=17), world.now + dt.timedelta(minutes=1)
    token = make_token("engineer", org=org.org_id)
    for by_model in (False, True):
        report = await _report(client, token, org.org_id, start, end, by_model=by_model)
        _check_buckets(org, report, by_model)
        _check_breakdown(org, report)
        latencies = org.latencies(start, end)
        totals = report["totals"]
        assert totals["requests"] == len(latencies)
        assert [p["percentile"] for p in totals["latency"]] == PERCENTILES
        for item in totals["latency"]:
            assert _close(item["ms"], exact_percentile(latencies, item["percentile"])), item
    day = await _report(client, token, org.org_id, world.this_hour - 71 * HOUR, end, "DAY")
    _check_buckets(org, day, False)
    # Days of a +05:30 zone cut hours in two: those hours are read from raw events, exactly.
    kolkata = await _report(client, token, org.org_id, world.this_hour - 71 * HOUR, end, "DAY", True,
                            [0.25, 0.999], "Asia/Kolkata")  # fmt: skip
    _check_buckets(org, kolkata, True)
    _check_breakdown(org, kolkata)
    assert {dt.datetime.fromisoformat(b["start"]).minute for b in kolkata["series"]} == {30}
    for by_model in (True, False):  # raw events only; without groupByModel, aggregated per minute in SQL
        minutes = await _report(client, token, org.org_id, world.this_hour - 2 * HOUR, end, "MINUTE", by_model)
        _check_buckets(org, minutes, by_model)
        _check_breakdown(org, minutes)
        assert minutes["series"], "no minute buckets"
    # Over SPLIT_BUCKETS buckets, from off the grid: the series is read in parts at once (reliability/report.py).
    long_start = world.this_hour - 6 * HOUR + dt.timedelta(minutes=7, seconds=30)
    minutes = await _report(client, token, org.org_id, long_start, end, "MINUTE")
    assert (end - long_start) / dt.timedelta(minutes=1) > SPLIT_BUCKETS
    _check_buckets(org, minutes, False)
    assert minutes["totals"]["requests"] == len(org.latencies(long_start, end))


async def test_the_burst_is_found_in_its_hours_and_explained_by_its_model(
    client: httpx.AsyncClient, make_token: TokenFactory, world: World
) -> None:
    org = world.incident
    start, end = world.this_hour - 36 * HOUR, world.now
    burst_start = world.this_hour + BURST_HOURS[0] * HOUR
    burst_end = world.this_hour + (BURST_HOURS[-1] + 1) * HOUR
    token = make_token("engineer", org=org.org_id)
    for by_model in (False, True):
        report = await _report(client, token, org.org_id, start, end, by_model=by_model)
        errors = [s for s in report["spikes"] if s["metric"] == "ERROR_RATE"]
        assert len(errors) == 1, report["spikes"]
        spike = errors[0]
        assert dt.datetime.fromisoformat(spike["start"]) == burst_start
        assert dt.datetime.fromisoformat(spike["end"]) == burst_end
        assert spike["observed"] > 2 * spike["baseline"]
        assert spike["model"] == (BURST_MODEL if by_model else None)
        first = spike["topContributors"][0]
        assert first["model"] == BURST_MODEL, spike["topContributors"]
        assert first["share"] >= 0.8, spike["topContributors"]
        assert all(0 <= c["share"] <= 1 for c in spike["topContributors"])
    # Detection works on p95 and p99 whatever percentiles the caller asks for.
    for asked in ([0.5], [0.99, 0.01], [0.95, 0.99, 0.5, 0.1]):
        other = await _report(client, token, org.org_id, start, end, by_model=True, percentiles=asked)
        assert other["spikes"] == report["spikes"], asked
        assert [p["percentile"] for p in other["totals"]["latency"]] == asked
    top = report["breakdown"][0]
    assert (top["model"], top["statusCode"], top["errorType"]) == (BURST_MODEL, 503, "overloaded")
    counts = [row["errors"] for row in report["breakdown"]]
    assert counts == sorted(counts, reverse=True)
    in_range = org.in_range(start, end)
    assert sum(counts) == sum(e["data"]["status_code"] >= 500 for e in in_range)


async def test_the_slowdown_is_found_in_its_hours_and_explained_by_its_slow_requests(
    client: httpx.AsyncClient, make_token: TokenFactory, world: World
) -> None:
    """A latency spike names the rows that explain the slow requests (raw events slower than the baseline, by
    model, status code and error type, against the baseline's window). The overall series: one model's hours
    (about 60 requests) are below the latency detector's minimum volume."""
    org = world.slow
    start, end = world.this_hour - 36 * HOUR, world.now
    burst_start, burst_end = (world.this_hour + h * HOUR for h in (BURST_HOURS[0], BURST_HOURS[-1] + 1))
    token = make_token("engineer", org=org.org_id)
    report = await _report(client, token, org.org_id, start, end)
    slow = [s for s in report["spikes"] if s["metric"] in ("LATENCY_P95", "LATENCY_P99")]
    assert slow and not [s for s in report["spikes"] if s["metric"] == "ERROR_RATE"], report["spikes"]
    for spike in slow:
        assert burst_start <= dt.datetime.fromisoformat(spike["start"]) < dt.datetime.fromisoformat(spike["end"])
        assert dt.datetime.fromisoformat(spike["end"]) <= burst_end, spike
        assert spike["observed"] > spike["baseline"] and spike["model"] is None
        first = spike["topContributors"][0]
        assert first["model"] == BURST_MODEL and first["statusCode"] in (None, 200), spike["topContributors"]
        assert all(0 <= c["share"] <= 1 for c in spike["topContributors"])


async def test_steady_traffic_has_no_spike(client: httpx.AsyncClient, make_token: TokenFactory, world: World) -> None:
    org = world.steady
    token = make_token("engineer", org=org.org_id)
    for by_model in (False, True):
        report = await _report(client, token, org.org_id, world.this_hour - 48 * HOUR, world.now, by_model=by_model)
        assert report["spikes"] == []
        assert report["totals"]["requests"] > 0


async def test_viewers_and_other_orgs_are_refused(
    client: httpx.AsyncClient, make_token: TokenFactory, world: World
) -> None:
    variables = {"org": world.incident.org_id, "r": {"from": (world.now - HOUR).isoformat(),
                 "to": world.now.isoformat()}, "g": "HOUR", "m": False, "p": PERCENTILES}  # fmt: skip
    for token in (make_token("viewer", org=world.incident.org_id), make_token("engineer", org=world.steady.org_id)):
        body = (await graphql(client, RELIABILITY, token, variables)).json()
        assert body["data"] is None
        assert body["errors"][0]["extensions"]["code"] == "FORBIDDEN"


@pytest.mark.parametrize(
    ("granularity", "start", "end", "time_zone"),
    [
        ("DAY", dt.datetime(2, 1, 1, tzinfo=dt.UTC), dt.datetime(2, 12, 1, tzinfo=dt.UTC), "Pacific/Kiritimati"),
        ("MONTH", dt.datetime(9996, 1, 1, tzinfo=dt.UTC), dt.datetime(9999, 1, 1, tzinfo=dt.UTC), "Etc/GMT+12"),
        ("MINUTE", dt.datetime(2026, 1, 1, tzinfo=dt.UTC), dt.datetime(2026, 1, 2, tzinfo=dt.UTC), "UTC"),
    ],
)
async def test_ranges_at_the_edges_of_time_answer_empty_reports(
    client: httpx.AsyncClient, make_token: TokenFactory, granularity: str, start: dt.datetime, end: dt.datetime,
    time_zone: str,
) -> None:  # fmt: skip
    org = f"rel_{uuid.uuid4().hex[:6]}"
    by_model = granularity != "MINUTE"  # (24 h of minutes by model is over the cost budget)
    report = await _report(client, make_token("engineer", org=org), org, start, end, granularity, by_model,
                           PERCENTILES, time_zone)  # fmt: skip
    assert report["series"] == [] and report["spikes"] == [] and report["breakdown"] == []
    assert report["totals"] == {"requests": 0, "errors": 0, "clientErrors": 0, "errorRate": 0.0, "latency": []}


@pytest.mark.parametrize(
    ("percentiles", "message"),
    [
        ([], "percentiles has 0 values"),
        ([0.5] * 11, "percentiles has 11 values"),
        ([0.5, 1.0], "percentiles[1] is 1.0"),
        ([0.0], "percentiles[0] is 0.0"),
        ([0.5, -0.1], "percentiles[1] is -0.1"),
    ],
)
async def test_bad_percentiles_are_refused_by_name(
    client: httpx.AsyncClient, make_token: TokenFactory, percentiles: list[float], message: str
) -> None:
    org = f"rel_{uuid.uuid4().hex[:6]}"
    now = dt.datetime.now(dt.UTC)
    variables = {"org": org, "r": {"from": (now - HOUR).isoformat(), "to": now.isoformat()}, "g": "HOUR",
                 "m": False, "p": percentiles}  # fmt: skip
    body = (await graphql(client, RELIABILITY, make_token("engineer", org=org), variables)).json()
    error = body["errors"][0]
    assert error["extensions"]["code"] == "BAD_USER_INPUT"
    assert message in error["message"]


async def test_hostile_arguments_get_clear_errors_never_internal(
    client: httpx.AsyncClient, make_token: TokenFactory, world: World
) -> None:
    org = world.incident.org_id
    token = make_token("engineer", org=org)
    r = {"from": (world.now - 3 * HOUR).isoformat(), "to": world.now.isoformat()}
    base = {"org": org, "r": r, "g": "HOUR", "m": False, "p": PERCENTILES}

    async def code_of(variables: dict[str, object], bearer: str = token, raw: bytes | None = None) -> str | None:
        headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"}
        body = raw if raw is not None else json.dumps({"query": RELIABILITY, "variables": variables}).encode()
        answer = (await client.post("/graphql", content=body, headers=headers)).json()
        errors = answer.get("errors") or []
        return errors[0]["extensions"]["code"] if errors else None

    # Extreme but valid percentiles answer (rank 1 and rank n).
    assert await code_of(base | {"p": [1e-320, 0.9999999999999999]}) is None
    # NaN and Infinity are not JSON numbers a GraphQL Float accepts; Python's json would read them.
    nan = json.dumps({"query": RELIABILITY, "variables": base | {"p": [float("nan")]}}).encode()
    assert await code_of({}, raw=nan) in {"BAD_USER_INPUT", "GRAPHQL_VALIDATION_FAILED", "BAD_REQUEST"}
    assert await code_of(base | {"org": org + "\x00"}) == "BAD_USER_INPUT"
    assert await code_of(base | {"org": "x" * 10_000}) == "BAD_USER_INPUT"
    models = {"models": [f"m{i}" for i in range(101)]}
    query = RELIABILITY.replace("percentiles: $p,", "percentiles: $p, filter: $f,").replace(
        '$tz: String! = "UTC")', '$tz: String! = "UTC", $f: UsageFilter)'
    )
    body = json.dumps({"query": query, "variables": base | {"f": models}}).encode()
    assert await code_of({}, raw=body) == "BAD_USER_INPUT"
    assert await code_of(base | {"tz": "../../etc/passwd"}) == "BAD_USER_INPUT"
    assert await code_of(base | {"r": {"from": r["to"], "to": r["from"]}}) == "BAD_USER_INPUT"
    expired = make_token("engineer", org=org, ttl=-60)
    assert await code_of(base, bearer=expired) == "UNAUTHENTICATED"


async def test_tiny_quiet_and_off_grid_ranges_answer_exactly(
    client: httpx.AsyncClient, make_token: TokenFactory, world: World
) -> None:
    """Attack on the grid and detection paths: a range of one microsecond, a range off the hour, a range in the
    future (history with traffic, none in the range: detection leaves the quiet models out), an org id with a
    trailing newline. Each answers its buckets exactly (or BAD_USER_INPUT for the id), never INTERNAL."""
    org = world.incident
    token = make_token("engineer", org=org.org_id)
    hour = floor_hour(world.now) - 2 * HOUR
    seven = hour + dt.timedelta(minutes=7)
    instant = (seven, seven + dt.timedelta(microseconds=1))
    for start, end, granularity, buckets in (
        (*instant, "HOUR", [hour]),
        (*instant, "MINUTE", [seven]),
        (hour + HOUR / 2, hour + 2.5 * HOUR, "HOUR", [hour, hour + HOUR, hour + 2 * HOUR]),
    ):
        report = await _report(client, token, org.org_id, start, end, granularity, by_model=True)
        step = HOUR if granularity == "HOUR" else dt.timedelta(minutes=1)
        for bucket in report["series"]:
            first, last = dt.datetime.fromisoformat(bucket["start"]), dt.datetime.fromisoformat(bucket["end"])
            assert first in buckets and last - first == step, bucket
            events = org.in_range(max(first, start), min(last, end), bucket["model"])
            assert bucket["requests"] == len(events) > 0, bucket
        assert (
            sum(b["requests"] for b in report["series"])
            == len(org.in_range(start, end))
            == int(report["totals"]["requests"])
        )
        assert report["series"] or end - start < HOUR  # the off-hour range holds traffic of every hour it cuts
    future = floor_hour(world.now) + 3 * HOUR
    quiet = await _report(client, token, org.org_id, future, future + 2 * HOUR, by_model=True)
    assert quiet["series"] == [] and quiet["spikes"] == [] and int(quiet["totals"]["requests"]) == 0
    variables = {"org": org.org_id + "\n", "r": {"from": hour.isoformat(), "to": (hour + HOUR).isoformat()},
                 "g": "HOUR", "m": True, "p": PERCENTILES}  # fmt: skip
    body = (await graphql(client, RELIABILITY, token, variables)).json()
    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


SERIES_QUESTION = """query($org: ID!, $r: TimeRange!, $g: Granularity!, $m: Boolean!, $p: [Float!]!YES) {
  reliability(orgId: $org, range: $r, granularity: $g, groupByModel: $m, percentiles: $p) { BODY }
}"""
FRAGMENT = "fragment B on ReliabilityBucket { end n: requests latency { ms } }"
# (selection, whether the series is written as JSON text)
SERIES_SELECTIONS = [
    ("series { start end model requests errors clientErrors errorRate latency { percentile ms } }", True),
    (
        "totals { requests } series { __typename when: start ...B m: model ... on ReliabilityBucket { rate: errorRate }"
        " e: errors @include(if: $yes) c: clientErrors @skip(if: $yes) latency { __typename ms percentile } }",
        True,
    ),
    ("series { latency { ms } } spikes { start }", True),
    ("series { __typename }", True),
    ("a: series { requests } b: series { start }", False),  # two keys: the executor projects each
]


@pytest.mark.parametrize(("body", "as_json"), SERIES_SELECTIONS)
@pytest.mark.parametrize(("granularity", "by_model"), [("HOUR", True), ("HOUR", False), ("MINUTE", False)])
async def test_the_series_written_as_json_is_what_the_executor_would_answer(
    client: httpx.AsyncClient, make_token: TokenFactory, world: World, monkeypatch: pytest.MonkeyPatch,
    body: str, as_json: bool, granularity: str, by_model: bool,
) -> None:  # fmt: skip
    """Aliases, fragments, @include/@skip and typenames: the JSON text path answers byte for byte as the
    projection of BucketItems does, and is taken for every selection it can write."""
    org = world.incident.org_id
    hours = 36 if granularity == "HOUR" else 2
    variables = {"org": org, "r": {"from": (world.now - hours * HOUR).isoformat(), "to": world.now.isoformat()},
                 "g": granularity, "m": by_model, "p": [0.5, 0.999, 0.01]}  # fmt: skip
    token = make_token("engineer", org=org)
    document = SERIES_QUESTION.replace("BODY", body).replace("YES", ", $yes: Boolean!" if "$yes" in body else "")
    document += "\n" + FRAGMENT if "...B" in body else ""
    variables |= {"yes": True} if "$yes" in body else {}
    written: list[bool] = []
    render = resolvers.reliability.render_series

    def spy(*args: Any) -> Any:
        result = render(*args)
        written.append(result is not None)
        return result

    monkeypatch.setattr(resolvers.reliability, "render_series", spy)
    fast = await graphql(client, document, token, variables)
    monkeypatch.setattr(resolvers.reliability, "SERIES_AS_JSON", False)
    slow = await graphql(client, document, token, variables)
    assert fast.content == slow.content
    assert "errors" not in fast.json() and fast.json()["data"]["reliability"]
    assert any(written) is as_json
    series = [v for k, v in fast.json()["data"]["reliability"].items() if k in ("series", "a")]
    assert series and series[0], fast.json()  # something to compare


async def test_spikes_found_in_a_helper_process_are_those_found_here(world: World, database_url: str) -> None:
    """Detection in a helper process (kernel/offload.py, as the API runs it): the same report to the last digit as
    detection in this process, the burst and the slowdown included, and the helper did take the steps."""
    engine = create_engine(database_url, pool_size=8)
    pool = Offload(1, preload=("reliability.spikes",))
    await pool.start()
    try:
        async with asyncio.timeout(30):
            while not pool.ready:
                await asyncio.sleep(0.01)
        for org, by_model in ((world.incident, True), (world.slow, False)):
            query = UsageQuery(org_id=org.org_id, start=world.this_hour - 36 * HOUR, end=world.now, granularity="HOUR",
                               time_zone="UTC", group_by=frozenset({"model"}) if by_model else frozenset())  # fmt: skip
            here, _ = await build_report(engine.connect, query, PERCENTILES, None, meanwhile=lambda s: None)
            there, _ = await build_report(engine.connect, query, PERCENTILES, None, meanwhile=lambda s: None,
                                          offload=pool)  # fmt: skip
            assert here.spikes and there == here
        assert pool.steps == {"helper": 2, "here": 0}
    finally:
        await pool.close()
        await engine.dispose()


async def test_the_api_answers_the_same_whatever_happens_to_its_helper(
    client: httpx.AsyncClient, make_token: TokenFactory, world: World, resources: Resources
) -> None:
    """Attack on the helper path through the API: the helper killed between two reports and during one (SIGKILL),
    stopped dead (SIGSTOP) so that it never answers: every report is the one the API gave before (but for its
    freshness, which ages), spikes and all (the step runs in the serving process), and a new helper takes the next
    steps. Odd org ids, another org and an expired token are refused with their code while it runs, and never reach
    it."""
    offload = resources.offload
    org = world.incident
    token = make_token("engineer", org=org.org_id)
    start, end = world.this_hour - 36 * HOUR, world.now

    def without_freshness(report: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in report.items() if k != "freshness"}  # (it ages while the test runs)

    first = without_freshness(await _report(client, token, org.org_id, start, end, by_model=True))
    assert first["spikes"] and first["series"]
    async with asyncio.timeout(30):
        while not offload.ready:
            await asyncio.sleep(0.01)

    async def same() -> None:
        async with asyncio.timeout(20):  # (a helper that never answers must not hold the report)
            assert without_freshness(await _report(client, token, org.org_id, start, end, by_model=True)) == first

    async def replaced(old: int) -> int:
        async with asyncio.timeout(30):
            while not offload.ready or offload._helpers[0].process.pid == old:  # type: ignore[union-attr]
                await asyncio.sleep(0.01)
        return offload._helpers[0].process.pid  # type: ignore[union-attr]

    before = dict(offload.steps)
    await same()
    assert offload.steps["helper"] == before["helper"] + 1
    helper = offload._helpers[0].process
    assert helper is not None
    helper.kill()  # between two reports
    await helper.wait()
    await same()
    pid = await replaced(helper.pid)
    kill_soon = asyncio.get_running_loop().call_later(0.001, os.kill, pid, signal.SIGKILL)  # during one
    await same()
    kill_soon.cancel()
    await same()  # (if the kill came after the first answer, this one finds the helper gone)
    pid = await replaced(pid)
    os.kill(pid, signal.SIGSTOP)  # stuck: the step waits for the timeout, then runs here
    offload.timeout_s, timeout = 0.5, offload.timeout_s
    try:
        await same()
    finally:
        offload.timeout_s = timeout
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    await replaced(pid)
    helped = offload.steps["helper"]
    await same()
    assert offload.steps["helper"] == helped + 1
    odd = {"org": org.org_id + "\x00"}, {"org": org.org_id + "\n"}, {"org": world.steady.org_id}
    variables = {"r": {"from": start.isoformat(), "to": end.isoformat()}, "g": "HOUR", "m": True, "p": PERCENTILES,
                 "tz": "UTC"}  # fmt: skip
    for extra, code in zip(odd, ("BAD_USER_INPUT", "BAD_USER_INPUT", "FORBIDDEN"), strict=True):
        body = (await graphql(client, RELIABILITY, token, variables | extra)).json()
        assert [e["extensions"]["code"] for e in body["errors"]] == [code], body
    expired = make_token("engineer", org=org.org_id, ttl=-60)
    body = (await graphql(client, RELIABILITY, expired, variables | {"org": org.org_id})).json()
    assert [e["extensions"]["code"] for e in body["errors"]] == ["UNAUTHENTICATED"]
    assert offload.steps["helper"] == helped + 1  # none of those reached the helper


@pytest.mark.parametrize("fails", ["attribution", "breakdown"])
async def test_a_statement_that_fails_mid_report_fails_the_report_and_leaves_nothing_running(
    world: World, database_url: str, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """A report with spikes runs its attribution statements while it writes its series, and its breakdown while it
    detects: when one of them fails (the server cancels it, a backend is killed), the report raises that error (the
    API answers UNAVAILABLE for it), the other statements are cancelled, and no task or un-awaited coroutine is
    left behind."""
    org = world.slow
    query = UsageQuery(org_id=org.org_id, start=world.this_hour - 36 * HOUR, end=world.now, granularity="HOUR",
                       time_zone="UTC", group_by=frozenset())  # fmt: skip
    # Lenient error-rate tests: the steady 1 % of 500s gives several spikes besides the slowdown.
    for name, value in (("ALPHA_CANDIDATE", 0.5), ("ALPHA", 0.5), ("MIN_RATIO", 1.0), ("MIN_ERRORS", 1)):
        monkeypatch.setattr(reliability.spikes, name, value)
    engine = create_engine(database_url, pool_size=8)
    report, _ = await build_report(engine.connect, query, PERCENTILES, None, meanwhile=lambda s: None)
    assert len(report.spikes) >= 3, report.spikes
    await engine.dispose()

    breakdown_cancelled: list[bool] = []

    async def cancelled_by_the_server(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        raise asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout")

    async def slow_breakdown(*args: Any, **kwargs: Any) -> Any:
        try:
            await asyncio.Event().wait()  # still running when the attribution fails: only a cancel ends it
        except asyncio.CancelledError:
            breakdown_cancelled.append(True)
            raise

    if fails == "attribution":
        monkeypatch.setattr(reliability.report, "compositions", cancelled_by_the_server)
        monkeypatch.setattr(reliability.report, "error_rows", slow_breakdown)
    else:
        monkeypatch.setattr(reliability.report, "error_rows", cancelled_by_the_server)
    engine = create_engine(database_url, pool_size=8)
    written: list[int] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                await asyncio.wait_for(build_report(engine.connect, query, PERCENTILES, None,
                                                    meanwhile=lambda s: written.append(len(s))), 30)  # fmt: skip
            except asyncpg.exceptions.QueryCanceledError:
                pass  # (not kept: its traceback would keep the report's frame and coroutines alive)
            else:
                pytest.fail("the report did not fail")
            await asyncio.sleep(0)
            left = [t for t in asyncio.all_tasks() if not t.done() and _in_report(t)]
            gc.collect()  # an un-awaited coroutine warns when it is freed
        assert left == []
        assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
        assert written or fails == "breakdown"  # the series was written while the attribution ran
        assert breakdown_cancelled == ([True] if fails == "attribution" else [])
        monkeypatch.undo()
        report, _ = await build_report(engine.connect, query, PERCENTILES, None, meanwhile=lambda s: None)
        assert report.spikes and report.breakdown  # answered once nothing fails
    finally:
        await engine.dispose()


def _in_report(task: asyncio.Task[Any]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and code.co_filename.endswith("reliability/report.py")


@pytest.mark.parametrize(("count", "refused"), [(12, False), (400, True)])
async def test_a_huge_series_selection_is_refused_or_answered_alike_never_internal(
    client: httpx.AsyncClient, make_token: TokenFactory, world: World, monkeypatch: pytest.MonkeyPatch, count: int,
    refused: bool,
) -> None:  # fmt: skip
    """Hundreds of aliases in a bucket and in its percentile list: the request's limits refuse it, or the JSON path
    and the executor answer the same bytes."""
    org = world.incident.org_id
    fields = " ".join(f"r{i}: errorRate" for i in range(count)) + " latency { " + " ".join(
        f"m{i}: ms" for i in range(count)) + " }"  # fmt: skip
    document = SERIES_QUESTION.replace("BODY", f"series {{ {fields} }}").replace("YES", "")
    variables = {"org": org, "r": {"from": (world.now - 6 * HOUR).isoformat(), "to": world.now.isoformat()},
                 "g": "HOUR", "m": False, "p": [0.5, 0.99]}  # fmt: skip
    token = make_token("engineer", org=org)
    fast = await graphql(client, document, token, variables)
    codes = {e["extensions"]["code"] for e in fast.json().get("errors", [])}
    assert "INTERNAL" not in codes, fast.json()
    assert bool(codes) is refused, codes
    if codes:
        assert codes <= {"QUERY_TOO_COMPLEX", "BAD_REQUEST", "GRAPHQL_VALIDATION_FAILED"}, codes
        return
    monkeypatch.setattr(resolvers.reliability, "SERIES_AS_JSON", False)
    assert (await graphql(client, document, token, variables)).content == fast.content


async def test_odd_bytes_and_other_orgs_never_reach_the_json_path(
    client: httpx.AsyncClient, make_token: TokenFactory, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NUL or a trailing newline in the org id, another org's id, an expired token: refused with their code
    before any report is built or written."""
    written: list[int] = []
    monkeypatch.setattr(resolvers.reliability, "render_series", lambda *a: written.append(1))
    org = world.incident.org_id
    document = SERIES_QUESTION.replace("BODY", "series { start errorRate }").replace("YES", "")
    r = {"from": (world.now - 3 * HOUR).isoformat(), "to": world.now.isoformat()}
    base = {"org": org, "r": r, "g": "HOUR", "m": False, "p": [0.5]}
    token = make_token("engineer", org=org)
    for variables, bearer, code in (
        (base | {"org": org + "\x00"}, token, "BAD_USER_INPUT"),
        (base | {"org": org + "\n"}, token, "BAD_USER_INPUT"),
        (base | {"org": world.steady.org_id}, token, "FORBIDDEN"),
        (base, make_token("engineer", org=org, ttl=-60), "UNAUTHENTICATED"),
    ):
        body = (await graphql(client, document, bearer, variables)).json()
        assert [e["extensions"]["code"] for e in body["errors"]] == [code], body
    assert written == []


@pytest.mark.parametrize("zone", ["UTC", "Australia/Lord_Howe", "Asia/Kathmandu"])
async def test_odd_model_filters_are_refused_by_name_and_odd_zones_answer_alike_on_both_series_paths(
    client: httpx.AsyncClient, make_token: TokenFactory, world: World, monkeypatch: pytest.MonkeyPatch, zone: str
) -> None:
    """Attack on the series' JSON path: a model filter value with NUL, a trailing newline, a quote or a percent is
    refused naming it (BAD_USER_INPUT, never INTERNAL); a real model in zones with half-hour or 45-minute offsets
    and DST answers only that model, in hour buckets, the JSON text byte for byte what the executor writes."""
    org = world.incident.org_id
    token = make_token("engineer", org=org)
    query = RELIABILITY.replace("percentiles: $p,", "percentiles: $p, filter: $f,").replace(
        '$tz: String! = "UTC")', '$tz: String! = "UTC", $f: UsageFilter)'
    )
    variables = {"org": org, "r": {"from": (world.now - 40 * HOUR).isoformat(), "to": world.now.isoformat()},
                 "g": "HOUR", "m": True, "p": PERCENTILES, "tz": zone}  # fmt: skip
    for odd in ["rel-model-a\x00", "rel-model-a\n", 'a"b', "%s%%", "é"]:
        answer = (await graphql(client, query, token, variables | {"f": {"models": [MODELS[0], odd]}})).json()
        [error] = answer["errors"]
        assert error["extensions"]["code"] == "BAD_USER_INPUT" and "filter.models[1]" in error["message"], answer
    variables |= {"f": {"models": [MODELS[0]]}}
    fast = await graphql(client, query, token, variables)
    monkeypatch.setattr(resolvers.reliability, "SERIES_AS_JSON", False)
    slow = await graphql(client, query, token, variables)
    answer = fast.json()
    assert "errors" not in answer, answer
    assert fast.content == slow.content
    series = answer["data"]["reliability"]["series"]
    assert series and {bucket["model"] for bucket in series} == {MODELS[0]}
    assert all(dt.datetime.fromisoformat(b["end"]) - dt.datetime.fromisoformat(b["start"]) == HOUR for b in series)
