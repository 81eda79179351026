"""dashboards/reliability.json against the events written, and the read-only user of dashboards/README.md.

The data: one org of its own with synthetic events over five hours (error bursts on single models, a few 60 s
timeouts, 5xx without an error type) written with ``EventWriter`` and rolled up by ``db.rollup.run_cycle``;
then a tail above the rollup watermark and late events in an hour already rolled up (dirty until re-rolled),
among them a status code and error type seen nowhere else and a model with a single request. Every panel's
SQL runs as Grafana would send it (tests/integration/grafana_sql.py) and must give what the events give:
counts exactly, percentiles within 1 % of the exact nearest-rank percentile (``exact_percentile``).

The generic checks (structure, every query returns rows, the variables) run on this dashboard too, in
tests/integration/test_dashboards.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import asyncpg
import graphql
import msgspec
import pytest
from opentelemetry.metrics import get_meter

from db.engine import create_engine
from db.rollup import floor_hour, run_cycle
from db.sketch import index_sql
from ingest.events import TimeWindow, UsageEvent, validate
from ingest.metrics import IngestMetrics
from ingest.synthetic import Traffic, generate
from ingest.writer import EventWriter
from reliability.sketch import exact_percentile
from tests.integration import test_dashboards as dashboards_tests
from tests.integration.grafana_sql import interval_seconds
from tests.integration.test_dashboards import (
    DASHBOARDS,
    Seeded,
    load,
    panel_sql,
    panels,
    retime,
    run_panel,
    variables_of,
)

ROOT = Path(__file__).parents[2]
RELIABILITY = ROOT / "dashboards" / "reliability.json"
README = ROOT / "dashboards" / "README.md"
SDL = ROOT / "schema" / "schema.graphql"
HOUR = dt.timedelta(hours=1)
SEED = 17  # org_0000 of this seed uses four models
PERCENTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
LATE_ERROR = (503, "late_overload")  # only in the late events: counted only if dirty hours are read raw
TOP_ERRORS = 20


def within_one_percent(estimate: float, exact: float) -> bool:
    return abs(estimate - exact) <= 0.01 * exact * (1 + 1e-12)


def _adjust(raw: list[dict[str, Any]], run: str) -> None:
    """Run-unique model names, a heavy tail of 60 s timeouts and 5xx answers without an error type."""
    for n, item in enumerate(raw):
        data = item["data"]
        data["model"] = f"rel-{run}-{data['model']}"
        if n % 97 == 5:
            data.update(latency_ms=60_000.0, status_code=504, error_type="timeout")
        elif n % 89 == 7:
            data.update(status_code=500, error_type=None)


def _tail(events: list[UsageEvent], now: dt.datetime, this_hour: dt.datetime, run: str) -> list[UsageEvent]:
    """30 events just now (above the watermark) and 15 late ones, three hours back, in a rolled-up hour."""
    late_hour = this_hour - 3 * HOUR
    tail = [
        retime(e, max(now - dt.timedelta(seconds=1 + i), this_hour)) if i < 30 else
        retime(e, late_hour + dt.timedelta(minutes=i))
        for i, e in enumerate(events)
    ]  # fmt: skip
    status, error_type = LATE_ERROR
    for i in range(30, 42):
        tail[i] = msgspec.structs.replace(
            tail[i], data=msgspec.structs.replace(tail[i].data, status_code=status, error_type=error_type)
        )
    solo = msgspec.structs.replace(tail[44].data, model=f"rel-{run}-solo", latency_ms=1234.5)
    tail[44] = msgspec.structs.replace(tail[44], data=solo)  # a model with one request, in a dirty hour
    return tail


@pytest.fixture(scope="module")
async def seeded(database_url: str) -> AsyncIterator[Seeded]:
    run = uuid.uuid4().hex[:8]
    now = dt.datetime.now(dt.UTC)
    this_hour = floor_hour(now)
    traffic = Traffic(
        seed=SEED, events=1500, orgs=1, models=4, start=this_hour - 5 * HOUR, span=5 * HOUR,
        org_prefix=f"org_reldash_{run}", source=f"//reliability-dashboard/{run}", error_bursts=3,
        burst_minutes=40,
    )  # fmt: skip
    raw = list(generate(traffic))
    _adjust(raw, run)
    window = TimeWindow.around(now, retention_days=30)
    events = [validate(item, window) for item in raw]
    org = events[0].data.org_id
    head, tail = events[:-45], _tail(events[-45:], now, this_hour, run)

    engine = create_engine(database_url, pool_size=2)
    try:
        writer = EventWriter(engine, None, None, IngestMetrics(get_meter("test_reliability_dashboard")))
        for first in range(0, len(head), 300):
            await writer.write(head[first : first + 300], channel="seed")
        # The app's rollup worker may hold the lock; then its cycle does the work.
        for _ in range(100):
            if (await run_cycle(engine, now)).ran and await dashboards_tests._rolled_up(database_url, org):
                break
            await asyncio.sleep(0.1)
        assert await dashboards_tests._rolled_up(database_url, org), "no rollups for the dashboard org"
        await writer.write(tail, channel="seed")
    finally:
        await engine.dispose()
    models = sorted({e.data.model for e in head + tail})
    assert len(models) == 5  # four, and the single-request model
    start = this_hour - 4 * HOUR + dt.timedelta(minutes=17)
    yield Seeded(org, models, head + tail, [], start, now + dt.timedelta(minutes=1), this_hour)


# The connection fixture of the usage dashboard's tests (a session time zone other than UTC).
db = dashboards_tests.db


# --- what the events say ---------------------------------------------------------------------------------------------


def bucket_of(event: UsageEvent, interval: str) -> float:
    step = interval_seconds(interval)
    return (floor_hour(event.time).timestamp() // step) * step


def grouped(events: Iterable[UsageEvent], interval: str, by_model: bool) -> dict[Any, list[UsageEvent]]:
    groups: dict[Any, list[UsageEvent]] = defaultdict(list)
    for e in events:
        bucket = bucket_of(e, interval)
        groups[(bucket, e.data.model) if by_model else bucket].append(e)
    return groups


def counts(events: list[UsageEvent]) -> tuple[int, int, int]:
    """Requests, errors (status >= 500) and client errors (400-499)."""
    statuses = [e.data.status_code for e in events]
    return len(statuses), sum(s >= 500 for s in statuses), sum(400 <= s < 500 for s in statuses)


def top_errors(events: list[UsageEvent]) -> list[tuple[str, int, str, int, float]]:
    per_model = Counter(e.data.model for e in events)
    errors = Counter(
        (e.data.model, e.data.status_code, e.data.error_type or "(none)") for e in events if e.data.status_code >= 400
    )
    ranked = sorted(errors.items(), key=lambda item: (-item[1], *item[0]))[:TOP_ERRORS]
    return [(m, s, t, n, n / per_model[m]) for (m, s, t), n in ranked]


# --- the panels against the events -----------------------------------------------------------------------------------


def run(db: asyncpg.Connection, seeded: Seeded, title: str, interval: str, models: list[str] | None = None) -> Any:
    dashboard = load(RELIABILITY)
    return run_panel(db, dashboard, panel_sql(dashboard, title), seeded, models=models, interval=interval)


@pytest.mark.parametrize("interval", ["1h", "1d"])
async def test_counts_and_rates_match_the_events(
    interval: str,
    seeded: Seeded,
    db: asyncpg.Connection,
) -> None:
    events = seeded.in_range()
    assert any(e.time >= seeded.this_hour for e in events)  # a tail above the watermark
    assert any(e.data.status_code == LATE_ERROR[0] and e.data.error_type == LATE_ERROR[1] for e in events)

    rows = await run(db, seeded, "Requests and errors", interval)
    got = {float(r["time"]): (r["Requests"], r["5xx errors"], r["4xx client errors"]) for r in rows}
    assert got == {bucket: counts(group) for bucket, group in grouped(events, interval, by_model=False).items()}

    per_model = {key: counts(group) for key, group in grouped(events, interval, by_model=True).items()}
    rates = await run(db, seeded, "5xx error rate by model", interval)
    assert {(float(r["time"]), r["metric"]): r["5xx rate"] for r in rates} == pytest.approx(
        {key: errors / requests for key, (requests, errors, _) in per_model.items()}
    )
    client = await run(db, seeded, "4xx client error rate by model", interval)
    assert {(float(r["time"]), r["metric"]): r["4xx rate"] for r in client} == pytest.approx(
        {key: client_errors / requests for key, (requests, _, client_errors) in per_model.items()}
    )


@pytest.mark.parametrize("interval", ["1h", "1d"])
async def test_percentiles_within_one_percent(
    interval: str,
    seeded: Seeded,
    db: asyncpg.Connection,
) -> None:
    events = seeded.in_range()
    assert max(e.data.latency_ms for e in events) == 60_000.0  # the heavy tail is in the range

    overall = grouped(events, interval, by_model=False)
    rows = await run(db, seeded, "Latency percentiles (ms)", interval)
    assert [float(r["time"]) for r in rows] == sorted(overall)
    for row in rows:
        latencies = [e.data.latency_ms for e in overall[float(row["time"])]]
        for column, q in PERCENTILES.items():
            exact = exact_percentile(latencies, q)
            assert within_one_percent(row[column], exact), (row["time"], column, row[column], exact)

    per_model = grouped(events, interval, by_model=True)
    rows = await run(db, seeded, "Latency p95 by model (ms)", interval)
    assert {(float(r["time"]), r["metric"]) for r in rows} == set(per_model)
    for row in rows:
        latencies = [e.data.latency_ms for e in per_model[(float(row["time"]), row["metric"])]]
        exact = exact_percentile(latencies, 0.95)
        assert within_one_percent(row["p95"], exact), (row["time"], row["metric"], row["p95"], exact)
    assert any(len(group) == 1 for group in per_model.values())  # the single-request model


async def test_top_errors_match_the_events(seeded: Seeded, db: asyncpg.Connection) -> None:
    rows = await run(db, seeded, "Top errors in range", "1h")
    got = [(r["Model"], r["Status code"], r["Error type"], r["Requests"], r["Share of model's requests"]) for r in rows]
    expected = top_errors(seeded.in_range())
    assert [g[:4] for g in got] == [e[:4] for e in expected]
    assert [g[4] for g in got] == pytest.approx([e[4] for e in expected])
    assert any(g[1:3] == LATE_ERROR for g in got)  # late errors in a rolled-up hour count at once
    assert any(g[2] == "(none)" for g in got)


async def test_model_filter(seeded: Seeded, db: asyncpg.Connection) -> None:
    one = seeded.models[:1]
    events = grouped((e for e in seeded.in_range() if e.data.model == one[0]), "1d", by_model=False)
    rows = await run(db, seeded, "Requests and errors", "1d", models=one)
    assert {float(r["time"]): r["Requests"] for r in rows} == {bucket: len(group) for bucket, group in events.items()}
    rows = await run(db, seeded, "Latency percentiles (ms)", "1d", models=one)
    assert [float(r["time"]) for r in rows] == sorted(events)
    for row in rows:
        exact = exact_percentile([e.data.latency_ms for e in events[float(row["time"])]], 0.99)
        assert within_one_percent(row["p99"], exact)
    rows = await run(db, seeded, "Top errors in range", "1h", models=one)
    assert rows and {r["Model"] for r in rows} == {one[0]}


# --- the dashboard's shape -------------------------------------------------------------------------------------------


def test_reliability_dashboard_shape() -> None:
    dashboard = load(RELIABILITY)
    assert dashboard["uid"] == "analytics-reliability"
    assert variables_of(dashboard)["model"]["query"].startswith("SELECT model FROM reliability_hourly_model")
    by_title = {p["title"]: p for p in panels(dashboard)}
    (text,) = [p for p in by_title.values() if p["type"] == "text"]
    content = text["options"]["content"]
    assert "reliability(" in content and "spikes" in content and "topContributors" in content
    assert "docs/runbooks/incident-response.md" in content
    # The query to paste is valid against the exported SDL once Grafana has filled in the org and the range.
    query = re.search(r"```graphql\n(.*?)```", content, re.S)
    assert query, "no GraphQL query in the spikes panel"
    filled = query.group(1).replace("${org}", "org_1")
    filled = filled.replace("${__from:date:iso}", "2026-01-01T00:00:00Z").replace(
        "${__to:date:iso}", "2026-01-02T00:00:00Z"
    )
    assert graphql.validate(graphql.build_schema(SDL.read_text(encoding="utf-8")), graphql.parse(filled)) == []

    queried = [p for p in by_title.values() if p["type"] != "text"]
    assert len(queried) == 6
    sqls = [p["targets"][0]["rawSql"] for p in queried]
    # One plan for all: the CTEs up to the rollup rows are the same text in every panel.
    common = {sql[: sql.index("), reliability_rows AS")] for sql in sqls}
    assert len(common) == 1
    for sql in sqls:
        assert index_sql("latency_ms") in sql  # the rollup's bucket index, to the character
    for title in ("Latency percentiles (ms)", "Latency p95 by model (ms)"):
        sql = by_title[title]["targets"][0]["rawSql"]
        assert "sketch_merge(sketch)" in sql and "sketch_quantile(sketch, 0.95)" in sql
    assert "FROM errors_hourly h" in by_title["Top errors in range"]["targets"][0]["rawSql"]


# --- the read-only user of dashboards/README.md ---------------------------------------------------------------------


def documented_tables() -> list[str]:
    """The tables of the README's ``GRANT SELECT ON … TO grafana_reader``."""
    match = re.search(r"GRANT SELECT ON (.+?) TO grafana_reader;", README.read_text(encoding="utf-8"), re.S)
    assert match, "no GRANT SELECT … TO grafana_reader in dashboards/README.md"
    return [name.strip() for name in match.group(1).split(",")]


@pytest.fixture
async def reader(database_url: str, db: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """``db`` as a role with only the README's grants, in read-only transactions."""
    role = f"grafana_reader_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f"CREATE ROLE {role} NOLOGIN")
        await admin.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        await admin.execute(f"GRANT SELECT ON {', '.join(documented_tables())} TO {role}")
        await db.execute(f"SET ROLE {role}")
        await db.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        yield db
    finally:
        await db.execute("RESET ROLE")
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
async def test_documented_grants_suffice(path: Path, seeded: Seeded, reader: asyncpg.Connection) -> None:
    dashboard = load(path)
    queries = [v["query"] for v in variables_of(dashboard).values() if v["type"] == "query"]
    queries += [t["rawSql"] for p in panels(dashboard) for t in p.get("targets", [])]
    for sql in queries:
        assert await run_panel(reader, dashboard, sql, seeded) is not None
