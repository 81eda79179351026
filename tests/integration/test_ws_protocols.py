"""WebSocket subprotocols at ``/graphql`` with a real client (``websockets``) against a real ``serve`` process.

The gateway speaks ``graphql-transport-ws`` only, for every operation type. A client that offers only the legacy
``graphql-ws`` (Apollo's subscriptions-transport-ws) or no subprotocol is closed at once with 4406 and a reason
that names the protocol to offer; one that offers both (the ``gql`` client's default) gets
``graphql-transport-ws`` and its queries work.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.typing import Subprotocol

from gateway.graphql_view import WS_SUBPROTOCOL_REASON
from tests.conftest import TEST_JWT_SECRET, TokenFactory
from tests.integration.serve_support import Served, clean_env, serve

pytestmark = pytest.mark.slow
TRANSPORT_WS = Subprotocol("graphql-transport-ws")
LEGACY_WS = Subprotocol("graphql-ws")
VIEWER = "query Me { viewer { subject orgId } }"


@pytest.fixture(scope="module")
async def api_process(database_url: str) -> AsyncIterator[Served]:
    """An API process on the run's shared database (these tests read only the token's claims)."""
    env = clean_env(ANALYTICS_DATABASE_URL=database_url, ANALYTICS_JWT_SECRET=TEST_JWT_SECRET)
    async with serve(env, "--role", "api") as running:
        yield running


async def _receive(ws: ClientConnection) -> dict[str, object]:
    message = json.loads(await ws.recv())
    assert isinstance(message, dict)
    return message


async def _init(ws: ClientConnection, token: str) -> None:
    await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}}))
    assert await _receive(ws) == {"type": "connection_ack"}


@pytest.mark.parametrize(
    "offered", [[LEGACY_WS], [], [Subprotocol("graphql-sse")]], ids=["legacy graphql-ws", "none", "another"]
)
async def test_a_client_without_graphql_transport_ws_is_closed_with_4406_and_a_reason(
    api_process: Served, offered: list[Subprotocol]
) -> None:
    async with websockets.connect(api_process.ws_url, subprotocols=offered or None) as ws:
        assert ws.subprotocol is None
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4406
    assert closed.value.rcvd.reason == WS_SUBPROTOCOL_REASON
    assert "graphql-transport-ws" in closed.value.rcvd.reason


async def test_a_client_offering_both_gets_graphql_transport_ws_and_queries_work(
    api_process: Served, make_token: TokenFactory
) -> None:
    """The ``gql`` client's default offer (legacy first): the server picks the protocol it serves."""
    async with websockets.connect(api_process.ws_url, subprotocols=[LEGACY_WS, TRANSPORT_WS]) as ws:
        assert ws.subprotocol == TRANSPORT_WS
        await _init(ws, make_token("viewer", org="org_ws", sub="ws-user"))
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": VIEWER}}))
        assert await _receive(ws) == {
            "id": "1",
            "type": "next",
            "payload": {"data": {"viewer": {"subject": "ws-user", "orgId": "org_ws"}}},
        }
        assert await _receive(ws) == {"id": "1", "type": "complete"}


async def test_a_bad_token_is_refused_in_connection_init(api_process: Served) -> None:
    async with websockets.connect(api_process.ws_url, subprotocols=[TRANSPORT_WS]) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": "Bearer not.a.jwt"}}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
