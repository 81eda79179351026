"""One error base class; each error carries the code clients see.

GraphQL errors expose ``code`` as ``extensions.code``; HTTP endpoints map it to
a status with :data:`HTTP_STATUS`.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The ``extensions.code`` values of the GraphQL contract."""

    UNAUTHENTICATED = "UNAUTHENTICATED"
    FORBIDDEN = "FORBIDDEN"
    BAD_USER_INPUT = "BAD_USER_INPUT"
    NOT_FOUND = "NOT_FOUND"
    RATE_LIMITED = "RATE_LIMITED"
    QUERY_TOO_COMPLEX = "QUERY_TOO_COMPLEX"
    INTERNAL = "INTERNAL"
    # An addition to the contract: the server is briefly out of capacity (connection pool exhausted,
    # statement timeout, database unreachable); the same request may succeed after ``retryAfter`` seconds.
    UNAVAILABLE = "UNAVAILABLE"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.BAD_USER_INPUT: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.QUERY_TOO_COMPLEX: 400,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
}


class GatewayError(Exception):
    """Base of every error the gateway reports to a client."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def extensions(self) -> dict[str, str | int]:
        return {"code": self.code.value}


class Unauthenticated(GatewayError):
    code = ErrorCode.UNAUTHENTICATED


class Forbidden(GatewayError):
    code = ErrorCode.FORBIDDEN


class BadUserInput(GatewayError):
    code = ErrorCode.BAD_USER_INPUT


class QueryTooComplex(GatewayError):
    code = ErrorCode.QUERY_TOO_COMPLEX


class Retryable(GatewayError):
    """An error the client may retry after ``retry_after_s`` seconds (``extensions.retryAfter``)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def extensions(self) -> dict[str, str | int]:
        return {"code": self.code.value, "retryAfter": self.retry_after_s}


class RateLimited(Retryable):
    code = ErrorCode.RATE_LIMITED


class Unavailable(Retryable):
    code = ErrorCode.UNAVAILABLE


class ConfigError(Exception):
    """A setting is missing or wrong; the message is one line naming it."""
