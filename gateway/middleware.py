"""Plain ASGI middleware: request ids and access logs, one-line start-up errors, per-caller limits on /graphql."""

from __future__ import annotations

import re
import sys
import time
import uuid

import structlog
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.embedded import EmbeddedPostgresError
from gateway.resources import resources_of
from kernel.auth import Caller, TokenVerifier
from kernel.errors import HTTP_STATUS, ConfigError, RateLimited, Unauthenticated
from kernel.ratelimit import ADMITTED, GRAPHQL_PATH, CallerLimiter, caller_key

REQUEST_ID_HEADER = "x-request-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
log = structlog.get_logger("gateway.access")


class RequestIdMiddleware:
    """Gives every request an id (the caller's ``X-Request-ID`` when sane),
    binds it to the logs of the request, returns it in a response header and
    writes one access log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})
        scope["request_id"] = request_id
        status = 0
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                log.info(
                    "request",
                    method=scope.get("method", "WS"),
                    path=scope["path"],
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                )


class StartupErrorMiddleware:
    """A start-up failure whose cause is known (a setting, a service that cannot be reached, the embedded
    database) is reported by its message alone, e.g. ``ANALYTICS_AMQP_URL: cannot connect to the broker
    (AMQPConnectionError)``; uvicorn would otherwise log Starlette's traceback of it."""

    KNOWN = (ConfigError, EmbeddedPostgresError)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_one_line(message: Message) -> None:
            # Starlette sends this inside its ``except`` block, so the exception is the one being handled.
            error = sys.exc_info()[1]
            if message["type"] == "lifespan.startup.failed" and isinstance(error, self.KNOWN):
                message = {**message, "message": str(error)}
            await send(message)

        await self.app(scope, receive, send_one_line)


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            return text if _VALID_ID.match(text) else None
    return None


class CallerLimitsMiddleware:
    """Admits each authenticated HTTP request to ``/graphql`` under its caller's limits, or answers 429 with
    ``Retry-After`` and a GraphQL-shaped ``RATE_LIMITED`` body. Requests without a valid token pass through:
    the GraphQL view answers them 401 (or serves GraphiQL)."""

    def __init__(self, app: ASGIApp, limiter: CallerLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != GRAPHQL_PATH:
            await self.app(scope, receive, send)
            return
        resources = resources_of(scope)
        caller = await _caller(resources.verifier, scope)
        if caller is None:
            await self.app(scope, receive, send)
            return
        key = caller_key(caller)
        try:
            await self.limiter.check_rate(resources.redis, key)
            self.limiter.acquire(key)
        except RateLimited as exc:
            await _too_many(exc)(scope, receive, send)
            return
        admitted = ADMITTED.set(True)
        try:
            await self.app(scope, receive, send)
        finally:
            ADMITTED.reset(admitted)
            self.limiter.release(key)


async def _caller(verifier: TokenVerifier, scope: Scope) -> Caller | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            try:
                return await verifier.verify_header(value.decode("latin-1"))
            except Unauthenticated:
                return None
    return None


def _too_many(exc: RateLimited) -> JSONResponse:
    body = {"data": None, "errors": [{"message": exc.message, "extensions": exc.extensions}]}
    return JSONResponse(body, status_code=HTTP_STATUS[exc.code], headers={"Retry-After": str(exc.retry_after_s)})
