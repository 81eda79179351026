"""Hostile requests to /graphql (issue 10, findings 6-10 and 12): every one gets a clear, GraphQL-shaped
refusal with a contract code, never INTERNAL, never a plain-text body, and no secret reaches the logs."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import io
import json
import logging
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
import websockets
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from strawberry.http.async_base_view import AsyncWebSocketAdapter

from gateway.app import create_app
from gateway.graphql_view import GatewayWSHandler, GraphQLView
from gateway.logging import json_handler
from gateway.resources import Resources
from kernel.auth import Caller
from kernel.settings import ProcessRole, Settings
from resolvers.root import build_schema
from schema.context import Context
from schema.loaders import Loaders
from tests.conftest import TokenFactory
from tests.helpers import graphql

VIEWER = "{ viewer { subject } }"
SUBSCRIBE = "subscription($org: ID!) { freshness(orgId: $org) { orgId status } }"
USAGE = """query($org: ID!, $from: DateTime!, $to: DateTime!, $filter: UsageFilter, $tz: String! = "UTC",
                 $g: Granularity! = DAY) {
  usage(orgId: $org, range: {from: $from, to: $to}, filter: $filter, timeZone: $tz, granularity: $g) {
    totals { requests }
  }
}"""


def _error(response: httpx.Response) -> dict[str, Any]:
    """The one error of a GraphQL-shaped response."""
    body = response.json()
    assert body["data"] is None, body
    [error] = body["errors"]
    return error  # type: ignore[no-any-return]


def _bad_input(response: httpx.Response, *words: str) -> None:
    body = response.json()
    assert body["errors"], body
    error = body["errors"][0]
    assert error["extensions"]["code"] == "BAD_USER_INPUT", body
    for word in words:
        assert word in error["message"], error["message"]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- finding 6: no execution without a token; the IDE switch --------------------------------------------------


@pytest.mark.parametrize(
    "query_string",
    [
        "%71uery=%7B__typename%7D",
        "query=%7B__typename%7D",
        "q%75ery=%7B__schema%7BqueryType%7Bname%7D%7D%7D",
        "variables=%7B%7D&%71uery=%7B__typename%7D",
        "query",
    ],
)
async def test_a_browser_get_that_would_execute_needs_a_token(client: httpx.AsyncClient, query_string: str) -> None:
    response = await client.get(f"/graphql?{query_string}", headers={"Accept": "text/html"})
    assert response.status_code == 401
    assert _error(response)["extensions"]["code"] == "UNAUTHENTICATED"


async def test_only_the_ide_page_is_served_without_a_token(client: httpx.AsyncClient) -> None:
    page = await client.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 200 and "graphiql" in page.text.lower()
    not_a_browser = await client.get("/graphql", headers={"Accept": "application/json"})
    assert not_a_browser.status_code == 401


async def test_graphiql_can_be_switched_off(settings: Settings, make_token: TokenFactory) -> None:
    app = create_app(settings.model_copy(update={"graphiql_enabled": False}), frozenset({ProcessRole.API}))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
            anonymous = await http.get("/graphql", headers={"Accept": "text/html"})
            assert anonymous.status_code == 401 and "<html" not in anonymous.text.lower()
            token = make_token("viewer", org="org_a")
            signed_in = await http.get("/graphql", headers={"Accept": "text/html"} | _auth(token))
            assert "<html" not in signed_in.text.lower()
            assert signed_in.status_code == 404 and _error(signed_in)["extensions"]["code"] == "NOT_FOUND"
            query = await http.get("/graphql", params={"query": VIEWER}, headers=_auth(token))
            assert query.json() == {"data": {"viewer": {"subject": "test-user"}}}


# --- finding 8: no GraphQL for the ingest role; NumericDate exp; token size -----------------------------------


@pytest.mark.parametrize("query", [VIEWER, "{ modelPrices { model } }", "{ __typename }"])
async def test_a_caller_without_graphql_scopes_is_forbidden(
    client: httpx.AsyncClient, make_token: TokenFactory, query: str
) -> None:
    response = await graphql(client, query, make_token("ingest", org="org_a"))
    assert response.status_code == 403
    assert _error(response)["extensions"]["code"] == "FORBIDDEN"


async def test_an_oversized_token_is_unauthenticated(client: httpx.AsyncClient, settings: Settings) -> None:
    response = await graphql(client, VIEWER, "x" * (settings.jwt_max_token_bytes + 1))
    assert response.status_code == 401
    assert "too long" in _error(response)["message"]


# --- finding 9: bad input is BAD_USER_INPUT naming the problem ------------------------------------------------


async def test_nul_and_oversized_ids_are_bad_input(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    admin = make_token("platform_admin")
    window = {"from": "2026-11-01T00:00:00Z", "to": "2026-11-02T00:00:00Z"}
    for org in ("org\u0000", "o" * 8000, "org\n"):
        _bad_input(await graphql(client, USAGE, admin, {"org": org, **window}), "orgId")
    for filter_, name in (({"models": ["gpt\u0000"]}, "filter.models"), ({"projectIds": ["p\u0000"]}, "projectIds"),
                          ({"apiKeyIds": ["k" * 200]}, "apiKeyIds")):  # fmt: skip
        _bad_input(await graphql(client, USAGE, admin, {"org": "org_a", "filter": filter_, **window}), name)
    prices = await graphql(client, "query($m: String) { modelPrices(model: $m) { model } }", admin, {"m": "a\u0000"})
    _bad_input(prices, "model")
    for zone in ("Europe/Berlin\u0000", "a" * 5000):
        _bad_input(await graphql(client, USAGE, admin, {"org": "org_a", "tz": zone, **window}), "timeZone")


async def test_ranges_near_the_datetime_limits_are_bad_input(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    admin = make_token("platform_admin")
    cases = [
        ("0001-01-01T00:00:00Z", "0001-01-02T00:00:00Z", "America/Los_Angeles", "DAY"),
        ("0001-01-01T00:00:00Z", "0001-01-02T00:00:00Z", "Asia/Tokyo", "MONTH"),
        ("9999-12-30T00:00:00Z", "9999-12-31T00:00:00Z", "Pacific/Kiritimati", "MONTH"),
    ]
    for start, end, zone, granularity in cases:
        variables = {"org": "org_a", "from": start, "to": end, "tz": zone, "g": granularity}
        _bad_input(await graphql(client, USAGE, admin, variables), "range")
    # An offset that moves the instant before year 1 fails while the scalar is parsed: still BAD_USER_INPUT.
    variables = {"org": "org_a", "from": "0001-01-01T00:00:00+01:00", "to": "2026-01-01T00:00:00Z"}
    _bad_input(await graphql(client, USAGE, admin, variables), "out of range")


SPEND = "query($after: String) { spendByOrg(range: {from: \"2026-11-01T00:00:00Z\", to: \"2026-11-02T00:00:00Z\"}, " \
        "after: $after) { totalSpend } }"  # fmt: skip


@pytest.mark.parametrize("spend", ["NaN", "sNaN", "Infinity", "1e999999999", "-1e999999999"])
async def test_spend_cursors_that_decode_to_odd_numbers_are_bad_input(
    client: httpx.AsyncClient, make_token: TokenFactory, spend: str
) -> None:
    cursor = base64.urlsafe_b64encode(orjson.dumps([spend, "org_a"])).decode()
    _bad_input(await graphql(client, SPEND, make_token("platform_finance"), {"after": cursor}), "cursor")


async def test_other_bad_spend_cursors_are_bad_input(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    token = make_token("platform_finance")
    for cursor in ("%%%", "x" * 5000, base64.urlsafe_b64encode(b'{"a": 1}').decode(),
                   base64.urlsafe_b64encode(orjson.dumps(["1", "org\u0000"])).decode()):  # fmt: skip
        _bad_input(await graphql(client, SPEND, token, {"after": cursor}), "cursor")


UPSERT = """mutation($price: Decimal!, $model: String! = "gpt-test") {
  upsertModelPrice(input: {model: $model, effectiveFrom: "2026-01-01T00:00:00Z", inputPerMillion: $price,
                           outputPerMillion: "1"}) { model }
}"""


@pytest.mark.parametrize("price", ["1e999999", "1e-999999", "0." + "1" * 60, "1" * 60])
async def test_unstorable_prices_are_bad_input(client: httpx.AsyncClient, make_token: TokenFactory, price: str) -> None:
    _bad_input(await graphql(client, UPSERT, make_token("platform_admin"), {"price": price}), "Decimal")


async def test_a_price_for_an_unstorable_model_is_bad_input(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    response = await graphql(client, UPSERT, make_token("platform_admin"), {"price": "1", "model": "gpt\u0000"})
    _bad_input(response, "model")


async def test_a_subscription_over_http_says_to_use_the_websocket(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    response = await graphql(client, SUBSCRIBE, make_token("viewer", org="org_a"), {"org": "org_a"})
    assert response.status_code == 400
    _bad_input(response, "WebSocket")


# --- finding 10: transport errors are GraphQL-shaped with a status ---------------------------------------------


@pytest.fixture(scope="module")
def admin_headers(make_token: TokenFactory) -> dict[str, str]:
    return _auth(make_token("platform_admin"))


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b'[{"query": "{ viewer { subject } }"}]', "application/json", 400, "BAD_USER_INPUT"),
        (b'{"query": ', "application/json", 400, "BAD_USER_INPUT"),
        (b'"just a string"', "application/json", 400, "BAD_USER_INPUT"),
        (b'{"query": 5}', "application/json", 400, "BAD_USER_INPUT"),
        (b"{}", "application/json", 400, "BAD_USER_INPUT"),
        (b"query { viewer { subject } }", "text/plain", 415, "BAD_USER_INPUT"),
        (b"query { viewer { subject } }", "application/graphql", 415, "BAD_USER_INPUT"),
        (
            b'{"query": "query A { viewer { subject } }", "operationName": "B"}',
            "application/json",
            400,
            "BAD_USER_INPUT",
        ),
    ],
)
async def test_malformed_requests_get_graphql_shaped_errors(
    client: httpx.AsyncClient, admin_headers: dict[str, str], body: bytes, content_type: str, status: int, code: str
) -> None:
    response = await client.post("/graphql", content=body, headers=admin_headers | {"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert _error(response)["extensions"]["code"] == code


async def test_a_mutation_over_get_is_405(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> None:
    response = await client.get("/graphql", params={"query": UPSERT}, headers=admin_headers)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert _error(response)["extensions"]["code"] == "BAD_USER_INPUT"


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
async def test_other_methods_get_a_graphql_shaped_405(
    client: httpx.AsyncClient, admin_headers: dict[str, str], method: str
) -> None:
    response = await client.request(method, "/graphql", json={"query": VIEWER}, headers=admin_headers)
    assert response.status_code == 405 and response.headers["allow"] == "GET, POST"
    assert _error(response)["extensions"]["code"] == "BAD_USER_INPUT"


async def test_an_oversized_body_is_413(
    client: httpx.AsyncClient, admin_headers: dict[str, str], settings: Settings
) -> None:
    body = json.dumps({"query": VIEWER, "variables": {"pad": "x" * settings.graphql_max_body_bytes}}).encode()
    declared = await client.post("/graphql", content=body, headers=admin_headers | {"Content-Type": "application/json"})
    assert declared.status_code == 413
    assert _error(declared)["extensions"]["code"] == "BAD_USER_INPUT"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while streaming
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    streamed = await client.post(
        "/graphql", content=chunks(), headers=admin_headers | {"Content-Type": "application/json"}
    )
    assert "content-length" not in streamed.request.headers
    assert streamed.status_code == 413
    assert _error(streamed)["extensions"]["code"] == "BAD_USER_INPUT"


async def test_a_body_under_the_limit_still_works(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"query": "{ viewer '
        yield b'{ subject } }"}'

    response = await client.post(
        "/graphql", content=chunks(), headers=admin_headers | {"Content-Type": "application/json"}
    )
    assert response.json() == {"data": {"viewer": {"subject": "test-user"}}}


# --- findings 7, 8 and 12 over a real WebSocket ------------------------------------------------------------------


@pytest.fixture(scope="module")
async def ws_url(app: Starlette) -> AsyncIterator[str]:
    """The session's app behind a real uvicorn server on a free loopback port (its lifespan already runs)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None, access_log=False))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    # The socket already listens: a client's connect waits in the backlog until uvicorn accepts it.
    yield f"ws://127.0.0.1:{sock.getsockname()[1]}/graphql"
    server.should_exit = True
    await asyncio.wait_for(serving, 10)
    sock.close()


