"""GraphQL over HTTP and WebSocket at ``/graphql``, behind bearer-token auth.

HTTP requests are authenticated before Strawberry sees them: no valid token means HTTP 401 with a
GraphQL-shaped body. Only the GraphiQL page itself (a browser's GET that executes nothing, while
``graphiql_enabled``) is served without a token. Every refusal before execution (bad body, content type,
operation, size) is GraphQL-shaped too, with ``extensions.code`` and a matching status.

WebSocket clients (``graphql-transport-ws`` only) authenticate in ``connection_init`` (payload
``{"Authorization": "Bearer …"}``) or with a header on the upgrade request; the socket is closed with 4401
when the token expires, and no operation starts after that. A client that does not offer
``graphql-transport-ws`` (the legacy ``graphql-ws`` of subscriptions-transport-ws, say) is accepted only to be
closed at once with 4406 and a reason naming the protocol to offer: the legacy handler would run subscriptions
only (queries fail with "queries are not allowed") and skip the expiry checks below.

The GraphiQL page and its assets come from :mod:`gateway.graphiql` (no CDN).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import orjson
from cross_web import AsyncHTTPRequestAdapter, HTTPException, StarletteRequestAdapter
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError, MissingQueryError
from strawberry.http import GraphQLHTTPResponse, GraphQLRequestData
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import BaseGraphQLTransportWSHandler
from strawberry.subscriptions.protocols.graphql_transport_ws.types import ConnectionInitMessage, SubscribeMessage
from strawberry.types import ExecutionResult
from strawberry.types.graphql import OperationType
from strawberry.types.unset import UnsetType

from gateway import graphiql
from gateway.resources import Resources, resources_of
from kernel.auth import Caller
from kernel.errors import HTTP_STATUS, ErrorCode, Forbidden, GatewayError, Unauthenticated
from schema.context import Context
from schema.errors import collapse_list_errors, format_error
from schema.json import dumps
from schema.loaders import Loaders
from schema.operation_audit import record_refusal

CALLER_KEY = "analytics.caller"
# What each HTTP method may run. Subscriptions need the WebSocket: over HTTP strawberry would run the
# subscription resolver as a query and answer "Cannot return null for non-nullable field".
HTTP_OPERATIONS = {"GET": frozenset({OperationType.QUERY}),
                   "POST": frozenset({OperationType.QUERY, OperationType.MUTATION})}  # fmt: skip
WS_TOKEN_EXPIRED = 4401  # graphql-transport-ws "Unauthorized"
WS_SUBPROTOCOL_REFUSED = 4406  # graphql-transport-ws "Subprotocol not acceptable"
WS_SUBPROTOCOL_REASON = "offer subprotocol graphql-transport-ws; legacy graphql-ws is not served"


class TransportError(Exception):
    """A request refused before GraphQL executes it: an HTTP status, a contract code and a message."""

    def __init__(self, status: int, code: ErrorCode, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, dict(headers or {})

    @classmethod
    def of(cls, error: GatewayError, headers: Mapping[str, str] | None = None) -> TransportError:
        return cls(HTTP_STATUS[error.code], error.code, error.message, headers)

    def response(self) -> Response:
        body = {"data": None, "errors": [{"message": self.message, "extensions": {"code": self.code.value}}]}
        return Response(dumps(body), status_code=self.status, headers=self.headers, media_type="application/json")


class BodyTooLarge(TransportError):
    def __init__(self, limit: int) -> None:
        message = f"request body exceeds {limit} bytes (ANALYTICS_GRAPHQL_MAX_BODY_BYTES)"
        super().__init__(413, ErrorCode.BAD_USER_INPUT, message)


class GatewayWSHandler(BaseGraphQLTransportWSHandler[Context, None]):
    """``graphql-transport-ws`` with the token's expiry enforced: a timer closes the socket with 4401 at
    ``exp``, and a subscribe message that arrives after it (the timer not having run yet) does the same."""

    expiry: asyncio.Task[None] | None = None

    async def handle_connection_init(self, message: ConnectionInitMessage) -> None:
        await super().handle_connection_init(message)
        caller = self.context.caller
        if self.connection_acknowledged and self.expiry is None and caller and caller.expires_at is not None:
            self.expiry = asyncio.create_task(self._close_at(caller.expires_at))
            # strawberry's callback retrieves a failure (closing a socket the client just closed) so that it
            # is not reported as "never retrieved"
            self.expiry.add_done_callback(self._task_done)

    async def handle_subscribe(self, message: SubscribeMessage) -> None:
        caller = self.context.caller
        if self.connection_acknowledged and caller is not None and caller.expired(self._now()):
            await self._close_expired()
            return
        await super().handle_subscribe(message)

    async def shutdown(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
        await super().shutdown()

    async def _close_at(self, expires_at: float) -> None:
        await asyncio.sleep(max(0.0, expires_at - self._now()))
        await self._close_expired()

    async def _close_expired(self) -> None:
        # Operations first, so none of them writes to a socket that is closing.
        for operation_id in list(self.operations):
            await self.cleanup_operation(operation_id)
        await self.websocket.close(code=WS_TOKEN_EXPIRED, reason="token expired")

    def _now(self) -> float:
        return self.context.resources.verifier.now()


class GraphQLView(GraphQL[Context, None]):
    """Strawberry's ASGI view with our context, error format, JSON codec and WebSocket handler."""

    graphql_transport_ws_handler_class = GatewayWSHandler

    def __init__(self, schema: Any, **options: Any) -> None:
        # The contract's protocol only: the legacy graphql-ws handler would skip GatewayWSHandler's checks.
        super().__init__(schema, subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,), **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and GRAPHQL_TRANSPORT_WS_PROTOCOL not in scope.get("subprotocols", ()):
            await _refuse_subprotocol(WebSocket(scope, receive, send))
            return
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        try:
            response = await self.run(Request(scope, receive))
        except ClientDisconnect:  # the client left before its body was in: nobody to answer
            return
        except HTTPException as exc:  # strawberry's own refusals, plain text otherwise
            response = self._refuse(scope, _from_http_exception(exc))
        except TransportError as exc:
            response = self._refuse(scope, exc)
        await response(scope, receive, send)

    def _refuse(self, scope: Scope, refusal: TransportError) -> Response:
        """The refusal's response, audited when the caller is known (a 401 has no caller to record)."""
        record_refusal(_resources(scope).audit, scope.get(CALLER_KEY), refusal.code, refusal.message)
        return refusal.response()

    async def get_context(self, request: Request | WebSocket, response: Response | WebSocket) -> Context:
        return Context(
            resources=resources_of(request.scope),
            caller=request.scope.get(CALLER_KEY),
            loaders=Loaders(resources_of(request.scope)),
            request_id=request.scope.get("request_id"),
            upgrade_authorization=request.headers.get("authorization") if isinstance(request, WebSocket) else None,
        )

    async def on_ws_connect(self, context: Context) -> UnsetType:
        authorization = (context.connection_params or {}).get("Authorization")
        if not isinstance(authorization, str):
            authorization = context.upgrade_authorization
        try:
            caller = await context.resources.verifier.verify_header(authorization)
            ensure_graphql_access(caller)
        except (Unauthenticated, Forbidden) as exc:
            raise ConnectionRejectionError({"message": exc.message}) from None
        context.caller = caller
        return UnsetType()  # a plain connection_ack, no payload

    async def render_graphql_ide(self, request: Request) -> Response:
        if not _resources(request.scope).settings.graphiql_enabled:
            raise TransportError(404, ErrorCode.NOT_FOUND, "GraphiQL is switched off (ANALYTICS_GRAPHIQL_ENABLED)")
        return graphiql.page_response()

    async def parse_http_body(self, request: AsyncHTTPRequestAdapter) -> GraphQLRequestData:
        if request.method == "POST" and _media_type(request.content_type) != "application/json":
            message = "Content-Type must be application/json (one GraphQL operation as a JSON object)"
            raise TransportError(415, ErrorCode.BAD_USER_INPUT, message)
        data = await super().parse_http_body(request)
        assert isinstance(data, GraphQLRequestData)  # parse_json refuses arrays (no batching)
        if not isinstance(data.operation_name, str | None):
            raise TransportError(400, ErrorCode.BAD_USER_INPUT, "operationName must be a string or null")
        return data

    def parse_json(self, data: str | bytes) -> Any:
        """The request body (or a GET parameter) as a JSON object; anything else is refused here."""
        try:
            value = self.decode_json(data)
        except orjson.JSONDecodeError as exc:
            raise TransportError(400, ErrorCode.BAD_USER_INPUT, f"invalid JSON: {exc}") from None
        if isinstance(value, list):
            message = "batched operations (a JSON array) are not supported: send one operation as a JSON object"
            raise TransportError(400, ErrorCode.BAD_USER_INPUT, message)
        if not isinstance(value, dict):
            raise TransportError(400, ErrorCode.BAD_USER_INPUT, "expected a JSON object")
        return value

    def decode_json(self, data: str | bytes) -> object:
        # orjson: fast, and it refuses deep nesting with an error (json.loads raises RecursionError, a 500).
        # Its JSONDecodeError subclasses json's, which strawberry's WebSocket reader catches.
        return orjson.loads(data)

    async def execute_single(
        self,
        request: Request,
        request_adapter: AsyncHTTPRequestAdapter,
        sub_response: Response,
        context: Context,
        root_value: None,
        request_data: GraphQLRequestData,
    ) -> ExecutionResult:
        try:
            return await self.schema.execute(
                request_data.query,
                root_value=root_value,
                variable_values=request_data.variables,
                context_value=context,
                operation_name=request_data.operation_name,
                allowed_operation_types=HTTP_OPERATIONS[request_adapter.method],
                operation_extensions=request_data.extensions,
            )
        except CannotGetOperationTypeError as exc:
            raise TransportError(400, ErrorCode.BAD_USER_INPUT, exc.as_http_error_reason()) from None
        except InvalidOperationTypeError as exc:
            raise _wrong_transport(exc.operation_type) from None
        except MissingQueryError:
            raise TransportError(400, ErrorCode.BAD_USER_INPUT, "no GraphQL query in the request") from None

    async def process_result(self, request: Request, result: ExecutionResult) -> GraphQLHTTPResponse:
        response: GraphQLHTTPResponse = {"data": result.data}
        if result.errors:
            response["errors"] = [format_error(error) for error in collapse_list_errors(result.errors)]
        if result.extensions:
            response["extensions"] = result.extensions
        return response

    def create_response(
        self, response_data: GraphQLHTTPResponse | list[GraphQLHTTPResponse], sub_response: Response
    ) -> Response:
        """Strawberry's 200 response, except that a request refused as a whole for capacity (every error
        RATE_LIMITED or UNAVAILABLE, no data) gets that code's status (429, 503); any ``retryAfter`` becomes a
        ``Retry-After`` header, so that HTTP clients and proxies back off too."""
        response = super().create_response(response_data, sub_response)
        if isinstance(response_data, dict):
            _apply_retry(response, response_data)
        return response

    def encode_json(self, data: object) -> str:
        # A str: Strawberry sends bytes over the WebSocket as binary frames, which browsers'
        # GraphQL clients (GraphiQL, graphql-ws) cannot parse.
        return dumps(data).decode()


