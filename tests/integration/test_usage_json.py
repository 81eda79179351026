"""The series that PostgreSQL writes as JSON (db/usage_json.py) is the series that Python builds from rows.

Statement level: hypothesis generates the data (events through the real writer, rolled up, then late events
that make hours dirty; see test_usage_selection), the questions (ranges below the watermark, across it, cut
hours, every granularity, groupings, filters, with and without spend) and the selections (columns in any
order under any key, the group object, ``__typename``, nulls for fields the caller may not see), and compares
``usage_json`` with ``build_report`` over the full statement's rows, item by item, with totals and unpriced
models. API level: the same documents answered with the JSON path on and off give identical bodies, errors
included, and the JSON statement is the one that ran where it applies.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
import re
import uuid
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.metrics import get_meter
from starlette.applications import Starlette

import resolvers.usage
from db.engine import create_engine
from db.usage import UsageQuery, usage_records
from db.usage_json import Column, Constant, SeriesSpec, renders, usage_json, usage_json_statement
from ingest.events import ID_PATTERN, MODEL_PATTERN, TimeWindow, validate
from ingest.metrics import IngestMetrics
from ingest.synthetic import Traffic, generate
from ingest.writer import EventWriter
from resolvers.usage_report import SeriesItem, build_report
from schema.json import OPTIONS
from schema.scalars import serialize_decimal
from tests.conftest import TokenFactory
from tests.helpers import graphql
from tests.integration.test_usage_selection import (
    events,
    late,
    questions,
    seed,
    usage_event,
    usage_query,
)

HOUR = dt.timedelta(hours=1)
BUCKET = ("start", "end", "requests", "input_tokens", "cached_input_tokens", "output_tokens", "total_tokens", "spend")
GROUP = ("model", "project_id", "api_key_id")
KEYS = ("a", "b", "start", "n", "spend", "x_1", "group", "requests", "__t")


def _entries(names: tuple[str, ...], nested: st.SearchStrategy[Any] | None) -> st.SearchStrategy[SeriesSpec]:
    value = st.one_of(
        st.sampled_from(names).map(Column),
        st.sampled_from(['"UsageBucket"', "null", '"with % and \\"quote\\""']).map(Constant),
        *([nested] if nested is not None else []),
    )
    pairs = st.lists(st.tuples(st.sampled_from(KEYS), value), min_size=1, max_size=10, unique_by=lambda p: p[0])
    return pairs.map(lambda entries: SeriesSpec(tuple(entries)))


specs = _entries(BUCKET, _entries(GROUP, None))


def expected_item(item: SeriesItem, spec: SeriesSpec, source: object) -> dict[str, Any]:
    """What the Python path answers for ``spec``: each column serialized as the API serializes it."""
    out: dict[str, Any] = {}
    for key, value in spec.entries:
        if isinstance(value, Column):
            raw = getattr(source, value.name)
            if isinstance(raw, dt.datetime):
                out[key] = orjson.loads(orjson.dumps(raw.astimezone(dt.UTC), option=OPTIONS))
            elif isinstance(raw, decimal.Decimal):
                out[key] = serialize_decimal(raw)
            else:
                out[key] = raw
        elif isinstance(value, Constant):
            out[key] = json.loads(value.json)
        else:
            out[key] = expected_item(item, value, item.group)
    return out


async def compare(
    database_url: str, batch: list[Any], later: list[Any], asked: list[tuple[dict[str, Any], SeriesSpec]]
) -> None:
    org, through = await seed(database_url, batch, later)
    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as connection:
            for question, spec in asked:
                query = usage_query(org, through, question)
                if not renders(query):
                    continue
                report = build_report(query, await usage_records(connection, query, through))
                got = await usage_json(connection, query, through, spec)
                assert orjson.loads(f"[{got.series}]") == [expected_item(i, spec, i) for i in report.series], question
                totals = report.totals
                assert (got.requests, got.input_tokens, got.cached_input_tokens, got.output_tokens, got.spend) == (
                    totals.requests, totals.input_tokens, totals.cached_input_tokens, totals.output_tokens,
                    totals.spend,
                ), question  # fmt: skip
                assert got.unpriced_models == report.unpriced_models, question
    finally:
        await engine.dispose()


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    batch=events,
    later=late,
    asked=st.lists(st.tuples(questions().filter(lambda q: not q["every_org"]), specs), min_size=1, max_size=10),
)
def test_the_json_that_postgresql_writes_is_the_series_that_python_builds(
    priced_database: str, batch: list[Any], later: list[Any], asked: list[tuple[dict[str, Any], SeriesSpec]]
) -> None:
    asyncio.run(compare(priced_database, batch, later, asked))


async def test_a_dirty_hour_sends_the_question_back_to_raw_events(priced_database: str) -> None:
    """Whole rolled-up hours are read from the rollups alone, unless the same snapshot shows a dirty hour: then
    the late event counts at once (the answer is asked again with raw events)."""
    pick = (0, 0, 0, 100, 10, 5)
    org, through = await seed(priced_database, [(m, pick) for m in (90, 150, 200)], [])
    query = UsageQuery(org_id=org, start=through - 4 * HOUR, end=through, granularity="HOUR",
                       group_by=frozenset({"model"}), spend=True)  # fmt: skip
    spec = SeriesSpec((("n", Column("requests")),))
    lean_sql, _ = usage_json_statement(query, through, spec)
    full_sql, _ = usage_json_statement(query, through, spec, rollups_alone=False)
    assert "FROM raw" not in lean_sql and "FROM raw" in full_sql
    engine = create_engine(priced_database, pool_size=1)
    try:
        async with engine.connect() as connection:
            assert orjson.loads(f"[{(await usage_json(connection, query, through, spec)).series}]") == [{"n": 1}] * 3
        writer = EventWriter(engine, None, None, IngestMetrics(get_meter("test_usage_json")))
        now = dt.datetime.now(dt.UTC)
        late_event = usage_event(org, 1_000, through - 90 * dt.timedelta(minutes=1), pick)
        await writer.write([validate(late_event, TimeWindow.around(now, retention_days=30))], channel="http")
        async with engine.connect() as connection:
            raw = (await connection.get_raw_connection()).driver_connection
            sent: list[str] = []
            raw.add_query_logger(lambda record: sent.append(record.query))
            got = await usage_json(connection, query, through, spec)
            await asyncio.sleep(0)  # the driver hands its log records over with call_soon
    finally:
        await engine.dispose()
    assert orjson.loads(f"[{got.series}]") == [{"n": 1}, {"n": 1}, {"n": 2}] and got.requests == 4
    assert [s for s in sent if "string_agg" in s] == [lean_sql, full_sql]


@pytest.fixture(scope="module")
async def org(app: Starlette, make_token: TokenFactory) -> str:
    """An org with traffic over the last 30 hours, posted over HTTP (4 models, projects and API keys)."""
    tag = uuid.uuid4().hex[:6]
    traffic = Traffic(seed=11, events=300, orgs=1, models=4, span=dt.timedelta(hours=30), org_prefix=f"js{tag}",
                      source=f"//json-test/{tag}")  # fmt: skip
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as http:
        response = await http.post(
            "/v1/events", content=json.dumps(list(generate(traffic))).encode(),
            headers={"Authorization": f"Bearer {make_token('ingest')}",
                     "Content-Type": "application/cloudevents-batch+json"},
        )  # fmt: skip
        assert response.json()["accepted"] == 300
    return f"js{tag}_0000"


NOW = dt.datetime.now(dt.UTC)
WHOLE_HOURS = {"from": (NOW - 20 * HOUR).replace(minute=0, second=0, microsecond=0).isoformat(),
               "to": NOW.replace(minute=0, second=0, microsecond=0).isoformat()}  # fmt: skip
ACROSS = {"from": (NOW - 22 * HOUR - dt.timedelta(minutes=17)).isoformat(), "to": (NOW + HOUR).isoformat()}
QUESTION = "query($org: ID!, $r: TimeRange!{yes}) {{ usage(orgId: $org, range: $r, {args}) {{ {body} }} }}"
# (arguments, selection, whether PostgreSQL writes the series)
DOCUMENTS = [
    (
        "granularity: HOUR, groupBy: [MODEL]",
        "series { start group { model } requests inputTokens cachedInputTokens outputTokens }",
        True,
    ),
    (
        "granularity: HOUR, groupBy: [MODEL]",
        "totals { requests inputTokens cachedInputTokens outputTokens totalTokens "
        "spend } series { start end group { model } requests inputTokens cachedInputTokens outputTokens totalTokens "
        "spend } unpricedModels freshness { orgId }",
        True,
    ),
    (
        "granularity: HOUR",
        "series { __typename when: start ...B group { __typename m: model p: projectId } "
        "... on UsageBucket { n: requests spend } t: totalTokens @include(if: $yes) o: outputTokens @skip(if: $yes) } "
        "} } fragment B on UsageBucket { end n: requests group { apiKeyId",
        True,
    ),
    (
        "granularity: HOUR, groupBy: [PROJECT, API_KEY]",
        "series { start group { projectId apiKeyId model } requests spend }",
        True,
    ),
    ("granularity: MINUTE", "series { start end requests }", True),
    ("granularity: DAY, groupBy: [API_KEY, MODEL]", "series { start end group { apiKeyId model } spend }", True),
    ("granularity: MONTH", "series { start end requests totalTokens }", True),
    ('granularity: DAY, timeZone: "Asia/Kolkata"', "series { start end requests }", False),  # a zone's DAY
    ("granularity: HOUR", "a: series { requests } b: series { start }", False),  # two keys
    ("granularity: HOUR", "series { __typename }", True),
]


@pytest.mark.parametrize("window", [WHOLE_HOURS, ACROSS], ids=["whole-hours", "across-the-watermark"])
@pytest.mark.parametrize(("args", "body", "rendered"), DOCUMENTS)
@pytest.mark.parametrize("role", ["org_admin", "engineer"])  # engineer: spend is FORBIDDEN, null in every item
async def test_the_api_answers_alike_with_and_without_the_json_path(
    client: httpx.AsyncClient, make_token: TokenFactory, statements: list[str], monkeypatch: pytest.MonkeyPatch,
    org: str, window: dict[str, str], args: str, body: str, rendered: bool, role: str,
) -> None:  # fmt: skip
    yes = "$yes" in body
    document = QUESTION.format(args=args, body=body, yes=", $yes: Boolean!" if yes else "")
    variables = {"org": org, "r": window} | ({"yes": True} if yes else {})
    token = make_token(role, org=org)
    fast = (await graphql(client, document, token, variables)).json()
    await asyncio.sleep(0)  # the driver hands its log records over with call_soon
    used_json = any("string_agg(format(" in s for s in statements)
    monkeypatch.setattr(resolvers.usage, "SERIES_FROM_SQL", False)
    python = (await graphql(client, document, token, variables)).json()
    assert fast == python
    assert used_json is rendered, fast
    series = [v for k, v in fast["data"]["usage"].items() if isinstance(v, list) and k != "unpricedModels"]
    assert series and all(series), fast  # something to compare
    if role == "engineer" and "spend" in body:
        assert {e["extensions"]["code"] for e in fast["errors"]} == {"FORBIDDEN"}
    else:
        assert "errors" not in fast, fast


def test_identifiers_need_no_json_escapes() -> None:
    """Models, projects and API keys are written into JSON strings unescaped (db/usage_json.py): ingest must
    refuse every character that JSON escapes (the quote, the backslash, U+0000 to U+001F)."""
    escaped = ['"', "\\", *map(chr, range(0x20))]
    for pattern in (ID_PATTERN, MODEL_PATTERN):
        assert re.fullmatch(pattern, "gpt-4o") is not None
        assert [c for c in escaped if re.fullmatch(pattern, f"a{c}b")] == [], pattern


async def test_the_gateway_session_writes_timestamps_in_iso(empty_database: str) -> None:
    """Bucket times go into JSON as PostgreSQL's text of a timestamp: DateStyle ISO even where the database's
    default is another."""
    name = empty_database.rsplit("/", 1)[1].split("?")[0]
    engine = create_engine(empty_database, pool_size=1)
    try:
        async with engine.begin() as connection:
            await connection.exec_driver_sql(f"ALTER DATABASE \"{name}\" SET DateStyle = 'SQL, DMY'")
        await engine.dispose()  # new sessions from here on
        async with engine.connect() as connection:
            shown = (await connection.exec_driver_sql("SHOW DateStyle")).scalar()
            text = (await connection.exec_driver_sql("SELECT '2026-11-30 15:00+00'::timestamptz::text")).scalar()
    finally:
        await engine.dispose()
    assert (shown, text) == ("ISO, MDY", "2026-11-30 15:00:00+00")


def ask(org: str, fields: str, args: str = "") -> str:
    """A usage question of HOUR buckets over ``$r`` selecting ``fields`` of the series."""
    head = f'query($r: TimeRange!) {{ usage(orgId: "{org}", range: $r, granularity: HOUR{args})'
    return head + f" {{ series {{ {fields} }} }} }}"


HOSTILE = [  # (org: None for the caller's own, extra arguments, the error's code)
    ("someone_else", "", "FORBIDDEN"),  # another org's id
    (None, ', filter: {models: ["gpt\\u0000"]}', "BAD_USER_INPUT"),  # a NUL
    (None, ', filter: {models: ["gpt-4o\\n"]}', "BAD_USER_INPUT"),  # a trailing newline
]


@pytest.mark.parametrize(("asked", "args", "code"), HOSTILE)
async def test_hostile_questions_get_their_error_and_run_no_json_statement(
    client: httpx.AsyncClient, make_token: TokenFactory, statements: list[str], org: str, asked: str | None,
    args: str, code: str,
) -> None:  # fmt: skip
    document = ask(asked or org, "requests", args)
    body = (await graphql(client, document, make_token("org_admin", org=org), {"r": WHOLE_HOURS})).json()
    await asyncio.sleep(0)
    assert body["data"] is None and [e["extensions"]["code"] for e in body["errors"]] == [code], body
    assert not [s for s in statements if "string_agg(format(" in s]


async def test_a_huge_selection_is_refused_or_answered_alike_never_internal(
    client: httpx.AsyncClient, make_token: TokenFactory, monkeypatch: pytest.MonkeyPatch, org: str
) -> None:
    """Hundreds of aliases of one column: the request's limits refuse it, or both paths answer the same."""
    for count in (40, 400):
        fields = " ".join(f"a{i}: requests" for i in range(count))
        document = ask(org, fields)
        token = make_token("org_admin", org=org)
        fast = (await graphql(client, document, token, {"r": WHOLE_HOURS})).json()
        codes = {e["extensions"]["code"] for e in fast.get("errors", [])}
        assert "INTERNAL" not in codes, fast
        if not codes:
            with monkeypatch.context() as patch:
                patch.setattr(resolvers.usage, "SERIES_FROM_SQL", False)
                assert (await graphql(client, document, token, {"r": WHOLE_HOURS})).json() == fast


