"""Bounded cost of every GraphQL request: document size, fields after fragment expansion, estimated cost,
the introspection switch, and the codes of capacity errors (issue 10, findings 4 and 6)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest
from graphql import GraphQLError, get_introspection_query, parse
from sqlalchemy.exc import TimeoutError as PoolTimeout
from strawberry.types import ExecutionResult
from strawberry.types.execution import PreExecutionError

from bench.graphql_bench import USAGE_QUERY
from kernel.errors import ErrorCode, Unavailable
from kernel.settings import Settings
from resolvers.root import build_schema
from schema.cost import estimate_cost
from schema.errors import apply_contract, error_code
from schema.field_count import count_fields

SCHEMA = build_schema()
RANGE_93D = '{from: "2026-01-01T00:00:00Z", to: "2026-04-04T00:00:00Z"}'
SERIES = "series { start end group { model projectId apiKeyId } requests inputTokens outputTokens totalTokens }"


def _fragment_bomb(fields: int = 2490, spreads: int = 1240) -> str:
    """The issue's 26 KB document: a fragment of ``fields`` fields spread ``spreads`` times (under 5,000 tokens)."""
    names = " ".join("subject" for _ in range(fields))
    spread = " ".join("...V" for _ in range(spreads))
    return f"query {{ viewer {{ {spread} }} }} fragment V on Viewer {{ {names} }}"


async def _execute(query: str, variables: dict[str, Any] | None = None, schema: Any = SCHEMA) -> ExecutionResult:
    result: ExecutionResult = await schema.execute(query, variable_values=variables, context_value=None)
    return result


def _codes(result: ExecutionResult) -> list[str]:
    return [error.extensions["code"] for error in result.errors or ()]  # type: ignore[index]


def test_fields_are_counted_after_fragment_expansion_in_linear_time() -> None:
    document = parse("query { viewer { ...A ...A } } fragment A on Viewer { subject ...B ...B } "
                     "fragment B on Viewer { orgId roles }")  # fmt: skip
    # viewer + 2 × (subject + 2 × 2)
    assert count_fields(document, cap=10**9) == 1 + 2 * (1 + 2 * 2)
    chain = " ".join(f"fragment F{i} on Viewer {{ ...F{i + 1} ...F{i + 1} }}" for i in range(200))
    exploding = parse(f"query {{ viewer {{ ...F0 }} }} {chain} fragment F200 on Viewer {{ subject }}")
    started = time.perf_counter()
    assert count_fields(exploding, cap=1000) == 1000  # 2**200 fields, capped, counted in linear time
    assert time.perf_counter() - started < 0.05


def test_fragment_cycles_and_deep_nesting_do_not_break_the_count() -> None:
    cyclic = parse("query { viewer { ...A } } fragment A on Viewer { subject ...B } fragment B on Viewer { ...A }")
    assert count_fields(cyclic, cap=100) == 2
    # The parser refuses deep nesting; a long chain of fragments is the deep structure it accepts.
    chain = " ".join(f"fragment F{i} on Viewer {{ subject ...F{i + 1} }}" for i in range(3000))
    deep = parse(f"query {{ viewer {{ ...F0 }} }} {chain} fragment F3000 on Viewer {{ subject }}", max_tokens=None)
    assert count_fields(deep, cap=10**6) == 1 + 3001


async def test_fragment_bomb_is_refused_before_validation() -> None:
    query = _fragment_bomb()
    assert 25_000 < len(query) < 32 * 1024
    started = time.perf_counter()
    result = await _execute(query)
    elapsed = time.perf_counter() - started
    assert _codes(result) == ["QUERY_TOO_COMPLEX"]
    assert "fields" in result.errors[0].message and "1000" in result.errors[0].message  # type: ignore[index]
    assert elapsed < 0.3, f"refusing took {elapsed:.3f} s on the event loop (validating it took 2.7 s)"


async def test_oversized_document_is_refused_before_parsing_and_not_cached() -> None:
    literal = "x" * (10 * 1024 * 1024)
    query = f'query {{ freshness(orgId: "{literal}") {{ status }} }}'
    started = time.perf_counter()
    result = await _execute(query)
    assert time.perf_counter() - started < 0.1
    assert _codes(result) == ["QUERY_TOO_COMPLEX"]
    message = result.errors[0].message  # type: ignore[index]
    assert str(len(query)) in message and str(32 * 1024) in message
    assert SCHEMA.documents.largest_bytes() <= 32 * 1024  # type: ignore[attr-defined]


async def test_oversized_document_is_refused_over_streaming_transports_too() -> None:
    """The WebSocket transport calls ``Schema.stream``: the size check holds there without an HTTP body."""
    query = 'subscription { freshness(orgId: "' + "x" * 40_000 + '") { status } }'
    stream = await SCHEMA.stream(query, context_value=None)
    first = await anext(stream)  # type: ignore[call-overload]
    await stream.aclose()  # type: ignore[attr-defined]
    assert isinstance(first, PreExecutionError)
    assert [e.extensions["code"] for e in first.errors or ()] == ["QUERY_TOO_COMPLEX"]  # type: ignore[index]