class AuthenticatedGraphQL:
    """ASGI app in front of :class:`GraphQLView`: verifies the bearer token, refuses callers with nothing in
    GraphQL, and bounds the request body."""

    def __init__(self, view: GraphQLView) -> None:
        self.view = view

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._serves_ide_only(scope):
            resources = _resources(scope)
            try:
                scope[CALLER_KEY] = await _authenticate(resources, scope)
                receive = _limited(receive, scope, resources.settings.graphql_max_body_bytes)
            except TransportError as exc:
                await exc.response()(scope, receive, send)
                return
        await self.view(scope, receive, send)

    def _serves_ide_only(self, scope: Scope) -> bool:
        """A GET that strawberry answers with the IDE page and executes nothing: decided by the view's own rule
        on the decoded query string (``?%71uery=`` is ``query``), so the two cannot disagree."""
        if scope["method"] != "GET" or not _resources(scope).settings.graphiql_enabled:
            return False
        return self.view.should_render_graphql_ide(StarletteRequestAdapter(Request(scope)))


async def _refuse_subprotocol(websocket: WebSocket) -> None:
    """Accept (with no subprotocol) and close at once with 4406 and a reason: refusing the handshake itself
    would leave the client an HTTP 403 and no words (the reason fits the 123 bytes a close frame allows)."""
    await websocket.accept()
    await websocket.close(WS_SUBPROTOCOL_REFUSED, WS_SUBPROTOCOL_REASON)


