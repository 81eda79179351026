"""Every request has a bounded cost, end to end on the real services (issue 10, findings 4 and 5): per-caller
rate and concurrency limits (Redis and in process), pool exhaustion and statement timeouts as a retryable
UNAVAILABLE, memory after a burst of the 57 MB-type query, and /metrics series under hostile Host headers."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from graphql import GraphQLError
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.types import Message, Receive, Scope, Send

from db.engine import create_engine
from gateway.app import create_app
from gateway.middleware import CallerLimitsMiddleware
from gateway.resources import Resources
from kernel.auth import Caller
from kernel.errors import ErrorCode, RateLimited
from kernel.ratelimit import CallerLimiter, caller_key
from kernel.settings import Settings
from resolvers.root import build_schema
from schema.context import Context
from schema.errors import apply_contract, error_code
from schema.loaders import Loaders
from tests.conftest import TokenFactory
from tests.helpers import graphql

VIEWER = "{ viewer { subject } }"
NOW = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
RANGE_93D = {"from": (NOW - dt.timedelta(days=93)).isoformat(), "to": NOW.isoformat()}
SERIES = "series { start end group { model projectId apiKeyId } requests inputTokens outputTokens totalTokens spend }"


@pytest.fixture
async def limited_app(settings: Settings, request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway allowing 3 requests a minute per caller; ``request.param`` False: without Redis."""
    with_redis = getattr(request, "param", True)
    changes: dict[str, Any] = {
        "rate_limit_per_minute": 3,
        "redis_prefix": f"{settings.redis_prefix}{uuid.uuid4().hex[:6]}:",
    }
    if not with_redis:
        changes["redis_url"] = None
    async with LifespanManager(create_app(settings.model_copy(update=changes))) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
            yield http


@pytest.mark.parametrize("limited_app", [True, False], ids=["redis", "in-process"], indirect=True)
async def test_a_caller_over_its_rate_gets_429_with_retry_after(
    limited_app: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice, bob = make_token("viewer", org="org_a", sub="alice"), make_token("viewer", org="org_a", sub="bob")
    for _ in range(3):
        assert (await graphql(limited_app, VIEWER, alice)).status_code == 200
    refused = await graphql(limited_app, VIEWER, alice)
    assert refused.status_code == 429
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 20  # a minute's 3 requests: one more every 20 s
    error = refused.json()["errors"][0]
    assert error["extensions"] == {"code": "RATE_LIMITED", "retryAfter": retry_after}
    assert (await graphql(limited_app, VIEWER, bob)).status_code == 200  # another caller is not affected
    same_sub_other_org = make_token("viewer", org="org_b", sub="alice")
    assert (await graphql(limited_app, VIEWER, same_sub_other_org)).status_code == 200
    assert (await graphql(limited_app, VIEWER, None)).status_code == 401  # no token: the view's answer


async def test_the_rate_is_shared_through_redis_by_every_replica(
    settings: Settings, resources: Resources, make_token: TokenFactory
) -> None:
    """Two limiters (two processes) on one Redis prefix count one bucket."""
    prefix = f"{settings.redis_prefix}{uuid.uuid4().hex[:6]}:"
    first, second = CallerLimiter(2, 8, prefix), CallerLimiter(2, 8, prefix)
    await first.check_rate(resources.redis, "k")
    await second.check_rate(resources.redis, "k")
    with pytest.raises(RateLimited) as refused:
        await first.check_rate(resources.redis, "k")
    assert error_code_of(refused.value) is ErrorCode.RATE_LIMITED and refused.value.retry_after_s >= 1


async def test_a_huge_limit_still_counts_in_redis(settings: Settings, resources: Resources) -> None:
    """A token worth less than a millisecond once made the script ask Redis for ``PX 0`` (an error), so every
    request fell back to this process's buckets after a failed round trip."""
    limiter = CallerLimiter(1_000_000_000, 8, f"{settings.redis_prefix}{uuid.uuid4().hex[:6]}:")
    assert resources.redis is not None
    assert await limiter._redis_wait_ms(resources.redis, "k") == 0.0  # None: Redis failed, local fallback


async def test_a_client_that_leaves_before_its_body_gets_no_error(app: Starlette, make_token: TokenFactory) -> None:
    """wrk closes connections with requests in flight: no 'Exception in ASGI application' for that."""
    headers = [(b"authorization", f"Bearer {make_token('viewer', org='org_a')}".encode()),
               (b"content-type", b"application/json"), (b"content-length", b"100")]  # fmt: skip
    scope = {"type": "http", "method": "POST", "path": "/graphql", "raw_path": b"/graphql", "query_string": b"",
             "headers": headers, "http_version": "1.1", "scheme": "http", "server": ("gateway.test", 80),
             "client": ("127.0.0.1", 1), "root_path": ""}  # fmt: skip
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)  # raised ClientDisconnect before
    assert all(m["type"] != "http.response.start" or m["status"] < 500 for m in sent)