async def _connect(url: str, token: str) -> websockets.ClientConnection:
    ws = await websockets.connect(url, subprotocols=["graphql-transport-ws"])  # type: ignore[list-item]
    await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}}))
    return ws


async def _close_code(ws: websockets.ClientConnection, timeout: float) -> int | None:
    """Read until the server closes the socket; its close code."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    return closed.value.rcvd.code if closed.value.rcvd else None


async def test_the_socket_closes_with_4401_when_the_token_expires(ws_url: str, make_token: TokenFactory) -> None:
    ws = await _connect(ws_url, make_token("viewer", org="org_a", ttl=2))
    async with ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"type": "connection_ack"}
        await ws.send(json.dumps({"id": "1", "type": "subscribe",
                                  "payload": {"query": SUBSCRIBE, "variables": {"org": "org_a"}}}))  # fmt: skip
        first = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert first["type"] == "next" and first["payload"]["data"]["freshness"]["orgId"] == "org_a"
        # Waiting for the expiry itself (2 s): the server must close the socket then, and run nothing more.
        assert await _close_code(ws, timeout=5) == 4401


async def test_operations_before_expiry_still_run(ws_url: str, make_token: TokenFactory) -> None:
    ws = await _connect(ws_url, make_token("viewer", org="org_a", ttl=600))
    async with ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"type": "connection_ack"}
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": VIEWER}}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["payload"] == {
            "data": {"viewer": {"subject": "test-user"}}
        }


async def test_the_ingest_role_gets_no_websocket(ws_url: str, make_token: TokenFactory) -> None:
    ws = await _connect(ws_url, make_token("ingest"))
    async with ws:
        assert await _close_code(ws, timeout=5) == 4403


async def test_a_token_in_the_websocket_url_never_reaches_the_logs(ws_url: str, make_token: TokenFactory) -> None:
    token = make_token("viewer", org="org_a")
    stream = io.StringIO()
    handler = json_handler(stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        for name in ("token", "access_token"):
            async with websockets.connect(f"{ws_url}?{name}={token}", subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
                await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}}))
                await asyncio.wait_for(ws.recv(), 5)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    logged = stream.getvalue()
    assert "WebSocket /graphql?token=[redacted]" in logged, logged  # uvicorn's own line, redacted
    assert token not in logged and token.split(".")[1] not in logged


class _RecordingSocket(AsyncWebSocketAdapter):
    """Stands in for the socket of one connection to see what the handler does with it (no service here)."""

    def __init__(self) -> None:
        self.sent: list[Mapping[str, object]] = []
        self.closed: tuple[int, str] | None = None

    async def iter_json(self, *, ignore_parsing_errors: bool = False) -> AsyncGenerator[object, None]:
        for message in ():
            yield message

    async def send_json(self, message: Mapping[str, object]) -> None:
        self.sent.append(message)

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


async def test_an_operation_after_expiry_is_refused_even_before_the_timer_fires(
    app: Starlette, resources: Resources
) -> None:
    expired = Caller("v", "org_a", ("viewer",), expires_at=resources.verifier.now() - 1)
    socket_ = _RecordingSocket()
    view = GraphQLView(build_schema())
    context = Context(resources=resources, caller=expired, loaders=Loaders(resources))
    handler = GatewayWSHandler(view, socket_, context, None, view.schema, dt.timedelta(seconds=5))
    handler.connection_acknowledged = True
    await handler.handle_subscribe({"id": "1", "type": "subscribe", "payload": {"query": VIEWER}})
    assert socket_.closed == (4401, "token expired")
    assert handler.operations == {} and socket_.sent == []
    await handler.shutdown()


def test_unhandled_exceptions_are_logged_with_their_traceback() -> None:
    """uvicorn logs an application's unhandled exception through the standard library ("Exception in ASGI
    application"); the JSON line must carry the traceback, not the repr of the exc_info tuple."""
    stream = io.StringIO()
    logger = logging.getLogger("test.unhandled")
    handler = json_handler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            _explode(A_JWT)
        except RuntimeError:
            logger.exception("Exception in ASGI application")
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["event"] == "Exception in ASGI application" and line["level"] == "error"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "in _explode" in line["exception"] and "RuntimeError: token was" in line["exception"]
    assert A_JWT not in stream.getvalue() and "[redacted-jwt]" in line["exception"]  # its text is redacted too


A_JWT = ".".join(("eyJhbGciOiJIUzI1NiJ9", "eyJzdWIiOiJ4In0", "c2lnbmF0dXJl"))


def _explode(secret: str) -> None:
    raise RuntimeError(f"token was {secret}")


async def test_freshness_of_an_unstorable_org_is_bad_input(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    query = "query($org: ID!) { freshness(orgId: $org) { orgId } }"
    for org in ("x\u0000", "o" * 8000):
        _bad_input(await graphql(client, query, make_token("platform_admin"), {"org": org}), "orgId")