def ensure_graphql_access(caller: Caller) -> None:
    """Refuse a caller whose roles give nothing in GraphQL (the ``ingest`` role)."""
    if not caller.may_use_graphql:
        raise Forbidden(f"roles {list(caller.roles)} have no access to GraphQL")


async def _authenticate(resources: Resources, scope: Scope) -> Caller:
    try:
        caller = await resources.verifier.verify_header(_header(scope, b"authorization"))
    except Unauthenticated as exc:
        raise TransportError.of(exc, {"WWW-Authenticate": 'Bearer realm="analytics"'}) from None
    try:
        ensure_graphql_access(caller)
    except Forbidden as exc:
        raise TransportError.of(exc) from None
    return caller


def _limited(receive: Receive, scope: Scope, limit: int) -> Receive:
    """``receive`` that refuses a body over ``limit`` bytes: at once by its Content-Length, else while it
    streams in (a chunked body has none), before it is all in memory."""
    declared = _header(scope, b"content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    seen = 0

    async def receive_limited() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return receive_limited


RETRYABLE = frozenset({ErrorCode.RATE_LIMITED.value, ErrorCode.UNAVAILABLE.value})


def _apply_retry(response: Response, body: GraphQLHTTPResponse) -> None:
    extensions: list[dict[str, Any]] = [
        error.get("extensions") or {} for error in body.get("errors") or () if isinstance(error, dict)
    ]
    delays = [e["retryAfter"] for e in extensions if isinstance(e.get("retryAfter"), int)]
    if delays:
        response.headers["Retry-After"] = str(max(delays))
    codes = {str(e.get("code")) for e in extensions}
    if body.get("data") is None and len(codes) == 1 and codes <= RETRYABLE:
        response.status_code = HTTP_STATUS[ErrorCode(codes.pop())]


def _wrong_transport(operation: OperationType) -> TransportError:
    if operation is OperationType.SUBSCRIPTION:
        message = "subscriptions need the WebSocket transport (graphql-transport-ws at /graphql), not HTTP"
        return TransportError(400, ErrorCode.BAD_USER_INPUT, message)
    return TransportError(405, ErrorCode.BAD_USER_INPUT, f"{operation.value}s need POST", {"Allow": "POST"})


def _from_http_exception(exc: HTTPException) -> TransportError:
    code = ErrorCode.NOT_FOUND if exc.status_code == 404 else ErrorCode.BAD_USER_INPUT
    headers = {"Allow": "GET, POST"} if exc.status_code == 405 else None
    return TransportError(exc.status_code, code, exc.reason, headers)


def _media_type(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` -> ``application/json`` (a split: strawberry's parser builds an
    email message, and asserts on what it cannot parse)."""
    return (content_type or "").partition(";")[0].strip().lower()


def _resources(scope: Scope) -> Resources:
    return resources_of(scope)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None
