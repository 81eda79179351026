"""GraphQL over HTTP and WebSocket at ``/graphql``, behind bearer-token auth.

HTTP requests are authenticated before Strawberry sees them: no valid token
means HTTP 401 with a GraphQL-shaped body. A browser GET without a query gets
GraphiQL. WebSocket clients authenticate in ``connection_init`` (payload
``{"Authorization": "Bearer …"}``) or with a header on the upgrade request.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.http import GraphQLHTTPResponse
from strawberry.types import ExecutionResult
from strawberry.types.unset import UnsetType

from gateway.auth import Caller
from gateway.context import Context
from gateway.errors import HTTP_STATUS, ErrorCode, Unauthenticated
from gateway.resources import Resources
from resolvers.loaders import Loaders
from schema.errors import collapse_list_errors, format_error
from schema.json import dumps

CALLER_KEY = "analytics.caller"


class GraphQLView(GraphQL[Context, None]):
    """Strawberry's ASGI view with our context, error format and JSON encoder."""

    async def get_context(self, request: Request | WebSocket, response: Response | WebSocket) -> Context:
        return Context(
            resources=request.state.resources,
            caller=request.scope.get(CALLER_KEY),
            loaders=Loaders(request.state.resources),
            request_id=request.scope.get("request_id"),
            upgrade_authorization=request.headers.get("authorization") if isinstance(request, WebSocket) else None,
        )

    async def on_ws_connect(self, context: Context) -> UnsetType:
        authorization = (context.connection_params or {}).get("Authorization")
        if not isinstance(authorization, str):
            authorization = context.upgrade_authorization
        try:
            context.caller = await context.resources.verifier.verify_header(authorization)
        except Unauthenticated as exc:
            raise ConnectionRejectionError({"message": exc.message}) from None
        return UnsetType()  # a plain connection_ack, no payload

    async def process_result(self, request: Request, result: ExecutionResult) -> GraphQLHTTPResponse:
        response: GraphQLHTTPResponse = {"data": result.data}
        if result.errors:
            response["errors"] = [format_error(error) for error in collapse_list_errors(result.errors)]
        if result.extensions:
            response["extensions"] = result.extensions
        return response

    def encode_json(self, data: object) -> str:
        # A str: Strawberry sends bytes over the WebSocket as binary frames, which browsers'
        # GraphQL clients (GraphiQL, graphql-ws) cannot parse.
        return dumps(data).decode()


class AuthenticatedGraphQL:
    """ASGI app in front of :class:`GraphQLView` that verifies the bearer token."""

    def __init__(self, view: GraphQLView) -> None:
        self.view = view

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _wants_graphiql(scope):
            resources: Resources = scope["state"]["resources"]
            try:
                scope[CALLER_KEY] = await _authenticate(resources, scope)
            except Unauthenticated as exc:
                await _error_response(exc)(scope, receive, send)
                return
        await self.view(scope, receive, send)


async def _authenticate(resources: Resources, scope: Scope) -> Caller:
    return await resources.verifier.verify_header(_header(scope, b"authorization"))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _wants_graphiql(scope: Scope) -> bool:
    accepts_html = "text/html" in (_header(scope, b"accept") or "")
    return scope["method"] == "GET" and accepts_html and b"query=" not in scope.get("query_string", b"")


def _error_response(exc: Unauthenticated) -> Response:
    body = {"data": None, "errors": [{"message": exc.message, "extensions": exc.extensions}]}
    headers = {"WWW-Authenticate": 'Bearer realm="analytics"'}
    return JSONResponse(body, status_code=HTTP_STATUS[ErrorCode.UNAUTHENTICATED], headers=headers)
