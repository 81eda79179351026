"""The command line: ``serve`` as a real process, ``token``, and start-up errors."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator

import asyncpg
import httpx
import jwt
import pytest
import websockets

from tests.conftest import AMQP_URL, REDIS_URL, TEST_JWT_SECRET, TokenFactory
from tests.integration.serve_support import Served, clean_env, free_port, run_cli, serve

READY_TIMEOUT_S = 60
SECRET_PASSWORD = "pw-that-must-not-leak"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ANALYTICS_AMQP_URL", "not-a-url"),
        ("ANALYTICS_PORT", "eighty"),
        ("ANALYTICS_REDIS_URL", "http://x"),
        ("ANALYTICS_ROLES", "api,wizard"),
        ("ANALYTICS_WORKERS", "0"),
    ],
)
async def test_serve_with_a_bad_setting_exits_with_one_line_naming_it(variable: str, value: str) -> None:
    code, _, stderr = await run_cli("serve", env=clean_env(**{variable: value}))
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert variable in lines[0]


async def test_serve_with_a_database_but_no_jwt_config_refuses_to_start(database_url: str) -> None:
    code, _, stderr = await run_cli("serve", env=clean_env(ANALYTICS_DATABASE_URL=database_url))
    assert code != 0
    assert "ANALYTICS_JWT_SECRET" in stderr.strip()
    assert len(stderr.strip().splitlines()) == 1


async def test_serve_reports_an_unreachable_broker_in_one_line_without_a_traceback(database_url: str) -> None:
    closed_port = free_port()
    env = clean_env(
        ANALYTICS_DATABASE_URL=database_url, ANALYTICS_JWT_SECRET=TEST_JWT_SECRET,
        ANALYTICS_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{closed_port}/", ANALYTICS_PORT=str(free_port()),
    )  # fmt: skip
    code, _, stderr = await run_cli("serve", "--role", "ingest", env=env)
    assert code != 0
    assert "Traceback" not in stderr, stderr
    failures = [json.loads(line) for line in stderr.splitlines() if "cannot connect to the broker" in line]
    assert [f["event"] for f in failures] == ["ANALYTICS_AMQP_URL: cannot connect to the broker (AMQPConnectionError)"]
    assert failures[0]["level"] == "error"


async def test_serve_with_two_workers_runs_the_roles_in_each_and_stops_them_all(database_url: str) -> None:
    env = clean_env(
        ANALYTICS_DATABASE_URL=database_url, ANALYTICS_JWT_SECRET=TEST_JWT_SECRET, ANALYTICS_LOG_LEVEL="INFO"
    )
    async with (
        serve(env, "--workers", "2", "--role", "api") as running,
        httpx.AsyncClient(base_url=running.base_url) as http,
    ):
        assert (await http.post("/graphql", json={"query": "{ viewer { subject } }"})).status_code == 401
        assert (await http.post("/v1/events", content=b"[]")).status_code == 404  # the workers' role: api
    assert running.process.returncode == 0
    assert running.process.stderr is not None
    events = [json.loads(line).get("event") for line in (await running.process.stderr.read()).decode().splitlines()]
    assert events.count("gateway.started") == 2 and events.count("gateway.stopped") == 2


async def test_serve_with_workers_needs_a_database_url() -> None:
    code, _, stderr = await run_cli("serve", "--workers", "2", env=clean_env())
    assert code != 0
    assert stderr.strip().splitlines() == [
        "error: --workers above 1 needs ANALYTICS_DATABASE_URL (the embedded database serves one process)"
    ]


async def test_token_command_signs_the_requested_claims() -> None:
    env = clean_env(ANALYTICS_JWT_SECRET=TEST_JWT_SECRET)
    code, stdout, stderr = await run_cli(
        "token", "--role", "finance", "--org", "org_a", "--sub", "bob", "--ttl", "120", env=env
    )
    assert code == 0, stderr
    claims = jwt.decode(stdout.strip(), TEST_JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "bob" and claims["org_id"] == "org_a" and claims["roles"] == ["finance"]
    assert claims["exp"] - claims["iat"] == 120
    bad = await run_cli("token", "--role", "wizard", env=env)
    assert bad[0] != 0 and "wizard" in bad[2]


@pytest.fixture
async def served(database_url: str) -> AsyncIterator[Served]:
    url_with_password = database_url.replace("postgres@", f"postgres:{SECRET_PASSWORD}@")
    env = clean_env(
        ANALYTICS_DATABASE_URL=url_with_password,
        ANALYTICS_JWT_SECRET=TEST_JWT_SECRET,
        ANALYTICS_REDIS_URL=REDIS_URL,
        ANALYTICS_AMQP_URL=AMQP_URL,
    )
    async with serve(env) as running:
        yield running


@pytest.mark.slow
async def test_serve_answers_graphql_logs_json_and_never_logs_secrets(served: Served, make_token: TokenFactory) -> None:
    token = make_token("viewer", org="org_a", sub="srv")
    async with httpx.AsyncClient(base_url=served.base_url) as http:
        response = await http.post(
            "/graphql", json={"query": "{ viewer { subject } }"}, headers={"Authorization": f"Bearer {token}"}
        )
    assert response.json() == {"data": {"viewer": {"subject": "srv"}}}
    request_id = response.headers["x-request-id"]

    served.process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises SIGTERM for the parent to see.
    assert await asyncio.wait_for(served.process.wait(), 30) in (0, -signal.SIGTERM)
    assert served.process.stderr is not None
    logs = (await served.process.stderr.read()).decode()
    records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    access = [r for r in records if r.get("event") == "request" and r.get("path") == "/graphql"]
    assert access and access[0]["request_id"] == request_id and access[0]["status"] == 200
    assert any(r.get("event") == "gateway.stopped" for r in records), "lifespan shutdown did not run"
    for secret in (SECRET_PASSWORD, TEST_JWT_SECRET, token):
        assert secret not in logs


async def _connection_init(
    url: str, payload: dict[str, str], headers: dict[str, str] | None = None
) -> dict[str, object]:
    async with websockets.connect(url, subprotocols=["graphql-transport-ws"], additional_headers=headers) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
        try:
            return dict(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        except websockets.ConnectionClosed as closed:
            return {"closed": closed.rcvd.code if closed.rcvd else None}


@pytest.mark.slow
async def test_websocket_authenticates_in_connection_init_or_upgrade_header(
    served: Served, make_token: TokenFactory
) -> None:
    bearer = f"Bearer {make_token('viewer', org='org_a')}"
    assert await _connection_init(served.ws_url, {"Authorization": bearer}) == {"type": "connection_ack"}
    assert await _connection_init(served.ws_url, {}, headers={"Authorization": bearer}) == {"type": "connection_ack"}
    assert await _connection_init(served.ws_url, {"Authorization": "Bearer nope"}) == {"closed": 4403}
    assert await _connection_init(served.ws_url, {}) == {"closed": 4403}


async def test_seed_demo_loads_prices_and_events_idempotently(empty_database: str) -> None:
    env = clean_env(ANALYTICS_DATABASE_URL=empty_database)
    assert (await run_cli("migrate", env=env))[0] == 0
    code, _, stderr = await run_cli("seed-demo", "--events", "3000", "--orgs", "5", "--days", "3", env=env)
    assert code == 0, stderr
    assert "seeded 3,000 new events of 3,000 for 5 orgs" in stderr
    again = await run_cli("seed-demo", "--events", "3000", "--orgs", "5", "--days", "3", env=env)
    assert "seeded 0 new events of 3,000" in again[2]
    connection = await asyncpg.connect(empty_database)
    try:
        assert await connection.fetchval("SELECT count(*) FROM usage_events") == 3000
        assert await connection.fetchval("SELECT count(DISTINCT org_id) FROM usage_events") == 5
        assert await connection.fetchval("SELECT count(*) FROM model_prices") > 10
    finally:
        await connection.close()
