"""Grafana dashboards in ``dashboards/``: their structure, and every panel's SQL run
against PostgreSQL the way Grafana would send it (tests/integration/grafana_sql.py).

The data: one org of its own with synthetic events over five hours, most of
them rolled up by ``db.rollup.run_cycle``, a tail above the rollup watermark,
late events in an hour already rolled up (dirty until re-rolled), prices for
all models but one with a price change inside the range, and an ingester
heartbeat. Model names are unique to the run, since prices are not per org.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from opentelemetry.metrics import get_meter
from sqlalchemy import text

from db.engine import create_engine
from db.freshness import beat
from db.prices import Price, spend, upsert_price
from db.rollup import floor_hour, run_cycle
from ingest.events import TimeWindow, UsageEvent, validate
from ingest.metrics import IngestMetrics
from ingest.synthetic import Traffic, generate
from ingest.writer import EventWriter
from tests.integration.grafana_sql import UnexpandedError, Variable, expand, interval_seconds

DASHBOARDS = sorted((Path(__file__).parents[2] / "dashboards").glob("*.json"))
HOUR = dt.timedelta(hours=1)
SEED = 12  # org_0000 of this seed uses four models and four projects
PANEL_FORMATS = {"time_series", "table"}
QUERYLESS = {"text"}  # panels with content and no query (the structure test checks which)
SESSION_TIME_ZONE = "Asia/Kolkata"  # +05:30: the SQL must not depend on the session's zone


def load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    found: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))
    return [p for p in found if p.get("type") != "row"]


def variables_of(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def test_dashboards_exist() -> None:
    assert DASHBOARDS, "no dashboards/*.json"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dashboard = load(path)
    assert isinstance(dashboard.get("uid"), str) and dashboard["uid"]
    assert isinstance(dashboard.get("title"), str) and dashboard["title"]
    assert isinstance(dashboard.get("schemaVersion"), int) and dashboard["schemaVersion"] >= 36
    variables = variables_of(dashboard)
    assert {"DS", "org", "model"} <= variables.keys()
    assert variables["DS"]["type"] == "datasource"
    assert variables["DS"]["query"] == "grafana-postgresql-datasource"
    for name in ("org", "model"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${DS}"
        assert variables[name]["query"].strip()
    assert variables["model"]["multi"] and variables["model"]["includeAll"]
    assert "ORDER BY" in variables["org"]["query"].upper()

    seen_ids: set[int] = set()
    rectangles: list[tuple[str, int, int, int, int]] = []
    for panel in panels(dashboard):
        title = panel.get("title")
        assert isinstance(title, str) and title, panel
        assert isinstance(panel.get("id"), int) and panel["id"] not in seen_ids, title
        seen_ids.add(panel["id"])
        assert isinstance(panel.get("type"), str) and panel["type"], title
        grid = panel.get("gridPos", {})
        assert all(isinstance(grid.get(k), int) for k in "xywh"), (title, grid)
        assert grid["x"] >= 0 and grid["y"] >= 0 and grid["w"] > 0 and grid["h"] > 0, title
        assert grid["x"] + grid["w"] <= 24, (title, grid)
        rectangles.append((title, grid["x"], grid["y"], grid["w"], grid["h"]))
        if panel["type"] in QUERYLESS:
            assert panel.get("options", {}).get("content", "").strip() and not panel.get("targets"), title
            continue
        assert panel.get("datasource", {}).get("uid") == "${DS}", title
        targets = panel.get("targets")
        assert targets, title
        for target in targets:
            assert target.get("refId"), title
            assert isinstance(target.get("rawSql"), str) and target["rawSql"].strip(), title
            assert target.get("format") in PANEL_FORMATS, title
            assert target.get("rawQuery") is True and target.get("editorMode") == "code", title
            assert target.get("datasource", {}).get("uid") == "${DS}", title
            if "$__timeGroup" in target["rawSql"]:
                # Rollups are hourly: a finer bucket would show hourly spikes next to raw minutes.
                assert interval_seconds(panel.get("interval", "0s")) >= 3600, (title, "min interval below 1h")
    for index, (title, x, y, w, h) in enumerate(rectangles):
        for other, ox, oy, ow, oh in rectangles[index + 1 :]:
            overlap = x < ox + ow and ox < x + w and y < oy + oh and oy < y + h
            assert not overlap, f"panels {title!r} and {other!r} overlap"


def test_expander_refuses_what_grafana_would_not_expand() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    org = {"org": Variable("org", ["o'1"])}
    assert expand("x = '$org'", start=now, end=now, variables=org) == "x = 'o''1'"
    with pytest.raises(UnexpandedError):
        expand("x = '$orgs'", start=now, end=now, variables=org)
    with pytest.raises(UnexpandedError):
        expand("$__unixEpochFilter(t)", start=now, end=now, variables=org)
    with pytest.raises(UnexpandedError):  # Grafana's macro arguments end at the first ")"
        expand("$__timeFilter(date_trunc('hour', t))", start=now, end=now, variables=org)


# --- the data -----------------------------------------------------------------------------------------------------


@dataclass
class Seeded:
    org: str
    models: list[str]  # all of the org's models, sorted
    events: list[UsageEvent]  # every event written, distinct
    prices: list[Price]
    start: dt.datetime  # the dashboard's time range
    end: dt.datetime
    this_hour: dt.datetime  # the rollup cycle ran up to here

    def in_range(self) -> list[UsageEvent]:
        return [e for e in self.events if self.start <= e.time <= self.end]

    def price_at(self, model: str, moment: dt.datetime) -> Price | None:
        versions = [p for p in self.prices if p.model == model and p.effective_from <= moment]
        return max(versions, key=lambda p: p.effective_from, default=None)


async def _rolled_up(database_url: str, org: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM usage_hourly WHERE org_id = $1", org))
    finally:
        await connection.close()


@pytest.fixture(scope="module")
async def seeded(database_url: str) -> AsyncIterator[Seeded]:
    run = uuid.uuid4().hex[:8]
    now = dt.datetime.now(dt.UTC)
    this_hour = floor_hour(now)
    traffic = Traffic(
        seed=SEED, events=700, orgs=1, models=4, start=this_hour - 5 * HOUR, span=5 * HOUR,
        org_prefix=f"org_dash_{run}", source=f"//dashboards/{run}", error_bursts=3, burst_minutes=40,
    )  # fmt: skip
    raw = list(generate(traffic))
    for item in raw:
        data = item["data"]
        assert isinstance(data, dict)
        data["model"] = f"dash-{run}-{data['model']}"
    window = TimeWindow.around(now, retention_days=30)
    events = [validate(item, window) for item in raw]
    org = events[0].data.org_id
    priced = sorted({e.data.model for e in events})
    assert len(priced) == 4

    # The tail, written after the rollup cycle: just now (above the watermark) and late (in a rolled-up hour).
    tail = [
        retime(e, max(now - dt.timedelta(seconds=1 + i), this_hour)) if i < 30 else
        retime(e, this_hour - 3 * HOUR + dt.timedelta(minutes=i))
        for i, e in enumerate(events[-45:])
    ]  # fmt: skip
    # A model first used just now: only in raw events above the watermark, and never priced.
    tail[0] = msgspec.structs.replace(tail[0], data=msgspec.structs.replace(tail[0].data, model=f"dash-{run}-new"))
    head = events[:-45]
    models = sorted({e.data.model for e in head + tail})

    # priced[3] stays unpriced; priced[2] is unpriced in the range's first hour; priced[0] changes price.
    usd = decimal.Decimal
    prices = [
        Price(priced[0], this_hour - 48 * HOUR, usd("0.15"), usd("0.60"), usd("0.075")),
        Price(priced[0], this_hour - 2 * HOUR, usd("0.1234567"), usd("0.5"), usd("0.0617")),
        Price(priced[1], this_hour - 48 * HOUR, usd("2.5"), usd("10"), usd("1.25")),
        Price(priced[2], this_hour - 3 * HOUR, usd("3"), usd("15"), usd("0.3")),
    ]

    engine = create_engine(database_url, pool_size=2)
    instance = f"dashboards-{run}"
    try:
        async with engine.connect() as connection:
            for price in prices:
                await upsert_price(connection, price, created_by="test_dashboards")
            await connection.commit()
        writer = EventWriter(engine, None, None, IngestMetrics(get_meter("test_dashboards")))
        for first in range(0, len(head), 200):
            await writer.write(head[first : first + 200], channel="seed")
        # The app's rollup worker may hold the lock; then its cycle does the work.
        for _ in range(100):
            if (await run_cycle(engine, now)).ran and await _rolled_up(database_url, org):
                break
            await asyncio.sleep(0.1)
        assert await _rolled_up(database_url, org), "no rollups for the dashboard org"
        await writer.write(tail, channel="seed")
        async with engine.connect() as connection:
            await beat(connection, instance, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=2))
        yield Seeded(org, models, head + tail, prices, this_hour - 4 * HOUR + dt.timedelta(minutes=17),
                     now + dt.timedelta(minutes=1), this_hour)  # fmt: skip
    finally:
        async with engine.begin() as connection:  # a fake heartbeat must not make other tests' freshness stale
            await connection.execute(text("DELETE FROM ingest_heartbeats WHERE instance = :i"), {"i": instance})
        await engine.dispose()


def retime(event: UsageEvent, time: dt.datetime) -> UsageEvent:
    return msgspec.structs.replace(event, time=time)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url, server_settings={"TimeZone": SESSION_TIME_ZONE})
    try:
        yield connection
    finally:
        await connection.close()


def _variables(dashboard: dict[str, Any], org: str, models: list[str]) -> dict[str, Variable]:
    defined = variables_of(dashboard)
    values = {"org": [org], "model": models, "DS": ["postgres"]}
    return {
        name: Variable(name, values[name], multi=bool(v.get("multi") or v.get("includeAll")))
        for name, v in defined.items()
        if name in values
    }


async def run_panel(
    db: asyncpg.Connection, dashboard: dict[str, Any], sql: str, seeded: Seeded,
    models: list[str] | None = None, interval: str = "1h",
) -> list[asyncpg.Record]:  # fmt: skip
    expanded = expand(
        sql, start=seeded.start, end=seeded.end, interval=interval,
        variables=_variables(dashboard, seeded.org, models or seeded.models),
    )  # fmt: skip
    try:
        return await db.fetch(expanded)
    except asyncpg.PostgresError as exc:
        raise AssertionError(f"{exc.__class__.__name__}: {exc}\n--- SQL ---\n{expanded}") from exc


# --- every panel and variable, as Grafana would run it --------------------------------------------------------------


@pytest.mark.parametrize("interval", ["1h", "6h"])
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
async def test_every_panel_query_returns_rows(
    path: Path, interval: str, seeded: Seeded, db: asyncpg.Connection
) -> None:
    dashboard = load(path)
    for panel in panels(dashboard):
        for target in panel.get("targets", []):  # none on a text panel
            rows = await run_panel(db, dashboard, target["rawSql"], seeded, interval=interval)
            assert rows, f"panel {panel['title']!r} ({target['refId']}) returned no rows"
            if target["format"] == "time_series":
                columns = list(rows[0].keys())
                assert "time" in columns, f"panel {panel['title']!r} has no time column"
                times = [r["time"] for r in rows]
                assert times == sorted(times), f"panel {panel['title']!r} is not ordered by time"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
async def test_variable_queries(path: Path, seeded: Seeded, db: asyncpg.Connection) -> None:
    dashboard = load(path)
    variables = variables_of(dashboard)
    orgs = [r[0] for r in await run_panel(db, dashboard, variables["org"]["query"], seeded)]
    assert seeded.org in orgs and orgs == sorted(orgs)
    models = [r[0] for r in await run_panel(db, dashboard, variables["model"]["query"], seeded)]
    # Every model used in the range (the raw tail above the rollup watermark included), in order.
    assert {e.data.model for e in seeded.in_range()} <= set(models) and models == sorted(models)
    assert any(m.endswith("-new") for m in models)


# --- usage.json against the events written ---------------------------------------------------------------------------

USAGE = Path(__file__).parents[2] / "dashboards" / "usage.json"


def panel_sql(dashboard: dict[str, Any], title: str) -> str:
    matches = [p for p in panels(dashboard) if p["title"] == title]
    assert len(matches) == 1, title
    return str(matches[0]["targets"][0]["rawSql"])


def series_sums(rows: list[asyncpg.Record], column: str) -> dict[str, Any]:
    sums: dict[str, Any] = defaultdict(int)
    for row in rows:
        if row[column] is not None:
            sums[row["metric"]] += row[column]
    return dict(sums)


@pytest.mark.parametrize("interval", ["1h", "1d"])
async def test_usage_panels_match_the_events(interval: str, seeded: Seeded, db: asyncpg.Connection) -> None:
    dashboard = load(USAGE)
    events = seeded.in_range()
    assert any(e.time >= seeded.this_hour for e in events)  # a tail above the watermark

    requests: dict[str, int] = defaultdict(int)
    tokens: dict[str, int] = defaultdict(int)
    spent: dict[str, decimal.Decimal] = defaultdict(decimal.Decimal)
    errors: dict[tuple[float, str], list[int]] = defaultdict(lambda: [0, 0])
    by_project: dict[str, list[Any]] = defaultdict(lambda: [0, 0, decimal.Decimal(0), 0])
    step = interval_seconds(interval)
    for e in events:
        d = e.data
        requests[d.model] += 1
        tokens[f"{d.model} · uncached input"] += d.input_tokens - d.cached_input_tokens
        tokens[f"{d.model} · cached input"] += d.cached_input_tokens
        tokens[f"{d.model} · output"] += d.output_tokens
        price = seeded.price_at(d.model, floor_hour(e.time))
        cost = spend(price, d.input_tokens, d.cached_input_tokens, d.output_tokens) if price else decimal.Decimal(0)
        if price:
            spent[d.model] += cost
        bucket = (floor_hour(e.time).timestamp() // step) * step
        errors[(bucket, d.model)][0] += d.status_code >= 500
        errors[(bucket, d.model)][1] += 1
        project = by_project[d.project_id or "(no project)"]
        project[0] += 1
        project[1] += d.input_tokens + d.output_tokens
        project[2] += cost
        project[3] += 0 if price else 1

    def run(title: str, models: list[str] | None = None) -> Any:
        return run_panel(db, dashboard, panel_sql(dashboard, title), seeded, models=models, interval=interval)

    assert series_sums(await run("Requests by model"), "requests") == requests
    assert series_sums(await run("Tokens by model"), "tokens") == tokens
    assert series_sums(await run("Spend by model (USD)"), "spend") == spent  # exact: numeric, no division

    rates = await run("5xx error rate by model")
    assert {(float(r["time"]), r["metric"]): r["5xx rate"] for r in rates} == pytest.approx(
        {key: bad / total for key, (bad, total) in errors.items()}
    )

    projects = await run("Top projects in range")
    got = {r["Project"]: [r["Requests"], r["Total tokens"], r["Spend"] or 0, r["Unpriced requests"]] for r in projects}
    assert got == {name: values for name, values in by_project.items()}
    assert [r["Requests"] for r in projects] == sorted((r["Requests"] for r in projects), reverse=True)

    one = seeded.models[:1]
    filtered = await run("Requests by model", models=one)
    assert series_sums(filtered, "requests") == {one[0]: requests[one[0]]}


async def test_freshness_panel(seeded: Seeded, db: asyncpg.Connection) -> None:
    dashboard = load(USAGE)
    (row,) = await run_panel(db, dashboard, panel_sql(dashboard, "Freshness lag"), seeded)
    assert row["Live ingesters"] >= 1
    assert row["Ingest lag"] is not None and row["Ingest lag"] >= 0
    assert 0 <= row["Since last ingest"] < 600
    assert row["Rollup lag"] is not None