async def test_a_session_killed_mid_statement_is_unavailable_and_the_next_request_is_answered(
    client: httpx.AsyncClient, make_token: TokenFactory, database_url: str, org: str
) -> None:
    """The JSON statement's backend is terminated while it waits on a lock: the caller gets UNAVAILABLE (not
    INTERNAL), and the same question is answered once the lock is gone."""
    document, token = ask(org, "start requests"), make_token("org_admin", org=org)
    admin = await asyncpg.connect(database_url)
    blocker = await asyncpg.connect(database_url)
    try:
        await blocker.execute("BEGIN; LOCK TABLE usage_hourly_model IN ACCESS EXCLUSIVE MODE")
        asked = asyncio.ensure_future(graphql(client, document, token, {"r": WHOLE_HOURS}))
        waiting = (
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%string_agg(format(%'"
        )
        for _ in range(200):  # the request reaching the lock is an event in another process: poll for it
            pid = await admin.fetchval(waiting)
            if pid is not None:
                break
            await asyncio.sleep(0.05)
        assert pid is not None and await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        body = (await asked).json()
        await blocker.execute("ROLLBACK")
    finally:
        await blocker.close()
        await admin.close()
    assert [e["extensions"]["code"] for e in body["errors"]] == ["UNAVAILABLE"], body
    again = (await graphql(client, document, token, {"r": WHOLE_HOURS})).json()
    assert "errors" not in again and again["data"]["usage"]["series"], again
