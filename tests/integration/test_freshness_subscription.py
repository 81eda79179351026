"""The freshness subscription, held by one gateway process while another ingests."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import websockets

from ingest.synthetic import Traffic, generate
from kernel.settings import Settings
from tests.conftest import REDIS_URL, TEST_JWT_SECRET, TokenFactory
from tests.integration.serve_support import Served, clean_env, serve

pytestmark = pytest.mark.slow
SUBSCRIBE = "subscription($org: ID!) { freshness(orgId: $org) { orgId lastEventAt lastIngestedAt status } }"


@pytest.fixture
async def api_process(settings: Settings, database_url: str) -> AsyncIterator[Served]:
    """An API-only gateway on the same database and Redis prefix as the in-process app."""
    env = clean_env(
        ANALYTICS_DATABASE_URL=database_url,
        ANALYTICS_JWT_SECRET=TEST_JWT_SECRET,
        ANALYTICS_REDIS_URL=REDIS_URL,
        ANALYTICS_REDIS_PREFIX=settings.redis_prefix,
    )
    async with serve(env, "--role", "api") as running:
        yield running


async def _post(client: httpx.AsyncClient, token: str, events: list[dict[str, object]]) -> None:
    response = await client.post(
        "/v1/events", content=json.dumps(events).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/cloudevents-batch+json"},
    )  # fmt: skip
    assert response.status_code == 202 and response.json()["accepted"] == len(events)


async def test_pushes_after_a_commit_for_its_org_only(
    api_process: Served, client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    tag = uuid.uuid4().hex[:6]
    mine, other = f"sub{tag}_0000", f"sub{tag}_0001"
    events = list(generate(Traffic(events=60, orgs=2, org_prefix=f"sub{tag}", source=f"//sub/{tag}",
                                   span=dt.timedelta(minutes=10))))  # fmt: skip
    for_mine = [e for e in events if e["data"]["org_id"] == mine]  # type: ignore[index]
    for_other = [e for e in events if e["data"]["org_id"] == other]  # type: ignore[index]
    assert for_mine and for_other
    bearer = f"Bearer {make_token('viewer', org=mine)}"
    ingest = make_token("ingest")

    async with websockets.connect(api_process.ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": bearer}}))
        assert json.loads(await ws.recv()) == {"type": "connection_ack"}
        await ws.send(json.dumps({"id": "1", "type": "subscribe",
                                  "payload": {"query": SUBSCRIBE, "variables": {"org": mine}}}))  # fmt: skip
        frame = await asyncio.wait_for(ws.recv(), 10)
        assert isinstance(frame, str), "subscription messages must be text frames (browsers' clients parse text)"
        first = json.loads(frame)
        assert first["type"] == "next" and first["payload"]["data"]["freshness"]["lastEventAt"] is None

        await _post(client, ingest, for_other)  # another org's events: no push
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 1.5)

        await _post(client, ingest, for_mine)
        committed = time.monotonic()
        pushed = json.loads(await asyncio.wait_for(ws.recv(), 5))
        latency = time.monotonic() - committed
    freshness = pushed["payload"]["data"]["freshness"]
    newest = max(str(e["time"]) for e in for_mine)
    assert freshness["orgId"] == mine
    assert dt.datetime.fromisoformat(freshness["lastEventAt"]) == dt.datetime.fromisoformat(newest)
    assert latency < 1.0, f"pushed {latency:.3f} s after the commit"


async def test_subscription_refuses_other_orgs(api_process: Served, make_token: TokenFactory) -> None:
    bearer = f"Bearer {make_token('viewer', org='org_a')}"
    async with websockets.connect(api_process.ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": bearer}}))
        await ws.recv()
        await ws.send(json.dumps({"id": "1", "type": "subscribe",
                                  "payload": {"query": SUBSCRIBE, "variables": {"org": "org_b"}}}))  # fmt: skip
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert message["type"] in ("error", "next")
    errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
    assert errors[0]["extensions"]["code"] == "FORBIDDEN"


async def test_websocket_errors_carry_contract_codes(api_process: Served, make_token: TokenFactory) -> None:
    bearer = f"Bearer {make_token('viewer', org='org_a')}"
    async with websockets.connect(api_process.ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": bearer}}))
        await ws.recv()
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": "{ viewer { nope } }"}}))
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert message["type"] == "error"
    assert message["payload"][0]["extensions"]["code"] == "BAD_USER_INPUT"


@pytest.fixture
async def fast_push_process(settings: Settings, database_url: str) -> AsyncIterator[Served]:
    env = clean_env(
        ANALYTICS_DATABASE_URL=database_url,
        ANALYTICS_JWT_SECRET=TEST_JWT_SECRET,
        ANALYTICS_REDIS_URL=REDIS_URL,
        ANALYTICS_REDIS_PREFIX=settings.redis_prefix,
        ANALYTICS_FRESHNESS_PUSH_S="0.5",
    )
    async with serve(env, "--role", "api") as running:
        yield running


async def test_pushes_periodically_without_new_data(fast_push_process: Served, make_token: TokenFactory) -> None:
    """The push interval (30 s by default; 0.5 s here) holds when nothing is ingested."""
    org = f"quiet_{uuid.uuid4().hex[:6]}"
    bearer = f"Bearer {make_token('viewer', org=org)}"
    async with websockets.connect(fast_push_process.ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": bearer}}))
        await ws.recv()
        await ws.send(json.dumps({"id": "1", "type": "subscribe",
                                  "payload": {"query": SUBSCRIBE, "variables": {"org": org}}}))  # fmt: skip
        pushes = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
    assert [p["type"] for p in pushes] == ["next", "next", "next"]
    assert all(p["payload"]["data"]["freshness"]["orgId"] == org for p in pushes)
