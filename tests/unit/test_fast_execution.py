"""The fast execution path gives the ordinary executor's answers.

The same schema types run under graphql-core's ordinary execution context and
under :class:`schema.execution.FastExecutionContext`; data must be identical,
and errors identical up to the documented collapse (one error per field inside
a list, at the first item's path).
"""

from __future__ import annotations

import datetime as dt
import decimal
import gc
from dataclasses import dataclass
from typing import Any

import pytest
import strawberry
from hypothesis import given, settings
from hypothesis import strategies as st
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext

from kernel.auth import Caller
from resolvers.root import build_schema
from schema import execution
from schema.enums import Severity
from schema.errors import collapse_list_errors, format_error
from schema.json import dumps
from schema.scalars import BigInt
from schema.usage import UsageBucket, UsageGroup

START = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def _bucket(i: int, *, naive: bool = False, project: str | None = "p") -> UsageBucket:
    start = START + dt.timedelta(hours=i)
    return UsageBucket(
        start=start.replace(tzinfo=None) if naive else start, end=start + dt.timedelta(hours=1),
        group=UsageGroup(model=f"m{i % 3}", project_id=project if i % 2 else None, api_key_id=None),
        requests=BigInt(i), input_tokens=BigInt(2**40 + i), cached_input_tokens=BigInt(i // 2),
        output_tokens=BigInt(3 * i), total_tokens=BigInt(2**40 + 4 * i),
        spend=decimal.Decimal("0.000123") * i if i % 4 else None,
    )  # fmt: skip


class _Count(int):
    def __repr__(self) -> str:
        return "count"


class _Name(str):
    pass


@strawberry.type
class Flaky:
    n: int

    @strawberry.field
    def boom(self) -> str | None:
        if self.n == 2:
            raise ValueError("boom at 2")
        return f"ok {self.n}"


@strawberry.type
class Tagged:
    """An item with a list of objects inside it (as ReliabilityBucket.latency): projected by the fast path too."""

    n: int
    parts: list[UsageGroup]
    maybe_parts: list[UsageGroup] | None
    flaky_parts: list[Flaky]


class _Real(float):
    pass


@strawberry.type
class Measured:
    """Floats that the Float serializer passes, converts or refuses: the projector's inline check must pass
    through only finite plain floats."""

    x: float


@strawberry.type
class Graded:
    """An enum field (as Spike.metric): its serializer is a bound method, a new object at every access."""

    n: int
    severity: Severity


@strawberry.type
class SampleQuery:
    @strawberry.field
    def graded(self) -> list[Graded]:
        return [Graded(n=i, severity=Severity.CRITICAL if i % 2 else Severity.WARNING) for i in range(3)]

    @strawberry.field
    def measured(self) -> list[Measured]:
        values: list[Any] = [1.5, -0.0, 1e308, 2, True, _Real(2.5), 0.1]
        return [Measured(x=v) for v in values]

    @strawberry.field
    def not_finite(self) -> list[Measured]:
        return [Measured(x=1.0), Measured(x=float("inf")), Measured(x=float("nan"))]

    @strawberry.field
    def tagged(self) -> list[Tagged]:
        return [
            Tagged(n=i, parts=[UsageGroup(model=f"m{j}", project_id=None if j % 2 else "p", api_key_id=None)
                               for j in range(i)],
                   maybe_parts=None if i % 2 else [UsageGroup(model="x", project_id=None, api_key_id="k")],
                   flaky_parts=[Flaky(n=j) for j in range(i)])
            for i in range(4)
        ]  # fmt: skip

    @strawberry.field
    def buckets(self) -> list[UsageBucket]:
        return [_bucket(i) for i in range(12)]

    @strawberry.field
    def with_naive_time(self) -> list[UsageBucket]:
        return [_bucket(0), _bucket(1, naive=True), _bucket(2)]

    @strawberry.field
    def unusual_values(self) -> list[UsageBucket]:
        """Values that serializers change (the projector's inline checks must not pass them through)."""
        kolkata = dt.timezone(dt.timedelta(hours=5, minutes=30))
        odd = _bucket(1)
        odd.start = odd.start.astimezone(kolkata)  # answered in UTC
        odd.requests = True  # type: ignore[assignment]  # a bool is not a BigInt: int(True) is 1
        odd.output_tokens = _Count(7)  # type: ignore[assignment]  # an int subclass becomes a plain int
        odd.group.model = _Name("m-sub")
        return [_bucket(0), odd, _bucket(2)]

    @strawberry.field
    def nullable_buckets(self) -> list[UsageBucket | None]:
        return [_bucket(0), None, _bucket(2)]

    @strawberry.field
    def flaky(self) -> list[Flaky]:
        return [Flaky(n=i) for i in range(4)]

    @strawberry.field
    def empty(self) -> list[UsageBucket]:
        return []


@dataclass
class FakeContext:
    caller: Caller


FAST = build_schema(query=SampleQuery, mutation=None, subscription=None)
ORDINARY = build_schema(
    query=SampleQuery, mutation=None, subscription=None, execution_context_class=StrawberryGraphQLCoreExecutionContext
)
FINANCE = Caller("f", "o", ("finance",))
ENGINEER = Caller("e", "o", ("engineer",))


async def _both(query: str, caller: Caller, variables: dict[str, Any] | None = None) -> tuple[Any, Any]:
    results = []
    for schema in (FAST, ORDINARY):
        result = await schema.execute(query, variable_values=variables, context_value=FakeContext(caller))
        errors = [format_error(e) for e in collapse_list_errors(result.errors or [])]
        results.append((dumps(result.data), sorted(errors, key=str)))
    return results[0], results[1]


CORPUS = [
    "{ buckets { start end requests inputTokens spend } }",
    "{ buckets { __typename a: requests b: requests start group { __typename model projectId apiKeyId } } }",
    "{ buckets { ...B } } fragment B on UsageBucket { start ...C group { ...G } } "
    "fragment C on UsageBucket { totalTokens cachedInputTokens } fragment G on UsageGroup { model }",
    "{ buckets { ... on UsageBucket { start outputTokens } spend } }",
    "query($yes: Boolean!, $no: Boolean!) { buckets { start @include(if: $yes) end @include(if: $no) "
    "requests @skip(if: $yes) group @skip(if: $no) { model projectId } } }",
    "{ withNaiveTime { start requests } }",
    "{ unusualValues { start requests outputTokens group { model } } }",
    "{ nullableBuckets { start spend group { model } } }",
    "{ flaky { n boom } }",
    "{ empty { start } }",
    "{ x: buckets { start } y: buckets { spend group { apiKeyId } } }",
    "{ tagged { n parts { model projectId } maybeParts { apiKeyId __typename } } }",
    "{ tagged { parts { ...G } } } fragment G on UsageGroup { model apiKeyId }",
    "{ tagged { n flakyParts { n boom } } }",
    "{ measured { x } }",
    "{ notFinite { x } }",
    "{ graded { n severity } }",
]


@pytest.mark.parametrize("caller", [FINANCE, ENGINEER], ids=["with-spend", "without-spend"])
@pytest.mark.parametrize("query", CORPUS)
async def test_fast_path_equals_ordinary_executor(query: str, caller: Caller) -> None:
    fast, ordinary = await _both(query, caller, {"yes": True, "no": False})
    assert fast == ordinary


async def test_forbidden_field_in_a_list_is_one_error_at_the_first_item() -> None:
    result = await FAST.execute("{ buckets { requests spend } }", context_value=FakeContext(ENGINEER))
    assert result.data is not None and all(b["spend"] is None for b in result.data["buckets"])
    assert [(e.path, (e.extensions or {}).get("code")) for e in result.errors or []] == [
        (["buckets", 0, "spend"], "FORBIDDEN")
    ]


async def test_errors_mid_list_are_reported_as_the_ordinary_executor_does() -> None:
    naive = await FAST.execute("{ withNaiveTime { start } }", context_value=FakeContext(FINANCE))
    assert naive.data is None  # non-null all the way up, as graphql-core propagates it
    assert [e.path for e in naive.errors or []] == [["withNaiveTime", 1, "start"]]
    flaky = await FAST.execute("{ flaky { n boom } }", context_value=FakeContext(FINANCE))
    assert flaky.data == {"flaky": [{"n": 0, "boom": "ok 0"}, {"n": 1, "boom": "ok 1"}, {"n": 2, "boom": None},
                                    {"n": 3, "boom": "ok 3"}]}  # fmt: skip
    assert [e.path for e in flaky.errors or []] == [["flaky", 2, "boom"]]


BUCKET_FIELDS = ["start", "end", "requests", "inputTokens", "cachedInputTokens", "outputTokens", "totalTokens",
                 "spend", "__typename"]  # fmt: skip
GROUP_FIELDS = ["model", "projectId", "apiKeyId", "__typename"]


@st.composite
def selections(draw: st.DrawFn) -> tuple[str, dict[str, bool]]:
    """A random selection over UsageBucket: aliases, fragments, directives, nesting."""
    variables = {"v0": draw(st.booleans()), "v1": draw(st.booleans())}
    parts: list[str] = []
    for field in draw(st.lists(st.sampled_from([*BUCKET_FIELDS, "group"]), min_size=1, max_size=8)):
        alias = draw(st.sampled_from(["", f"a{len(parts)}: "]))
        directive = draw(st.sampled_from(["", " @include(if: $v0)", " @skip(if: $v1)"]))
        if field == "group":
            sub = " ".join(draw(st.lists(st.sampled_from(GROUP_FIELDS), min_size=1, max_size=4)))
            text = f"{alias}group{directive} {{ {sub} }}"
        else:
            text = f"{alias}{field}{directive}"
        wrap = draw(st.sampled_from(["plain", "inline", "inline-directive"]))
        if wrap == "inline":
            text = f"... on UsageBucket {{ {text} }}"
        elif wrap == "inline-directive":
            text = f"... @include(if: $v1) {{ {text} }}"
        parts.append(text)
    return "query($v0: Boolean!, $v1: Boolean!) { buckets { " + " ".join(parts) + " } }", variables


@settings(max_examples=150, deadline=None)
@given(selections(), st.sampled_from([FINANCE, ENGINEER]))
async def test_random_selections_match(selection: tuple[str, dict[str, bool]], caller: Caller) -> None:
    query, variables = selection
    fast, ordinary = await _both(query, caller, variables)
    assert fast == ordinary, query


async def test_plain_lists_take_the_fast_path_and_others_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without this, equality above could hold because the fast path never ran."""
    ordinary_lists: list[str] = []
    original = StrawberryGraphQLCoreExecutionContext.complete_list_value

    def spy(self: Any, return_type: Any, *args: Any) -> Any:
        ordinary_lists.append(str(return_type.of_type))
        return original(self, return_type, *args)

    monkeypatch.setattr(StrawberryGraphQLCoreExecutionContext, "complete_list_value", spy)
    await FAST.execute("{ buckets { start group { model } } flaky { n boom } tagged { parts { model } } }",
                       context_value=FakeContext(FINANCE))  # fmt: skip
    assert ordinary_lists == ["Flaky!"]  # tagged, with its list of objects inside each item, is projected


async def _unreachable_after(schema: Any, query: str, times: int) -> int:
    """Objects that only the cyclic garbage collector could free, left by ``times`` executions."""
    await schema.execute(query, context_value=FakeContext(FINANCE))  # caches warm
    gc.collect()
    gc.disable()
    try:
        for _ in range(times):
            result = await schema.execute(query, context_value=FakeContext(FINANCE))
            assert not result.errors
        del result
        return gc.collect()
    finally:
        gc.enable()


async def test_a_finished_execution_leaves_no_reference_cycles() -> None:
    """graphql-core's executor refers to itself; the fast path's executor lets go when its response is built,
    so reference counting frees each request's objects and the collector has nothing to do (gc_policy.py)."""
    query = "{ buckets { start requests group { model } } nullableBuckets { spend } }"
    assert await _unreachable_after(ORDINARY, query, 20) >= 20 * 50  # the cycle this guards against
    assert await _unreachable_after(FAST, query, 20) == 0


async def test_a_selection_is_compiled_once_however_often_it_is_asked() -> None:
    """The projector of a selection is cached by its plan's signature: a selection with an enum (whose serializer
    is a new bound method at each access) must not compile again on every request."""
    query = "{ graded { n severity } buckets { start requests } }"
    await FAST.execute(query, context_value=FakeContext(FINANCE))
    compiled = len(execution._compiled_cache)
    for _ in range(5):
        result = await FAST.execute(query, context_value=FakeContext(FINANCE))
        assert not result.errors and result.data
    assert len(execution._compiled_cache) == compiled
