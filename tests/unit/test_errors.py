"""Error codes as clients see them."""

from __future__ import annotations

from graphql import GraphQLError

from kernel.errors import ErrorCode
from schema.errors import error_code


def test_limiter_messages_and_only_they_are_too_complex() -> None:
    too_complex = [
        "'q' exceeds maximum operation depth of 10",
        "60 aliases found. Allowed: 50",
        "Syntax Error: Document contains more than 5000 tokens.",
    ]
    for message in too_complex:
        assert error_code(GraphQLError(message)) is ErrorCode.QUERY_TOO_COMPLEX, message
    for message in ("Cannot query field 'tokens' on type 'UsageBucket'.", "Unknown argument 'aliases'."):
        assert error_code(GraphQLError(message)) is ErrorCode.BAD_USER_INPUT, message