def _usage_aliases(count: int, group_by: str = "[MODEL, PROJECT, API_KEY]") -> str:
    one = f'usage(orgId: "o", range: {RANGE_93D}, granularity: HOUR, groupBy: {group_by}) {{ {SERIES} }}'
    return "query { " + " ".join(f"u{i}: {one}" for i in range(count)) + " }"


async def test_fifty_aliases_of_a_93_day_hourly_usage_are_refused_with_estimate_and_budget() -> None:
    result = await _execute(_usage_aliases(50))
    assert _codes(result) == ["QUERY_TOO_COMPLEX"]
    message = result.errors[0].message  # type: ignore[index]
    estimate = estimate_cost(SCHEMA._schema, parse(_usage_aliases(50)), None, {})
    assert f"{estimate:,}" in message and "200,000" in message, message


async def test_cost_comes_from_arguments_and_variables() -> None:
    def cost(query: str, variables: dict[str, Any] | None = None) -> int:
        return estimate_cost(SCHEMA._schema, parse(query), None, variables or {})

    hourly = (
        'query($r: TimeRange!, $g: Granularity!) { usage(orgId: "o", range: $r, granularity: $g) { ' + SERIES + " } }"
    )
    day = {"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"}
    month = {"from": "2026-01-01T00:00:00Z", "to": "2026-01-31T00:00:00Z"}
    assert cost(hourly, {"r": month, "g": "HOUR"}) > 25 * cost(hourly, {"r": day, "g": "HOUR"})
    assert cost(hourly, {"r": month, "g": "DAY"}) < cost(hourly, {"r": month, "g": "HOUR"}) / 20
    one_dim = cost(_usage_aliases(1, "[MODEL]"))
    assert cost(_usage_aliases(1, "[MODEL, PROJECT]")) > 5 * one_dim
    filtered = _usage_aliases(1, "[MODEL]").replace("groupBy:", 'filter: {models: ["a", "b"]}, groupBy:')
    assert cost(filtered) < one_dim / 3
    assert cost(_usage_aliases(2, "[MODEL]")) == 2 * one_dim
    assert cost("{ viewer { subject } }") < 10


def test_the_benchmark_and_introspection_queries_fit_the_budget() -> None:
    month = {"from": "2026-01-01T00:00:00Z", "to": "2026-01-31T00:00:00Z"}
    for granularity, variables in (
        ("HOUR", {"range": month}),
        ("DAY", {"range": {**month, "from": "2025-01-31T00:00:00Z"}}),
    ):
        cost = estimate_cost(SCHEMA._schema, parse(USAGE_QUERY), None, {**variables, "granularity": granularity})
        assert cost < 200_000, (granularity, cost)
    assert estimate_cost(SCHEMA._schema, parse(get_introspection_query()), None, {}) < 200_000


async def test_introspection_can_be_switched_off_but_typename_stays() -> None:
    closed = build_schema(settings=Settings(introspection_enabled=False))
    for query in ("{ __schema { types { name } } }", '{ __type(name: "Query") { name } }'):
        result = await _execute(query, schema=closed)
        assert set(_codes(result)) == {"FORBIDDEN"}, result
        assert "introspection" in result.errors[0].message.lower()  # type: ignore[index]
    assert (await _execute("{ __typename }", schema=closed)).data == {"__typename": "Query"}
    assert (await _execute("{ __schema { queryType { name } } }")).data is not None  # on by default


def test_pool_exhaustion_statement_timeout_and_lost_connections_are_unavailable_and_retryable() -> None:
    causes: list[Exception] = [
        PoolTimeout("QueuePool limit of size 1 overflow 1 reached"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        ConnectionRefusedError(111, "Connect call failed"),
    ]
    for cause in causes:
        error = GraphQLError("boom", path=["usage"], original_error=cause)
        assert error_code(error) is ErrorCode.UNAVAILABLE, cause
        apply_contract(error)
        assert error.extensions == {"code": "UNAVAILABLE", "retryAfter": 1}, cause
        assert "boom" not in error.message and "closed" not in error.message


def test_apply_contract_keeps_a_gateway_errors_own_extensions() -> None:
    error = GraphQLError("busy", path=["usage"], original_error=Unavailable("busy", retry_after_s=7))
    apply_contract(error)
    assert error.extensions == {"code": "UNAVAILABLE", "retryAfter": 7}


@pytest.mark.parametrize("size", [1, 100])
async def test_a_trivial_query_still_runs(size: int) -> None:
    # ``viewer`` needs a caller: no caller is a resolver error, which proves the limits let it through.
    results = await asyncio.gather(*(_execute("{ __typename }") for _ in range(size)))
    assert all(r.data == {"__typename": "Query"} and not r.errors for r in results)
