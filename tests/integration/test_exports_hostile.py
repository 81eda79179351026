"""The export API under hostile arguments: every refusal is a clear code that names the problem, never INTERNAL,
and nothing is created by a refused request."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import TokenFactory
from tests.helpers import graphql

COST = "mutation($i: CostExportInput!) { requestCostExport(input: $i) { id status } }"
INCIDENT = "mutation($i: IncidentExportInput!) { requestIncidentExport(input: $i) { id status } }"
JOBS = "query($f: Int!, $a: String, $o: ID) { exportJobs(first: $f, after: $a, orgId: $o) { edges { node { id } } } }"
JOB = "query($id: ID!) { exportJob(id: $id) { id } }"
CANCEL = "mutation($id: ID!) { cancelExportJob(id: $id) { id status } }"
WINDOW = {"from": "2026-11-01T00:00:00Z", "to": "2026-11-02T00:00:00Z"}


async def ask(client: httpx.AsyncClient, token: str, query: str, variables: dict[str, Any]) -> tuple[str, str]:
    body = (await graphql(client, query, token, variables)).json()
    assert body.get("data") is None or not any(body["data"].values()), body
    error = body["errors"][0]
    return error["extensions"]["code"], error["message"]


@pytest.mark.parametrize(
    ("variables", "says"),
    [
        ({"i": {"orgId": "org_h", "month": "2026-13"}}, "is not YYYY-MM"),
        ({"i": {"orgId": "org_h", "month": "9999-12"}}, "has not started"),
        ({"i": {"orgId": "org_h", "month": "0000-01"}}, "before"),
        ({"i": {"orgId": "org_h", "month": "2026-1\x00"}}, "is not YYYY-MM"),
        ({"i": {"orgId": "org_h", "month": "x" * 100_000}}, "is not YYYY-MM"),
        ({"i": {"orgId": "org_h", "idempotencyKey": "k" * 10_000}}, "longer than"),
        ({"i": {"orgId": "org_h", "idempotencyKey": "a\x00b"}}, "NUL"),
        ({"i": {"orgId": "org_h", "idempotencyKey": ""}}, "empty"),
    ],
)
async def test_cost_requests_refused_with_the_reason(
    client: httpx.AsyncClient, make_token: TokenFactory, variables: dict[str, Any], says: str
) -> None:
    code, message = await ask(client, make_token("finance", org="org_h"), COST, variables)
    assert code == "BAD_USER_INPUT" and says in message, message


@pytest.mark.parametrize(
    ("variables", "says"),
    [
        ({"orgId": "org_h", "range": {"from": WINDOW["to"], "to": WINDOW["from"]}}, "before"),
        ({"orgId": "org_h", "range": {"from": WINDOW["from"], "to": WINDOW["from"]}}, "before"),
        ({"orgId": "org_h", "range": {"from": "0001-01-01T00:00:00Z", "to": WINDOW["to"]}}, "between"),
        ({"orgId": "org_h", "range": WINDOW, "filter": {"models": [f"m{n}" for n in range(101)]}}, "more than 100"),
        ({"orgId": "org_h", "range": WINDOW, "filter": {"projectIds": ["p\x00"]}}, "NUL"),
        ({"orgId": "org_h", "range": WINDOW, "filter": {"apiKeyIds": ["k" * 5000]}}, "longer than"),
    ],
)
async def test_incident_requests_refused_with_the_reason(
    client: httpx.AsyncClient, make_token: TokenFactory, variables: dict[str, Any], says: str
) -> None:
    code, message = await ask(client, make_token("engineer", org="org_h"), INCIDENT, {"i": variables})
    assert code == "BAD_USER_INPUT" and says in message, message


@pytest.mark.parametrize("org", ["org\x00h", "o" * 10_000, ""])
async def test_hostile_org_ids_are_refused(client: httpx.AsyncClient, make_token: TokenFactory, org: str) -> None:
    admin = make_token("platform_admin")
    for query, variables in ((COST, {"i": {"orgId": org}}), (INCIDENT, {"i": {"orgId": org, "range": WINDOW}}),
                             (JOBS, {"f": 5, "o": org})):  # fmt: skip
        code, _ = await ask(client, admin, query, variables)
        assert code == "BAD_USER_INPUT"


async def test_listing_and_job_ids_refused_with_the_reason(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    token = make_token("org_admin", org="org_h")
    for first in (0, -1, 101, 2**31 - 1):
        code, message = await ask(client, token, JOBS, {"f": first})
        assert code == "BAD_USER_INPUT" and "first" in message
    for cursor in ("garbage", "x" * 10_000, "\x00", "eyJhIjoxfQ"):
        code, _ = await ask(client, token, JOBS, {"f": 5, "a": cursor})
        assert code == "BAD_USER_INPUT"
    code, _ = await ask(client, token, JOBS, {"f": 5, "o": "another_org"})
    assert code == "FORBIDDEN"
    for bad in ("not-a-uuid", "1" * 10_000, "\x00", ""):
        for query in (JOB, CANCEL):
            code, _ = await ask(client, token, query, {"id": bad})
            assert code == "BAD_USER_INPUT", (query, bad)
    code, message = await ask(client, token, CANCEL, {"id": str(uuid.uuid4())})
    assert code == "NOT_FOUND" and "does not exist" in message


async def test_expired_and_missing_tokens(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    expired = make_token("finance", org="org_h", ttl=-10)
    code, _ = await ask(client, expired, COST, {"i": {"orgId": "org_h"}})
    assert code == "UNAUTHENTICATED"
    body = (await graphql(client, COST, None, {"i": {"orgId": "org_h"}})).json()
    assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_download_route_refuses_probes(client: httpx.AsyncClient) -> None:
    for path in ("/exports/download/exports/org_h/2026/11/x.csv", "/exports/download/../../etc/passwd",
                 "/exports/download/exports/org_h/2026/11/x.csv?expires=9999999999&sig=AAAA",
                 "/exports/download/exports/org_h/2026/11/x.csv?expires=nan&sig=%00",
                 "/exports/download/" + "a/" * 2000,
                 "/exports/download/exports/org_h/2026/11/x.csv%00?expires=9999999999&sig=AAAA",
                 "/exports/download/exports/org_h/2026/11/x.csv%0A?expires=9999999999&sig=AAAA",
                 "/exports/download/exports/org_h/2026/11/x.csv?expires=" + "9" * 5000 + "&sig=" + "A" * 5000,
                 "/exports/download/exports/org_h/2026/11/x.csv?expires=-1&sig=&sig=AAAA",
                 "/exports/download/%2Fetc%2Fpasswd?expires=9999999999&sig=AAAA"):  # fmt: skip
        response = await client.get(path)
        assert response.status_code in (403, 404), (path, response.status_code)