def error_code_of(exc: BaseException) -> ErrorCode:
    return error_code(GraphQLError(str(exc), original_error=exc))


async def test_a_caller_over_its_concurrency_gets_429_until_a_request_ends(
    resources: Resources, make_token: TokenFactory
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        entered.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = CallerLimitsMiddleware(slow, CallerLimiter(1000, 1, f"test:{uuid.uuid4().hex}:"))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"] = {"resources": resources}
        await middleware(scope, receive, send)

    headers = {"Authorization": f"Bearer {make_token('viewer', org='o', sub='carol')}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as http:
        first = asyncio.create_task(http.post("/graphql", json={"query": VIEWER}, headers=headers))
        await entered.wait()
        second = await http.post("/graphql", json={"query": VIEWER}, headers=headers)
        release.set()
        assert (await first).status_code == 200
        third = await http.post("/graphql", json={"query": VIEWER}, headers=headers)
    assert second.status_code == 429 and second.headers["Retry-After"] == "1"
    assert second.json()["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
    assert third.status_code == 200


async def test_websocket_operations_are_rate_limited_with_a_graphql_error(
    settings: Settings, resources: Resources
) -> None:
    """The WebSocket transport runs each operation through ``Schema.stream``, which applies the caller's rate."""
    schema = build_schema(settings.model_copy(update={"rate_limit_per_minute": 2,
                                                      "redis_prefix": f"test:{uuid.uuid4().hex}:"}))  # fmt: skip
    context = Context(resources=resources, caller=Caller("dave", "o", ("viewer",)), loaders=Loaders(resources))
    results = []
    for _ in range(3):
        stream = await schema.stream(VIEWER, context_value=context)
        results.append([result async for result in stream])
    assert [r[0].data for r in results[:2]] == [{"viewer": {"subject": "dave"}}] * 2
    refused = results[2][0]
    assert refused.data is None and refused.errors
    assert refused.errors[0].extensions["code"] == "RATE_LIMITED"  # type: ignore[index]
    assert refused.errors[0].extensions["retryAfter"] >= 1  # type: ignore[index]


async def test_pool_exhaustion_answers_unavailable_not_internal(settings: Settings, make_token: TokenFactory) -> None:
    small = settings.model_copy(update={"db_pool_size": 1, "db_pool_timeout_s": 0.5})
    async with LifespanManager(create_app(small)) as manager:
        resources: Resources = manager._state["resources"]
        transport = httpx.ASGITransport(app=manager.app)
        # pool_size 1 + overflow 1: hold both connections, as 32 slow requests at once did.
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http,
            resources.query_engine.connect() as one,
            resources.query_engine.connect() as two,
        ):
            await one.execute(text("SELECT 1"))
            await two.execute(text("SELECT 1"))
            query = 'query($r: TimeRange!) { usage(orgId: "org_a", range: $r) { totals { requests } } }'
            range_ = {"from": (NOW - dt.timedelta(days=1)).isoformat(), "to": NOW.isoformat()}
            response = await graphql(http, query, make_token("viewer", org="org_a"), {"r": range_})
            # The workers' pool is another: the health check still answers while queries wait.
            assert (await http.get("/readyz")).status_code == 200
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    errors = response.json()["errors"]
    assert [e["extensions"]["code"] for e in errors] == ["UNAVAILABLE"], errors
    assert errors[0]["extensions"]["retryAfter"] >= 1
    assert "QueuePool" not in errors[0]["message"]


async def test_queries_run_under_the_statement_timeout_and_workers_do_not(resources: Resources) -> None:
    async with resources.query_engine.connect() as connection:
        assert (await connection.execute(text("SHOW statement_timeout"))).scalar() == "15s"
    async with resources.engine.connect() as connection:
        assert (await connection.execute(text("SHOW statement_timeout"))).scalar() == "0"


async def test_a_statement_past_the_timeout_is_cancelled_and_answers_unavailable(database_url: str) -> None:
    engine = create_engine(database_url, pool_size=1, statement_timeout_ms=100)
    try:
        async with engine.connect() as connection:
            with pytest.raises(DBAPIError) as cancelled:
                await connection.execute(text("SELECT pg_sleep(2)"))
    finally:
        await engine.dispose()
    error = GraphQLError("x", path=["usage"], original_error=cancelled.value)
    apply_contract(error)
    assert error.extensions == {"code": "UNAVAILABLE", "retryAfter": 1}


def _rss_mb() -> float:
    resident_pages = int(Path(f"/proc/{os.getpid()}/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 1e6


async def test_a_burst_of_the_57_mb_query_is_refused_and_memory_comes_back(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    one = f'usage(orgId: "org_a", range: $r, granularity: HOUR, groupBy: [MODEL, PROJECT, API_KEY]) {{ {SERIES} }}'
    query = "query($r: TimeRange!) { " + " ".join(f"u{i}: {one}" for i in range(50)) + " }"
    token = make_token("org_admin", org="org_a", sub=f"burst-{uuid.uuid4().hex[:6]}")
    gc.collect()
    before = _rss_mb()
    responses = await asyncio.gather(*(graphql(client, query, token, {"r": RANGE_93D}) for _ in range(32)))
    gc.collect()
    after = _rss_mb()
    codes = {r.json()["errors"][0]["extensions"]["code"] for r in responses if r.status_code != 429}
    assert codes == {"QUERY_TOO_COMPLEX"}, codes
    assert after - before < 50, f"RSS {before:.0f} MB -> {after:.0f} MB"
    print(f"RSS before {before:.1f} MB, after the burst {after:.1f} MB")  # the report's figure (pytest -s)


def _series(metrics_text: str) -> int:
    return sum(len(family.samples) for family in text_string_to_metric_families(metrics_text)
               if family.name.startswith("http_server"))  # fmt: skip


async def test_unique_hosts_and_paths_do_not_grow_metrics(app: Starlette) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:

        async def hostile(i: int) -> None:
            await http.get(f"/nothing-{uuid.uuid4().hex}", headers={"Host": f"h{i}-{uuid.uuid4().hex}.example:{i}"})

        await hostile(0)  # the 404 series exist from here on
        await http.get("/healthz", headers={"Host": "first.example"})
        await http.get("/metrics")  # its own series appear from the next exposition on
        before = _series((await http.get("/metrics")).text)
        for i in range(1, 501):
            await hostile(i)
            await http.get("/healthz", headers={"Host": f"h{i}.example"})
        text_after = (await http.get("/metrics")).text
    assert _series(text_after) == before
    assert "h17.example" not in text_after and "nothing-" not in text_after


async def test_over_the_websocket_a_subscription_holds_no_concurrency_slot_but_a_query_does(
    settings: Settings, resources: Resources
) -> None:
    schema = build_schema(settings.model_copy(update={"max_concurrent_per_caller": 1}))
    caller = Caller(f"erin-{uuid.uuid4().hex[:6]}", "org_e", ("viewer",))
    context = Context(resources=resources, caller=caller, loaders=Loaders(resources))
    subscription = await schema.stream('subscription { freshness(orgId: "org_e") { orgId } }', context_value=context)
    first = await anext(subscription)  # type: ignore[call-overload]
    assert first.data == {"freshness": {"orgId": "org_e"}}, first
    try:
        # The subscription stays open; a query of the same caller still runs, and holds the only slot while it does.
        query = await schema.stream(VIEWER, context_value=context)
        answered = await anext(query)  # type: ignore[call-overload]
        assert answered.data == {"viewer": {"subject": caller.subject}}
        assert schema.limiter.running(caller_key(caller)) == 1
        blocked = [r async for r in await schema.stream(VIEWER, context_value=context)]
        assert blocked[0].errors[0].extensions["code"] == "RATE_LIMITED"  # type: ignore[index]
        await query.aclose()  # type: ignore[attr-defined]
        assert schema.limiter.running(caller_key(caller)) == 0
    finally:
        await subscription.aclose()  # type: ignore[attr-defined]


async def test_leased_tokens_never_let_replicas_exceed_the_rate(settings: Settings, resources: Resources) -> None:
    """Busy callers take tokens from Redis in leases; two replicas sharing a bucket of 120 a minute still
    admit at most 120 at once, and a lease costs one Redis call for many requests."""
    prefix = f"{settings.redis_prefix}{uuid.uuid4().hex[:6]}:"
    replicas = [CallerLimiter(120, 8, prefix), CallerLimiter(120, 8, prefix)]
    assert resources.redis is not None
    calls_before = await _evalsha_calls(resources)
    admitted = 0
    for i in range(400):
        try:
            await replicas[i % 2].check_rate(resources.redis, "busy")
            admitted += 1
        except RateLimited:
            pass
    assert 100 <= admitted <= 120, admitted
    assert await _evalsha_calls(resources) - calls_before < 400 / 2


async def _evalsha_calls(resources: Resources) -> int:
    assert resources.redis is not None
    stats = await resources.redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
