"""How GraphQL errors reach clients: every error carries a contract code.

Errors the gateway raised on purpose keep their message and code. Anything
else is logged with its traceback and shown as ``INTERNAL`` with a generic
message, so no internals (or secrets in them) leak to callers.
"""

from __future__ import annotations

import re
from typing import Any

import structlog
from graphql import GraphQLError

from gateway.errors import ErrorCode, GatewayError

log = structlog.get_logger(__name__)

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
    if error.path is None or original is None or isinstance(original, GraphQLError):
        # Before execution (parse, validation, scalar and variable coercion): the request is wrong.
        if _TOO_COMPLEX.search(error.message):
            return ErrorCode.QUERY_TOO_COMPLEX
        return ErrorCode.BAD_USER_INPUT
    return ErrorCode.INTERNAL


def apply_contract(error: GraphQLError) -> None:
    """Give ``error`` its contract code and hide an internal error's message, in place,
    so every transport (HTTP, WebSocket) formats it the same way."""
    code = error_code(error)
    error.extensions = {**(error.extensions or {}), "code": code.value}
    if code is ErrorCode.INTERNAL:
        error.message = "Internal server error"


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
        if error_code(error) is ErrorCode.INTERNAL:
            log.error("graphql.internal_error", path=error.path, exc_info=error.original_error)
        else:
            log.debug("graphql.client_error", message=error.message, path=error.path)
