"""How GraphQL errors reach clients: every error carries a contract code.

Errors the gateway raised on purpose keep their message and code. Anything
else is logged with its traceback and shown as ``INTERNAL`` with a generic
message, so no internals (or secrets in them) leak to callers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import asyncpg
import structlog
from graphql import GraphQLError
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from kernel.errors import ErrorCode, GatewayError

log = structlog.get_logger(__name__)

# Out of capacity for a moment, not wrong: the pool had no connection in time (PoolTimeout), the statement ran
# past statement_timeout or the server is shutting down or starting (class 57), it is out of connections or
# memory (class 53), or the connection failed. The same request may succeed shortly.
_CAPACITY_ERRORS: tuple[type[BaseException], ...] = (
    PoolTimeout,
    DisconnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    ConnectionError,
    TimeoutError,
)
RETRY_AFTER_S = 1
_UNAVAILABLE_MESSAGE = "the database is busy or unreachable; retry after the time in extensions.retryAfter"
# graphql-core's rule when introspection is switched off (settings.introspection_enabled).
_INTROSPECTION_OFF = re.compile(r"^GraphQL introspection has been disabled")

# The messages of the depth, alias and token limiters (strawberry and graphql-core).
_TOO_COMPLEX = re.compile(
    r"exceeds maximum operation depth|^\d+ aliases found\. Allowed: \d+|^Syntax Error: Document contains more than"
)


def error_code(error: GraphQLError) -> ErrorCode:
    """The contract code of one error, from its extensions or its origin."""
    code = (error.extensions or {}).get("code")
    if isinstance(code, str) and code in ErrorCode.__members__:
        return ErrorCode(code)
    original = error.original_error
    if isinstance(original, GatewayError):
        return original.code
    if original is not None and _out_of_capacity(original):
        return ErrorCode.UNAVAILABLE
    if error.path is None or original is None or isinstance(original, GraphQLError):
        # Before execution (parse, validation, scalar and variable coercion): the request is wrong.
        if _TOO_COMPLEX.search(error.message):
            return ErrorCode.QUERY_TOO_COMPLEX
        if _INTROSPECTION_OFF.search(error.message):
            return ErrorCode.FORBIDDEN
        return ErrorCode.BAD_USER_INPUT
    return ErrorCode.INTERNAL


def _out_of_capacity(exc: BaseException) -> bool:
    return any(isinstance(cause, _CAPACITY_ERRORS) or _invalidated(cause) for cause in _causes(exc))


def _invalidated(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: SQLAlchemy's DBAPI error around the driver's, and explicit causes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        yield current
        wrapped = getattr(current, "orig", None)
        current = wrapped if isinstance(wrapped, BaseException) else current.__cause__ or current.__context__


def apply_contract(error: GraphQLError) -> None:
    """Give ``error`` its contract code (keeping a gateway error's own extensions, such as ``retryAfter``) and
    hide an internal or infrastructure error's message, in place, so every transport (HTTP, WebSocket) formats
    it the same way."""
    code = error_code(error)
    original = error.original_error
    own = original.extensions if isinstance(original, GatewayError) else {}
    error.extensions = {**(error.extensions or {}), **own, "code": code.value}
    if code is ErrorCode.INTERNAL:
        error.message = "Internal server error"
    elif code is ErrorCode.UNAVAILABLE and not isinstance(original, GatewayError):
        error.message = _UNAVAILABLE_MESSAGE
        error.extensions["retryAfter"] = RETRY_AFTER_S


def format_error(error: GraphQLError) -> dict[str, Any]:
    """The JSON of one error as the contract describes it."""
    apply_contract(error)
    return dict(error.formatted)


def collapse_list_errors(errors: list[GraphQLError]) -> list[GraphQLError]:
    """One error per field inside a list, at the first item's path (the contract's rule
    for a forbidden field in every item), instead of one per item."""
    seen: set[tuple[object, ...]] = set()
    kept = []
    for error in errors:
        shape = tuple("*" if isinstance(part, int) else part for part in error.path or ())
        key = (error.message, error_code(error), shape)
        if error.path is None or not any(isinstance(part, int) for part in error.path) or key not in seen:
            kept.append(error)
        seen.add(key)
    return kept


def log_errors(errors: list[GraphQLError]) -> None:
    """Log unexpected errors with their traceback; expected ones at debug."""
    for error in errors:
        code = error_code(error)
        if code is ErrorCode.INTERNAL:
            log.error("graphql.internal_error", path=error.path, exc_info=error.original_error)
        elif code is ErrorCode.UNAVAILABLE:
            # Operators need to see capacity trouble; the cause's type says which (no message: it may hold a URL).
            log.warning("graphql.unavailable", path=error.path, cause=type(error.original_error).__name__)
        else:
            log.debug("graphql.client_error", message=error.message, path=error.path)
