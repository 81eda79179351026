"""Authentication and authorization over GraphQL, end to end on the real app."""

from __future__ import annotations

import time
import uuid
import warnings

import httpx
import jwt
import pytest
from sqlalchemy import text

from gateway.resources import Resources
from tests.conftest import TEST_JWT_SECRET, TokenFactory
from tests.helpers import graphql

VIEWER = "{ viewer { subject orgId roles scopes } }"


async def test_viewer_returns_claims_and_role_scopes(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    response = await graphql(client, VIEWER, make_token("finance", org="org_a", sub="alice"))
    assert response.status_code == 200
    assert response.json() == {
        "data": {
            "viewer": {
                "subject": "alice",
                "orgId": "org_a",
                "roles": ["finance"],
                "scopes": ["USAGE_READ", "SPEND_READ", "EXPORTS_READ", "COST_EXPORT_WRITE"],
            }
        }
    }


def _signed(claims: dict[str, object], key: str = TEST_JWT_SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def _claims(**overrides: object) -> dict[str, object]:
    return {"sub": "mallory", "roles": ["platform_admin"], "exp": int(time.time()) + 600} | overrides


def _alg_none_token() -> str:
    return jwt.encode(_claims(), key="", algorithm="none")  # type: ignore[arg-type]


def _hs512_token() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return _signed(_claims(), algorithm="HS512")


BAD_TOKENS = {
    "expired": lambda: _signed(_claims(exp=int(time.time()) - 10)),
    "bad signature": lambda: _signed(_claims(), key="another-secret-" + "y" * 32),
    "alg none": _alg_none_token,
    "no exp": lambda: _signed({"sub": "mallory", "roles": ["platform_admin"]}),
    "HS512": lambda: _hs512_token(),
    "garbage": lambda: "not.a.jwt",
    "roles not a list": lambda: _signed(_claims(roles="platform_admin")),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_tokens_get_401_unauthenticated(client: httpx.AsyncClient, case: str) -> None:
    response = await graphql(client, VIEWER, BAD_TOKENS[case]())
    _assert_unauthenticated(response)


async def test_missing_token_gets_401(client: httpx.AsyncClient) -> None:
    _assert_unauthenticated(await graphql(client, VIEWER, None))
    response = await client.post("/graphql", json={"query": VIEWER}, headers={"Authorization": "Basic abc"})
    _assert_unauthenticated(response)


def _assert_unauthenticated(response: httpx.Response) -> None:
    assert response.status_code == 401
    body = response.json()
    assert body["data"] is None
    assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_wrong_audience_is_refused_when_configured(settings, make_token: TokenFactory) -> None:  # type: ignore[no-untyped-def]
    from asgi_lifespan import LifespanManager

    from gateway.app import create_app

    app = create_app(settings.model_copy(update={"jwt_audience": "analytics", "jwt_issuer": "https://idp.test"}))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
            good = make_token("viewer", org="o", audience="analytics", issuer="https://idp.test")
            wrong_aud = make_token("viewer", org="o", audience="billing", issuer="https://idp.test")
            wrong_iss = make_token("viewer", org="o", audience="analytics", issuer="https://evil.test")
            no_aud = make_token("viewer", org="o", issuer="https://idp.test")
            assert (await graphql(http, VIEWER, good)).status_code == 200
            for token in (wrong_aud, wrong_iss, no_aud):
                _assert_unauthenticated(await graphql(http, VIEWER, token))


@pytest.fixture
async def export_job_id(settings) -> str:  # type: ignore[no-untyped-def]
    """An export job of org_a, inserted directly (the exports runner comes later)."""
    from db.engine import create_engine

    engine = create_engine(settings.database_url.get_secret_value(), pool_size=1)
    job_id = str(uuid.uuid4())
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO export_jobs (id, org_id, kind, requested_by, range_from, range_to, totals, row_count) "
                "VALUES (:id, 'org_a', 'COST', 'alice', '2026-11-01T00:00Z', '2026-11-29T00:00Z', "
                '\'{"requests": 3000000000, "input_tokens": 9007199254740993, "cached_input_tokens": 0, '
                '"output_tokens": 1, "spend": "12.5000025"}\', 42)'
            ),
            {"id": job_id},
        )
    await engine.dispose()
    return job_id


EXPORT_JOB = """query($id: ID!) {
  viewer { subject }
  exportJob(id: $id) { id orgId kind status totals { requests inputTokens spend } }
}"""


async def test_field_without_scope_is_null_with_forbidden_and_siblings_returned(
    client: httpx.AsyncClient, make_token: TokenFactory, export_job_id: str
) -> None:
    response = await graphql(client, EXPORT_JOB, make_token("viewer", org="org_a", sub="vic"), {"id": export_job_id})
    body = response.json()
    assert response.status_code == 200
    assert body["data"] == {"viewer": {"subject": "vic"}, "exportJob": None}
    [error] = body["errors"]
    assert error["path"] == ["exportJob"]
    assert error["extensions"]["code"] == "FORBIDDEN"


async def test_org_access_is_enforced(client: httpx.AsyncClient, make_token: TokenFactory, export_job_id: str) -> None:
    other_org = await graphql(client, EXPORT_JOB, make_token("finance", org="org_b"), {"id": export_job_id})
    body = other_org.json()
    assert body["data"]["exportJob"] is None
    assert body["errors"][0]["extensions"]["code"] == "FORBIDDEN"

    own_org = await graphql(client, EXPORT_JOB, make_token("finance", org="org_a"), {"id": export_job_id})
    platform = await graphql(client, EXPORT_JOB, make_token("platform_finance"), {"id": export_job_id})
    expected = {
        "id": export_job_id,
        "orgId": "org_a",
        "kind": "COST",
        "status": "QUEUED",
        "totals": {"requests": 3000000000, "inputTokens": 9007199254740993, "spend": "12.5000025"},
    }
    assert own_org.json() == {"data": {"viewer": {"subject": "test-user"}, "exportJob": expected}}
    assert platform.json()["data"]["exportJob"] == expected


async def test_bad_input_gets_bad_user_input(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    token = make_token("org_admin", org="org_a")
    malformed = (await graphql(client, EXPORT_JOB, token, {"id": "not-a-uuid"})).json()
    assert malformed["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    unknown_field = (await graphql(client, "{ viewer { nope } }", token)).json()
    assert unknown_field["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    missing = (await graphql(client, EXPORT_JOB, token, {"id": str(uuid.uuid4())})).json()
    assert missing["data"]["exportJob"] is None and "errors" not in missing


async def test_deep_queries_are_refused_as_too_complex(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    query = "{ " + " ".join(f"a{i}: viewer {{ subject }}" for i in range(60)) + " }"
    body = (await graphql(client, query, make_token("viewer", org="o"))).json()
    assert body["errors"][0]["extensions"]["code"] == "QUERY_TOO_COMPLEX"


async def test_browser_get_opens_graphiql_without_token(client: httpx.AsyncClient) -> None:
    response = await client.get("/graphql", headers={"Accept": "text/html"})
    assert response.status_code == 200
    assert "graphiql" in response.text.lower()


async def test_get_query_needs_token(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    _assert_unauthenticated(await client.get("/graphql", params={"query": VIEWER}))
    headers = {"Authorization": f"Bearer {make_token('viewer', org='o', sub='g')}"}
    response = await client.get("/graphql", params={"query": "{ viewer { subject } }"}, headers=headers)
    assert response.json() == {"data": {"viewer": {"subject": "g"}}}


async def test_request_id_is_returned_and_kept(client: httpx.AsyncClient) -> None:
    generated = await client.get("/healthz")
    assert len(generated.headers["x-request-id"]) == 32
    kept = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert kept.headers["x-request-id"] == "abc-123"
    replaced = await client.get("/healthz", headers={"X-Request-ID": "bad id\nwith newline"})
    assert replaced.headers["x-request-id"] != "bad id\nwith newline"


async def test_bad_literals_and_token_floods_are_client_errors(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = make_token("org_admin", org="org_a")
    literal = (await graphql(client, "{ exportJob(id: 12.5) { id } }", token)).json()
    assert literal["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    flood = "{ viewer { " + " ".join(["subject"] * 6000) + " } }"
    assert (await graphql(client, flood, token)).json()["errors"][0]["extensions"]["code"] == "QUERY_TOO_COMPLEX"


async def test_every_operation_is_audited_with_caller_org_and_outcome(
    client: httpx.AsyncClient, make_token: TokenFactory, resources: Resources
) -> None:
    subject = f"auditor-{uuid.uuid4().hex[:6]}"
    ok = await graphql(client, "query Who { viewer { subject } }", make_token("viewer", org="org_a", sub=subject))
    assert ok.status_code == 200
    job = "query($id: ID!) { exportJob(id: $id) { id } }"
    await graphql(client, job, make_token("viewer", org="org_a", sub=subject), {"id": str(uuid.uuid4())})
    await resources.audit.flush()
    async with resources.engine.connect() as connection:
        rows = (
            await connection.execute(
                text("SELECT action, target, outcome, detail FROM audit_log WHERE actor = :s ORDER BY id"),
                {"s": subject},
            )
        ).all()
    assert [(r.action, r.target, r.outcome) for r in rows] == [
        ("graphql.query", "viewer", "ok"),
        ("graphql.query", "exportJob", "error: FORBIDDEN"),
    ]
    assert rows[0].detail == {"fields": ["viewer"], "orgs": [], "operation_name": "Who"}
