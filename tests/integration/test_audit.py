"""The audit trail under hostile input: no caller can silence it, and it records what was executed."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from sqlalchemy import text

from db.audit import AuditEntry
from db.audit_trail import AuditTrail
from gateway.metrics import Metrics
from gateway.resources import Resources
from kernel.settings import Settings
from tests.conftest import TEST_JWT_SECRET, TokenFactory
from tests.helpers import graphql
from tests.integration.serve_support import Served, clean_env, serve


async def _rows(resources: Resources, actor: str) -> list[Any]:
    async with resources.engine.connect() as connection:
        result = await connection.execute(
            text("SELECT org_id, action, target, outcome, detail FROM audit_log WHERE actor = :a ORDER BY id"),
            {"a": actor},
        )
        return list(result.all())


def _sum(exposition: bytes, name: str, label: str = "") -> float:
    """The sum of one metric's samples (those whose labels include ``label``) in a Prometheus exposition."""
    total = 0.0
    for line in exposition.decode().splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _metric(resources: Resources, name: str) -> float:
    return _sum(resources.metrics.exposition(), name)


async def test_unstorable_org_ids_do_not_silence_the_trail(
    client: httpx.AsyncClient, make_token: TokenFactory, resources: Resources
) -> None:
    actor = f"hostile-{uuid.uuid4().hex[:6]}"
    token = make_token("viewer", org="org_a", sub=actor)
    query = "query($o: ID!) { freshness(orgId: $o) { status } }"
    for org in ("x\u0000", "y" * 8000, "\udc80 lone surrogate", "org_a"):
        body = json.dumps({"query": query, "variables": {"o": org}})  # ASCII JSON: the surrogate as an escape
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        response = await client.post("/graphql", content=body.encode(), headers=headers)
        assert response.status_code in (200, 400), response.text
    await resources.audit.flush()
    rows = await _rows(resources, actor)
    assert len(rows) == 4
    nul, long, surrogate, good = rows
    assert nul.org_id == "x\\u0000" and nul.outcome == "error: BAD_USER_INPUT"
    assert len(long.org_id) == 200 and long.org_id.endswith("…")
    # A lone surrogate is not valid UTF-8: the body is refused before it is an operation, and that is recorded.
    assert (surrogate.action, surrogate.org_id, surrogate.outcome) == ("graphql.refused", None, "error: BAD_USER_INPUT")
    assert (good.org_id, good.target, good.outcome) == ("org_a", "freshness", "ok")


async def test_refusals_before_execution_are_audited(
    client: httpx.AsyncClient, make_token: TokenFactory, resources: Resources
) -> None:
    actor = f"refused-{uuid.uuid4().hex[:6]}"
    headers = {"Authorization": f"Bearer {make_token('viewer', org='org_a', sub=actor)}"}
    assert (
        await client.post("/graphql", content=b"[1,2]", headers=headers | {"Content-Type": "application/json"})
    ).status_code == 400
    big = "{ viewer { subject } }" + " " * resources.settings.graphql_max_document_bytes
    assert (await client.post("/graphql", json={"query": big}, headers=headers)).status_code == 200
    await resources.audit.flush()
    rows = await _rows(resources, actor)
    assert [(r.action, r.outcome) for r in rows] == [
        ("graphql.refused", "error: BAD_USER_INPUT"),
        ("graphql.refused", "error: QUERY_TOO_COMPLEX"),
    ]
    assert "batched" in rows[0].detail["reason"]


async def test_a_row_the_database_refuses_is_replaced_and_the_rest_are_written(resources: Resources) -> None:
    """The second line: rows that bypass ``AuditEntry.row`` and still cannot be stored are written one by one;
    the unstorable one becomes an ``audit.unstorable`` row with the database's reason."""
    actor = f"raw-{uuid.uuid4().hex[:6]}"
    good = AuditEntry(actor=actor, action="graphql.query", outcome="ok", target="viewer").row(dt.datetime.now(dt.UTC))
    bad = {**good, "target": "nul\x00inside", "detail": '{"k": "\\u0000"}'}
    failures_before = _metric(resources, "analytics_audit_write_failures_total")
    resources.audit._queue.extend([good, bad, good])  # white box: a row that skipped sanitising
    await resources.audit.flush()
    rows = await _rows(resources, actor)
    assert [(r.action, r.target) for r in rows] == [
        ("graphql.query", "viewer"),
        ("audit.unstorable", "graphql.query"),
        ("graphql.query", "viewer"),
    ]
    assert "0x00" in rows[1].detail["error"] or "\\u0000" in rows[1].detail["error"]
    assert _metric(resources, "analytics_audit_write_failures_total") == failures_before + 1
    assert resources.audit.queued == 0


