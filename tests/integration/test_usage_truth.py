"""``usage`` against ground truth: every granularity, grouping, filter and zone,
with duplicates, late events and a price change, before and after rollups."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from db.engine import create_engine
from db.migrate import migrate
from db.rollup import run_cycle
from gateway.app import create_app
from ingest.synthetic import Traffic, generate
from ingest.topology import Topology
from kernel.settings import ProcessRole, Settings
from tests.conftest import TokenFactory
from tests.helpers import graphql
from tests.integration.ingest_support import drained, publish_mixed, publisher
from tests.integration.usage_truth import PriceVersion, as_api, distinct, expected_usage

pytestmark = pytest.mark.slow

START = dt.datetime(2026, 10, 30, tzinfo=dt.UTC)  # spans the end of DST in New York (2026-11-01)
SPAN = dt.timedelta(days=4)
PRICE_CHANGE = dt.datetime(2026, 11, 1, 12, tzinfo=dt.UTC)

USAGE = """
query($org: ID!, $from: DateTime!, $to: DateTime!, $g: Granularity!, $tz: String!, $by: [UsageDimension!]!,
      $filter: UsageFilter) {
  usage(orgId: $org, range: {from: $from, to: $to}, granularity: $g, timeZone: $tz, groupBy: $by, filter: $filter) {
    totals { requests inputTokens cachedInputTokens outputTokens totalTokens spend }
    series { start end group { model projectId apiKeyId } requests inputTokens cachedInputTokens outputTokens
             totalTokens spend }
    unpricedModels
  }
}
"""


@dataclass
class World:
    http: httpx.AsyncClient
    database_url: str
    prefix: str
    published: list[dict[str, object]]
    later: list[dict[str, object]]
    prices: list[PriceVersion]
    org: str

    @property
    def events(self) -> list[dict[str, object]]:
        return distinct(self.published)

    async def publish(self, events: list[dict[str, object]]) -> None:
        async with publisher(self.prefix) as pub:
            await publish_mixed(pub, events)
        await drained(Topology.named(self.prefix).queue)
        self.published.extend(events)


@pytest.fixture(scope="module")
async def world(settings: Settings, empty_database_module: str, make_token: TokenFactory) -> AsyncIterator[World]:
    """A gateway of its own (API and ingester, no rollup worker) on its own database and queues."""
    prefix = f"{settings.amqp_prefix}truth{uuid.uuid4().hex[:6]}."
    own = settings.model_copy(update={"database_url": settings.database_url.__class__(empty_database_module),
                                      "amqp_prefix": prefix})  # fmt: skip
    engine = create_engine(empty_database_module, pool_size=1)
    await migrate(engine)
    await engine.dispose()
    app = create_app(own, roles=frozenset({ProcessRole.API, ProcessRole.INGEST}))
    async with LifespanManager(app, startup_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
            traffic = Traffic(
                seed=5, events=6000, orgs=4, models=3, start=START, span=SPAN,
                duplicate_share=0.15, late_share=0.1, late_hours=20, source=f"//truth/{prefix}",
            )  # fmt: skip
            events = list(generate(traffic))
            models = sorted({e["data"]["model"] for e in events})  # type: ignore[index]
            prices = await _set_prices(http, make_token("platform_admin"), models)
            cut = len(events) * 7 // 10
            world = World(http, empty_database_module, prefix, [], events[cut:], prices, "org_0000")
            await world.publish(events[:cut])
            yield world


async def _set_prices(http: httpx.AsyncClient, token: str, models: list[str]) -> list[PriceVersion]:
    """Prices for all but the last model (which stays unpriced), one of them corrected mid-range."""
    prices = [
        PriceVersion(models[0], START - dt.timedelta(days=30), decimal.Decimal("0.15"), decimal.Decimal("0.60"),
                  decimal.Decimal("0.075")),
        PriceVersion(models[0], PRICE_CHANGE, decimal.Decimal("0.1234567"), decimal.Decimal("0.5"),
                  decimal.Decimal("0.0617")),
        PriceVersion(models[1], START, decimal.Decimal("2.5"), decimal.Decimal("10"), decimal.Decimal("2.5")),
    ]  # fmt: skip
    mutation = """mutation($i: ModelPriceInput!) { upsertModelPrice(input: $i) { model cachedInputPerMillion } }"""
    for price in prices:
        variables = {"i": {"model": price.model, "effectiveFrom": price.effective_from.isoformat(),
                           "inputPerMillion": str(price.input), "outputPerMillion": str(price.output),
                           "cachedInputPerMillion": str(price.cached)}}  # fmt: skip
        body = (await graphql(http, mutation, token, variables)).json()
        assert "errors" not in body, body
    return prices


CASES = [
    ("HOUR", "UTC", [], None),
    ("HOUR", "UTC", ["MODEL"], None),
    ("DAY", "UTC", [], None),
    ("DAY", "UTC", ["MODEL", "PROJECT"], None),
    ("DAY", "UTC", ["PROJECT"], None),
    ("HOUR", "UTC", ["API_KEY"], "first-model"),
    ("DAY", "Asia/Kolkata", ["PROJECT", "API_KEY"], None),
    ("DAY", "Asia/Kolkata", ["MODEL"], None),
    ("DAY", "America/New_York", [], None),
    ("DAY", "America/New_York", ["MODEL"], "first-model"),
    ("MONTH", "Asia/Kolkata", ["MODEL", "PROJECT", "API_KEY"], None),
    ("MONTH", "America/New_York", [], None),
]


def _ranges() -> list[tuple[dt.datetime, dt.datetime]]:
    return [
        (START - dt.timedelta(days=1), START + SPAN + dt.timedelta(days=1)),
        (START + dt.timedelta(hours=13, minutes=17), START + dt.timedelta(days=3, hours=2, minutes=41)),
    ]


async def _check_all(world: World, token: str) -> None:
    models = sorted({e["data"]["model"] for e in world.events})  # type: ignore[index]
    for granularity, zone, group_by, filter_name in CASES:
        for start, end in _ranges():
            filter_models = [models[0]] if filter_name else None
            await _check(world, token, granularity, zone, group_by, start, end, filter_models)
    # MINUTE over a few hours that hold late events.
    await _check(world, token, "MINUTE", "UTC", ["MODEL"], START + dt.timedelta(hours=30),
                 START + dt.timedelta(hours=33, minutes=30), None)  # fmt: skip


async def _check(
    world: World, token: str, granularity: str, zone: str, group_by: list[str],
    start: dt.datetime, end: dt.datetime, models: list[str] | None,
) -> None:  # fmt: skip
    variables = {"org": world.org, "from": start.isoformat(), "to": end.isoformat(), "g": granularity, "tz": zone,
                 "by": group_by, "filter": {"models": models} if models else None}  # fmt: skip
    body = (await graphql(world.http, USAGE, token, variables)).json()
    assert "errors" not in body, body
    expected = as_api(expected_usage(world.events, world.prices, org_id=world.org, start=start, end=end,
                                     granularity=granularity, zone=zone, group_by=group_by, models=models))  # fmt: skip
    assert body["data"]["usage"] == expected, (granularity, zone, group_by, start, end)


async def test_usage_matches_ground_truth_before_and_after_rollups(world: World, make_token: TokenFactory) -> None:
    token = make_token("org_admin", org=world.org)
    assert any(e["data"]["org_id"] == world.org for e in world.events)  # type: ignore[index]
    await _check_all(world, token)  # nothing rolled up: raw events only

    engine = create_engine(world.database_url, pool_size=2)
    later = START + SPAN + dt.timedelta(days=2)
    try:
        first = await run_cycle(engine, later)
        assert first.ran and first.rolled_until == later.replace(minute=0, second=0, microsecond=0)
        await _check_all(world, token)  # rollups for every hour of data

        await world.publish(world.later)  # all of it late now: below the watermark, hours marked dirty
        assert await _dirty_hours(engine) > 0
        await _check_all(world, token)  # dirty hours come from raw events until re-rolled

        second = await run_cycle(engine, later)
        assert second.rerolled_hours > 0 and await _dirty_hours(engine) == 0
        await _check_all(world, token)
    finally:
        await engine.dispose()


async def _dirty_hours(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int(await connection.scalar(text("SELECT count(*) FROM rollup_dirty")) or 0)
