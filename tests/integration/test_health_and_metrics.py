"""/healthz, /readyz and /metrics against the real database."""

from __future__ import annotations

import datetime as dt
import gc

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from kernel.hours import floor_hour
from kernel.settings import ProcessRole, Settings
from tests.conftest import TokenFactory
from tests.helpers import graphql
from tests.integration.ingest_support import eventually


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_reports_each_dependency(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["database"]["migration"] == body["checks"]["database"]["expected_migration"]
    assert body["checks"]["redis"] == {"ok": True, "configured": True}
    assert body["checks"]["amqp"] == {"ok": True, "configured": True}


async def test_readyz_is_503_when_the_database_is_unreachable(settings: Settings) -> None:
    dead = settings.model_copy(
        update={"database_url": settings.database_url.__class__("postgresql://postgres@127.0.0.1:1/none")}
    )
    app = create_app(dead)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
            response = await http.get("/readyz")
            assert (await http.get("/healthz")).status_code == 200
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["database"]["ok"] is False


async def test_readyz_is_503_when_migrations_are_behind(settings: Settings, empty_database: str) -> None:
    behind = settings.model_copy(update={"database_url": settings.database_url.__class__(empty_database)})
    # The API role alone: workers failing on the unmigrated database log tracebacks whose rendering can hold
    # the event loop past the probe's 2 s bound (the answer is then a timeout, not the migration state).
    async with LifespanManager(create_app(behind, frozenset({ProcessRole.API}))) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
            response = await http.get("/readyz")
    assert response.status_code == 503
    database = response.json()["checks"]["database"]
    assert database["migration"] is None and "migrate" in database["error"]


async def test_metrics_expose_request_histogram_and_process_metrics(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    await graphql(client, "{ viewer { subject } }", make_token("viewer", org="o"))
    response = await client.get("/metrics")
    assert response.status_code == 200
    text = response.text
    graphql_buckets = [
        line
        for line in text.splitlines()
        if line.startswith("http_server_duration_milliseconds_bucket")
        and 'http_target="/graphql"' in line
        and 'http_status_code="200"' in line
    ]
    assert graphql_buckets, text[:2000]
    assert "http_server_duration_milliseconds_count" in text
    assert "process_cpu_seconds_total" in text


async def test_metrics_expose_garbage_collector_pauses(client: httpx.AsyncClient) -> None:
    gc.collect()  # at least one full collection has been timed
    samples = {
        (sample.name, sample.labels.get("generation")): sample.value
        for family in text_string_to_metric_families((await client.get("/metrics")).text)
        for sample in family.samples
    }
    assert samples[("python_gc_pause_seconds_total", "2")] > 0
    assert samples[("python_gc_longest_pause_seconds", "2")] > 0
    assert samples[("python_gc_collections_total", "2")] >= 1


@pytest.mark.parametrize(
    ("roles", "graphql_served", "events_served"),
    [
        (frozenset({ProcessRole.API}), True, False),
        (frozenset({ProcessRole.INGEST, ProcessRole.ROLLUP}), False, True),
        (frozenset({ProcessRole.EXPORT}), False, False),
    ],
    ids=["api", "ingest-rollup", "export"],
)
async def test_roles_decide_the_routes(
    settings: Settings, roles: frozenset[ProcessRole], graphql_served: bool, events_served: bool
) -> None:
    own = settings.model_copy(update={"amqp_url": None})  # no AMQP consumer for these apps
    async with LifespanManager(create_app(own, roles), startup_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/metrics")).status_code == 200
            graphql = await client.post("/graphql", json={"query": "{ viewer { subject } }"})
            events = await client.post("/v1/events", content=b"[]")
    assert (graphql.status_code != 404) is graphql_served  # served: 401 without a token
    assert (events.status_code != 404) is events_served


async def test_the_alert_gauges_are_fed_by_the_running_workers(client: httpx.AsyncClient) -> None:
    """FreshnessPromiseBroken and RollupWatermarkBehind read these: the consumer's heartbeat and the rollup
    worker's cycles must feed them in a serving process, not only in unit tests."""

    async def gauges() -> dict[str, float]:
        text = (await client.get("/metrics")).text
        return {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name in ("analytics_ingest_lag_seconds", "analytics_rollup_watermark_timestamp_seconds")
        }

    async def both() -> bool:
        return len(await gauges()) == 2

    await eventually(both, timeout=30, what="both alert gauges on /metrics")
    values = await gauges()
    assert 0 <= values["analytics_ingest_lag_seconds"] < 300
    watermark = dt.datetime.fromtimestamp(values["analytics_rollup_watermark_timestamp_seconds"], dt.UTC)
    assert watermark == floor_hour(watermark) and watermark <= dt.datetime.now(dt.UTC)