async def test_queue_overflow_is_counted(resources: Resources) -> None:
    metrics = Metrics.create()
    trail = AuditTrail(resources.engine, metrics.meter("test"), max_queued=2)
    entry = AuditEntry(actor="overflow", action="graphql.query", outcome="ok")
    for _ in range(3):
        trail.record(entry, dt.datetime.now(dt.UTC))
    assert trail.queued == 2
    exposition = metrics.exposition()
    assert _sum(exposition, "analytics_audit_dropped_total", 'reason="queue_full"') == 1
    assert _sum(exposition, "analytics_audit_queued_rows") == 2


async def test_records_what_was_executed_not_what_the_client_named_it(
    client: httpx.AsyncClient, make_token: TokenFactory, resources: Resources
) -> None:
    actor = f"named-{uuid.uuid4().hex[:6]}"
    token = make_token("viewer", org="org_b", sub=actor)
    document = """
        query deleteEverything($o: ID!, $skip: Boolean!) { ...F  viewer @skip(if: $skip) { subject } }
        fragment F on Query { freshness(orgId: $o) { status } }
    """
    response = await graphql(client, document, token, {"o": "org_b", "skip": True})
    assert response.status_code == 200 and "errors" not in response.json()
    bad_variables = await graphql(client, document, token, {"o": None, "skip": True})
    assert bad_variables.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    await resources.audit.flush()
    executed, refused = await _rows(resources, actor)
    assert (executed.org_id, executed.action, executed.target, executed.outcome) == (
        "org_b", "graphql.query", "freshness", "ok"
    )  # fmt: skip
    assert executed.detail == {"fields": ["freshness"], "orgs": ["org_b"], "operation_name": "deleteEverything"}
    assert refused.org_id is None and refused.outcome == "error: BAD_USER_INPUT"


@pytest.fixture
async def api_process(settings: Settings, database_url: str) -> AsyncIterator[Served]:
    env = clean_env(ANALYTICS_DATABASE_URL=database_url, ANALYTICS_JWT_SECRET=TEST_JWT_SECRET)
    async with serve(env, "--role", "api") as running:
        yield running


@pytest.mark.slow
async def test_subscriptions_are_audited_when_they_start(
    api_process: Served, make_token: TokenFactory, resources: Resources
) -> None:
    actor = f"subscriber-{uuid.uuid4().hex[:6]}"
    bearer = f"Bearer {make_token('viewer', org='org_s', sub=actor)}"
    subscribe = "subscription S($o: ID!) { freshness(orgId: $o) { status } }"
    async with websockets.connect(api_process.ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": bearer}}))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        for n, org in enumerate(("org_s", "org_other")):
            message = {"id": str(n), "type": "subscribe",
                       "payload": {"query": subscribe, "variables": {"o": org}, "operationName": "S"}}  # fmt: skip
            await ws.send(json.dumps(message))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["id"] == str(n)
        # The subscriptions are still open: they were recorded when they started.
        rows = await _wait_for_rows(resources, actor, 2)
    assert sorted((r.org_id, r.action, r.target, r.outcome) for r in rows) == [
        ("org_other", "graphql.subscription", "freshness", "error: FORBIDDEN"),
        ("org_s", "graphql.subscription", "freshness", "ok"),
    ]


async def _wait_for_rows(resources: Resources, actor: str, count: int) -> list[Any]:
    """The other process writes its trail every second: poll until its rows are there (or 15 s pass)."""
    async with asyncio.timeout(15):
        while len(rows := await _rows(resources, actor)) < count:
            await asyncio.sleep(0.2)
    return rows
