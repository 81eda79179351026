"""The selection-aware usage statement gives the full statement's rows, on every column the question needs.

``db.usage.usage_statement`` leaves out the prices when neither spend nor unpriced models are selected, the
raw edges of a range that is whole rolled-up hours, split hours when no bucket boundary cuts one, and the
re-aggregation of rollup rows for HOUR by model. Hypothesis generates the data (events through the real
writer, rolled up, then late events that make hours dirty) and the questions (ranges below the watermark,
across it, cut hours, DAY and MONTH in zones with :30 and :45 offsets, filters, groupings, with and without
spend) and compares both statements' rows (``everything=True`` is the statement with every part). The API
test checks that the resolver learns the selection (fields, aliases, fragments) from the query.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.metrics import get_meter

from db.engine import create_engine
from db.rollup import run_cycle, watermarks
from db.usage import UsageQuery, usage_statement
from ingest.events import TimeWindow, validate
from ingest.metrics import IngestMetrics
from ingest.writer import EventWriter
from kernel.hours import floor_hour
from tests.conftest import TokenFactory
from tests.helpers import graphql

HOUR = dt.timedelta(hours=1)
MODELS = ("sel-a", "sel-b", "sel-c")  # a: priced, with a change; b: priced from a later hour; c: never
PROJECTS = (None, "p1", "p2")
KEYS = (None, "k1", "k2")
DIMENSIONS = ("model", "project_id", "api_key_id")
ZONES = ("UTC", "Asia/Kolkata", "Asia/Kathmandu", "Asia/Kolkata", "America/New_York")
SPAN_H = 26  # events in the 26 hours before the watermark (every UTC hour of a day), and after it up to now
SESSION = {"TimeZone": "UTC", "jit": "off"}  # the gateway's session settings (db/engine.py)


def usage_event(org: str, n: int, at: dt.datetime, pick: tuple[int, int, int, int, int, int]) -> dict[str, Any]:
    model, project, key, inputs, cached, outputs = pick
    data: dict[str, Any] = {
        "org_id": org, "model": MODELS[model], "input_tokens": inputs, "cached_input_tokens": min(cached, inputs),
        "output_tokens": outputs, "latency_ms": 10.0, "status_code": 200, "region": "eu",
    }  # fmt: skip
    if PROJECTS[project] is not None:
        data["project_id"] = PROJECTS[project]
    if KEYS[key] is not None:
        data["api_key_id"] = KEYS[key]
    return {"specversion": "1.0", "id": f"{org}-{n}", "source": "//selection", "type": "ai.usage.request.v1",
            "time": at.isoformat(), "data": data}  # fmt: skip


traits = st.tuples(
    st.integers(0, 2), st.integers(0, 2), st.integers(0, 2),
    st.integers(0, 10**8), st.integers(0, 10**8), st.integers(0, 10**8),
)  # fmt: skip
# Minutes before the watermark (positive) or after it (negative: read raw, never rolled up); or, as a string,
# a UTC time of day in the hours that Kolkata's and Kathmandu's midnights cut (18:30, 18:15), its latest
# occurrence below the watermark.
minutes = st.one_of(
    st.integers(1, SPAN_H * 60), st.integers(-59, 0), st.integers(18 * 60, 19 * 60 - 1).map(str)
)  # fmt: skip
events = st.lists(st.tuples(minutes, traits), min_size=20, max_size=150)
late = st.lists(st.tuples(st.integers(1, SPAN_H * 60), traits), max_size=12)  # below the watermark: dirty hours
offsets = st.one_of(st.integers(-2, SPAN_H + 2).map(lambda h: h * 60), st.integers(-150, SPAN_H * 60 + 150),
                    st.just(SPAN_H * 60))  # fmt: skip


@st.composite
def questions(draw: st.DrawFn) -> dict[str, Any]:
    """A question as offsets from the watermark (minutes; whole hours half the time) and its other parts."""
    one, other = draw(offsets), draw(st.one_of(offsets, st.integers(-70, 0), st.just(0)))
    start, end = max(one, other), min(one, other)
    if start == end:  # the range [watermark - start, watermark - end) must not be empty
        end = start - draw(st.integers(1, 600))
    every_org = draw(st.booleans()) and draw(st.booleans())
    optional_ids = lambda values: st.sampled_from([None, None, None, *values]).map(lambda v: v and [v])  # noqa: E731
    return {
        "start": start, "end": end, "every_org": every_org,
        "granularity": None if every_org else draw(st.sampled_from(["HOUR", "HOUR", "DAY", "DAY", "MINUTE", "MONTH"])),
        "time_zone": draw(st.sampled_from(ZONES)),
        "group_by": frozenset(draw(st.just({"model"}) | st.just(set()) | st.sets(st.sampled_from(DIMENSIONS)))),
        "models": draw(optional_ids(MODELS)),
        "project_ids": draw(optional_ids([p for p in PROJECTS if p])),
        "api_key_ids": draw(optional_ids([k for k in KEYS if k])),
        "spend": draw(st.booleans()),
    }  # fmt: skip


async def seed(database_url: str, batch: list[Any], later: list[Any]) -> tuple[str, dt.datetime]:
    """A new org with ``batch`` written and rolled up, then ``later`` written (dirty hours): (org, watermark)."""
    org = f"sel{uuid.uuid4().hex[:8]}"
    now = dt.datetime.now(dt.UTC)
    window = TimeWindow.around(now, retention_days=30)
    engine = create_engine(database_url, pool_size=2)
    try:
        async with engine.connect() as connection:
            watermark = (await watermarks(connection)).materialized_through or floor_hour(now)
        writer = EventWriter(engine, None, None, IngestMetrics(get_meter("test_usage_selection")))
        counter = itertools.count()

        def at(minutes_before: int | str) -> dt.datetime:
            if isinstance(minutes_before, str):  # a time of day
                day = dt.datetime.combine(watermark.date(), dt.time(), dt.UTC) + dt.timedelta(
                    minutes=int(minutes_before)
                )
                return day if day < watermark else day - dt.timedelta(days=1)
            return min(watermark - dt.timedelta(minutes=minutes_before), now - dt.timedelta(seconds=1))

        first = [usage_event(org, next(counter), at(m), pick) for m, pick in batch]
        await writer.write([validate(e, window) for e in first], channel="http")
        await run_cycle(engine, now)  # rolls up the first events (their hours below M)
        async with engine.connect() as connection:
            through = (await watermarks(connection)).materialized_through
        assert through is not None
        if later:  # late events: their hours below M become dirty until the next cycle
            second = [usage_event(org, next(counter), at(m), pick) for m, pick in later]
            await writer.write([validate(e, window) for e in second], channel="http")
    finally:
        await engine.dispose()
    return org, through


def usage_query(org: str, through: dt.datetime, question: dict[str, Any]) -> UsageQuery:
    return UsageQuery(
        org_id=None if question["every_org"] else org,
        start=through - dt.timedelta(minutes=question["start"]),
        end=through - dt.timedelta(minutes=question["end"]),
        **{k: question[k] for k in ("granularity", "time_zone", "group_by", "models", "project_ids", "api_key_ids",
                                    "spend")},
    )  # fmt: skip


async def compare(database_url: str, batch: list[Any], later: list[Any], asked: list[dict[str, Any]]) -> None:
    org, through = await seed(database_url, batch, later)
    connection = await asyncpg.connect(database_url, server_settings=SESSION)
    try:
        for question in asked:
            query = usage_query(org, through, question)
            full_sql, full_args = usage_statement(dataclasses.replace(query, spend=True), through, everything=True)
            lean_sql, lean_args = usage_statement(query, through)
            assert lean_args == full_args
            full = [tuple(r) for r in await connection.fetch(full_sql, *full_args)]
            lean = [tuple(r) for r in await connection.fetch(lean_sql, *lean_args)]
            if query.spend:
                assert lean == full, (question, lean_sql)
            else:  # spend and unpriced are not asked for: None and False, every other column equal
                assert [r[:9] for r in lean] == [r[:9] for r in full], (question, lean_sql)
                assert all(r[9] is None and r[10] is False for r in lean)
    finally:
        await connection.close()


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=events, later=late, asked=st.lists(questions(), min_size=1, max_size=12))
def test_the_selection_aware_statement_gives_the_full_statements_rows(
    priced_database: str, batch: list[Any], later: list[Any], asked: list[dict[str, Any]]
) -> None:
    asyncio.run(compare(priced_database, batch, later, asked))


def test_the_dashboard_question_reads_the_per_model_rollup_alone() -> None:
    """HOUR by model, whole rolled-up hours, no spend: no prices, no raw edges or split hours, no regrouping of
    rollup rows; the dirty hours are still read from raw events."""
    watermark = dt.datetime(2026, 11, 30, 12, tzinfo=dt.UTC)
    query = UsageQuery(org_id="o", start=watermark - 720 * HOUR, end=watermark, granularity="HOUR",
                       group_by=frozenset({"model"}), spend=False)  # fmt: skip
    sql, _ = usage_statement(query, watermark)
    assert "model_prices" not in sql and "unnest" not in sql and "e.event_time >= $2" not in sql
    assert "FROM usage_hourly_model h\n" in sql and "rollup_dirty" in sql
    rollup_branch = sql[
        sql.index("FROM usage_hourly_model") : sql.index("UNION ALL", sql.index("FROM usage_hourly_model"))
    ]
    assert "GROUP BY" not in rollup_branch
    across = dataclasses.replace(query, end=watermark + 90 * dt.timedelta(minutes=1), spend=True)
    sql, _ = usage_statement(across, watermark)
    assert "model_prices" in sql and "e.event_time >= $2" in sql


USAGE = 'query($r: TimeRange!) {{ usage(orgId: "{org}", range: $r, granularity: HOUR, groupBy: [MODEL]) {{ {body} }} }}'
BODIES = {
    "series { start group { model } requests inputTokens cachedInputTokens outputTokens }": False,
    "totals { requests } series { n: requests } freshness { status }": False,
    "series { spend }": True,
    "totals { s: spend }": True,
    "unpricedModels": True,
    "...F } } fragment F on UsageReport { series { ... on UsageBucket { spend }": True,
    "...F } } fragment F on UsageReport { series { requests": False,
}


@pytest.mark.parametrize("body", BODIES)
async def test_the_resolver_reads_prices_only_when_the_query_selects_what_needs_them(
    client: httpx.AsyncClient, make_token: TokenFactory, statements: list[str], body: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    window = {"from": (now - 24 * HOUR).isoformat(), "to": now.isoformat()}
    document = USAGE.format(org="org_sel", body=body)
    response = (await graphql(client, document, make_token("org_admin", org="org_sel"), {"r": window})).json()
    await asyncio.sleep(0)  # the driver hands its log records over with call_soon
    assert "errors" not in response, response
    usage = [s for s in statements if "usage_hourly" in s]
    assert len(usage) == 1
    assert ("FROM model_prices" in usage[0]) is BODIES[body]
