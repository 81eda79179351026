"""``usage``, ``spendByOrg``, prices and freshness through the API: authorization,
validation, DataLoaders, subscriptions."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import text
from starlette.applications import Starlette

from gateway.resources import Resources
from ingest import freshness
from ingest.synthetic import Traffic, generate
from tests.conftest import TokenFactory
from tests.helpers import graphql

NOW = dt.datetime.now(dt.UTC)
RANGE = {"from": (NOW - dt.timedelta(days=2)).isoformat(), "to": (NOW + dt.timedelta(hours=1)).isoformat()}


@pytest.fixture(scope="module")
async def orgs(app: Starlette, make_token: TokenFactory) -> AsyncIterator[tuple[str, str]]:
    """Two orgs with traffic, posted over HTTP."""
    tag = uuid.uuid4().hex[:6]
    traffic = Traffic(seed=9, events=400, orgs=2, models=2, span=dt.timedelta(hours=30), org_prefix=f"api{tag}",
                      source=f"//api-test/{tag}")  # fmt: skip
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
        response = await http.post(
            "/v1/events", content=json.dumps(list(generate(traffic))).encode(),
            headers={"Authorization": f"Bearer {make_token('ingest')}",
                     "Content-Type": "application/cloudevents-batch+json"},
        )  # fmt: skip
        assert response.json()["accepted"] == 400
    yield f"api{tag}_0000", f"api{tag}_0001"


SPEND = """query($org: ID!, $r: TimeRange!) {
  usage(orgId: $org, range: $r, granularity: HOUR, groupBy: [MODEL]) {
    totals { requests spend } series { requests spend } unpricedModels
  }
}"""


async def test_engineer_gets_tokens_but_spend_is_forbidden_once_per_field(
    client: httpx.AsyncClient, make_token: TokenFactory, orgs: tuple[str, str]
) -> None:
    body = (await graphql(client, SPEND, make_token("engineer", org=orgs[0]), {"org": orgs[0], "r": RANGE})).json()
    usage = body["data"]["usage"]
    assert usage["totals"]["requests"] > 0 and usage["totals"]["spend"] is None
    assert len(usage["series"]) > 1 and all(b["spend"] is None and b["requests"] > 0 for b in usage["series"])
    assert usage["unpricedModels"] is None  # like every guarded field: null with a FORBIDDEN error
    paths = sorted(tuple(map(str, e["path"])) for e in body["errors"])
    assert paths == [("usage", "series", "0", "spend"), ("usage", "totals", "spend"), ("usage", "unpricedModels")]
    assert {e["extensions"]["code"] for e in body["errors"]} == {"FORBIDDEN"}


async def test_finance_sees_spend(client: httpx.AsyncClient, make_token: TokenFactory, orgs: tuple[str, str]) -> None:
    body = (await graphql(client, SPEND, make_token("finance", org=orgs[0]), {"org": orgs[0], "r": RANGE})).json()
    assert "errors" not in body
    assert body["data"]["usage"]["totals"]["spend"] is not None


async def test_viewer_of_another_org_gets_forbidden_and_no_data(
    client: httpx.AsyncClient, make_token: TokenFactory, orgs: tuple[str, str]
) -> None:
    query = "query($org: ID!, $r: TimeRange!) { usage(orgId: $org, range: $r) { totals { requests } } }"
    body = (await graphql(client, query, make_token("viewer", org=orgs[0]), {"org": orgs[1], "r": RANGE})).json()
    assert body["data"] is None
    assert body["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    fresh = "query($org: ID!) { freshness(orgId: $org) { lagSeconds } }"
    body = (await graphql(client, fresh, make_token("viewer", org=orgs[0]), {"org": orgs[1]})).json()
    assert body["data"] is None and body["errors"][0]["extensions"]["code"] == "FORBIDDEN"


async def test_platform_finance_ranks_every_org_by_spend_with_pages(
    client: httpx.AsyncClient, make_token: TokenFactory, orgs: tuple[str, str]
) -> None:
    query = """query($r: TimeRange!, $first: Int!, $after: String) {
      spendByOrg(range: $r, first: $first, after: $after) {
        edges { cursor node { orgId requests totalTokens spend } } pageInfo { hasNextPage endCursor } totalSpend
      }
    }"""
    token = make_token("platform_finance")
    everything = (await graphql(client, query, token, {"r": RANGE, "first": 500})).json()["data"]["spendByOrg"]
    nodes = [e["node"] for e in everything["edges"]]
    assert set(orgs) <= {n["orgId"] for n in nodes}
    keys = [(-float(n["spend"]), n["orgId"]) for n in nodes]
    assert keys == sorted(keys)
    paged, after = [], None
    while True:
        page = (await graphql(client, query, token, {"r": RANGE, "first": 1, "after": after})).json()
        connection = page["data"]["spendByOrg"]
        paged += [e["node"] for e in connection["edges"]]
        if not connection["pageInfo"]["hasNextPage"]:
            break
        after = connection["pageInfo"]["endCursor"]
    assert paged == nodes
    org_finance = await graphql(client, query, make_token("finance", org=orgs[0]), {"r": RANGE, "first": 5})
    assert org_finance.json()["errors"][0]["extensions"]["code"] == "FORBIDDEN"


@pytest.mark.parametrize(
    ("granularity", "hours", "words"),
    [("MINUTE", 25, "at most 24 hours"), ("HOUR", 94 * 24, "at most 93 days"), ("DAY", 401 * 24, "at most 400 days")],
)
async def test_range_limits_state_the_limit(
    client: httpx.AsyncClient, make_token: TokenFactory, granularity: str, hours: int, words: str
) -> None:
    query = 'query($r: TimeRange!, $g: Granularity!) { usage(orgId: "o", range: $r, granularity: $g) { orgId } }'
    r = {"from": (NOW - dt.timedelta(hours=hours)).isoformat(), "to": NOW.isoformat()}
    body = (await graphql(client, query, make_token("viewer", org="o"), {"r": r, "g": granularity})).json()
    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    assert words in body["errors"][0]["message"]


async def test_bad_time_zone_and_reversed_range(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    query = 'query($r: TimeRange!, $tz: String!) { usage(orgId: "o", range: $r, timeZone: $tz) { orgId } }'
    token = make_token("viewer", org="o")
    bad_zone = (await graphql(client, query, token, {"r": RANGE, "tz": "Mars/Olympus"})).json()
    assert "IANA" in bad_zone["errors"][0]["message"]
    reversed_range = {"from": RANGE["to"], "to": RANGE["from"]}
    body = (await graphql(client, query, token, {"r": reversed_range, "tz": "UTC"})).json()
    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    naive = (await graphql(client, query, token, {"r": {"from": "2026-11-01T00:00:00", "to": RANGE["to"]},
                                                    "tz": "UTC"})).json()  # fmt: skip
    assert naive["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


async def test_freshness_loads_once_per_request_and_prices_come_with_each_usage_statement(
    resources: Resources, client: httpx.AsyncClient, make_token: TokenFactory, orgs: tuple[str, str],
    statements: list[str],
) -> None:  # fmt: skip
    aliases = " ".join(
        f'u{i}: usage(orgId: "{orgs[0]}", range: $r, granularity: {g}) {{ totals {{ requests spend }} '
        f"freshness {{ lagSeconds materializedThrough }} }}"
        for i, g in enumerate(["HOUR", "DAY", "MONTH", "HOUR"])
    )
    query = f'query($r: TimeRange!) {{ {aliases} f: freshness(orgId: "{orgs[0]}") {{ status }} }}'
    await resources.cache.delete(freshness.key(orgs[0]))
    statements.clear()
    body = (await graphql(client, query, make_token("org_admin", org=orgs[0]), {"r": RANGE})).json()
    await asyncio.sleep(0)  # the driver hands its log records over with call_soon
    assert "errors" not in body, body
    # Round trips to our tables (not transaction control, nor asyncpg's one-off type introspection).
    ours = [s for s in statements if any(t in s for t in ("freshness_status", "model_prices", "usage_"))]
    freshness_loads = [s for s in ours if "freshness_status" in s]
    price_loads = [s for s in ours if "FROM model_prices" in s and "usage_hourly" not in s]
    usage_queries = [s for s in ours if "usage_hourly" in s and "FROM model_prices" in s]
    assert len(freshness_loads) == 1 and len(price_loads) == 0 and len(usage_queries) == 4
    assert len(ours) == 5, ours


UPSERT = """mutation($i: ModelPriceInput!) {
  upsertModelPrice(input: $i) { model effectiveFrom inputPerMillion outputPerMillion cachedInputPerMillion currency }
}"""


async def test_upsert_model_price_validates_audits_and_corrects(
    client: httpx.AsyncClient, make_token: TokenFactory, resources: Resources
) -> None:
    model = f"test-model-{uuid.uuid4().hex[:6]}"
    admin = make_token("platform_admin", sub="price-admin")
    price = {"model": model, "effectiveFrom": "2026-11-01T05:00:00+02:00", "inputPerMillion": "0.150",
             "outputPerMillion": "0.6"}  # fmt: skip
    created = (await graphql(client, UPSERT, admin, {"i": price})).json()
    assert created["data"]["upsertModelPrice"] == {
        "model": model, "effectiveFrom": "2026-11-01T03:00:00Z", "inputPerMillion": "0.15",
        "outputPerMillion": "0.6", "cachedInputPerMillion": "0.15", "currency": "USD",
    }  # fmt: skip
    corrected = (await graphql(client, UPSERT, admin, {"i": price | {"outputPerMillion": "0.7"}})).json()
    assert corrected["data"]["upsertModelPrice"]["outputPerMillion"] == "0.7"
    listed = (await graphql(client, "query($m: String) { modelPrices(model: $m) { outputPerMillion } }",
                            make_token("viewer", org="o"), {"m": model})).json()  # fmt: skip
    assert listed == {"data": {"modelPrices": [{"outputPerMillion": "0.7"}]}}

    for bad, words in (
        ({"effectiveFrom": "2026-11-01T03:30:00Z"}, "whole UTC hour"),
        # Found by the GraphQL fuzzer: year 1 at midnight UTC was stored as -infinity (the driver's sentinel) and
        # every read of the prices failed.
        ({"effectiveFrom": "0001-01-01T00:00:00Z"}, "effectiveFrom must lie between 0002-01-01"),
        ({"effectiveFrom": "0001-01-01T01:00:00+01:00"}, "effectiveFrom must lie between 0002-01-01"),
        ({"effectiveFrom": "9999-12-31T23:00:00-01:00"}, "out of range in UTC"),
        ({"inputPerMillion": "-1"}, "must not be negative"),
        ({"model": "bad model!"}, "does not match"),
    ):
        body = (await graphql(client, UPSERT, admin, {"i": price | bad})).json()
        assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT" and words in body["errors"][0]["message"]
    finance = (await graphql(client, UPSERT, make_token("platform_finance"), {"i": price})).json()
    assert finance["errors"][0]["extensions"]["code"] == "FORBIDDEN"

    async with resources.engine.connect() as connection:
        rows = (await connection.execute(text(
            "SELECT outcome FROM audit_log WHERE action = 'upsertModelPrice' AND actor = 'price-admin' "
            "AND detail->>'model' = :m ORDER BY id"), {"m": model})).all()  # fmt: skip
    outcomes = [r.outcome for r in rows]
    assert outcomes[:2] == ["ok", "ok"] and len(outcomes) == 6
    assert all(o.startswith("rejected:") for o in outcomes[2:])
