"""Two gateway processes ingesting and rolling up one stream at once: answers stay exact."""

from __future__ import annotations

import datetime as dt
import uuid
from contextlib import AsyncExitStack

import asyncpg
import httpx
import pytest

from ingest.synthetic import Traffic, generate
from ingest.topology import Topology
from kernel.settings import Settings
from tests.conftest import AMQP_URL, REDIS_URL, TEST_JWT_SECRET, TokenFactory
from tests.helpers import graphql
from tests.integration.ingest_support import drained, eventually, publish_mixed, publisher
from tests.integration.serve_support import clean_env, run_cli, serve
from tests.integration.usage_truth import as_api, distinct, expected_usage

pytestmark = pytest.mark.slow

QUERY = """query($org: ID!, $from: DateTime!, $to: DateTime!, $g: Granularity!) {
  usage(orgId: $org, range: {from: $from, to: $to}, granularity: $g, groupBy: [MODEL]) {
    totals { requests inputTokens cachedInputTokens outputTokens totalTokens spend }
    series { start end group { model projectId apiKeyId } requests inputTokens cachedInputTokens outputTokens
             totalTokens spend }
    unpricedModels
  }
}"""


async def _rolled_up(database_url: str) -> bool:
    connection = await asyncpg.connect(database_url)
    try:
        state = await connection.fetchrow("SELECT materialized_through, dirty_before FROM rollup_state")
        dirty = await connection.fetchval("SELECT count(*) FROM rollup_dirty")
    finally:
        await connection.close()
    now_hour = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    return state["materialized_through"] == now_hour and dirty == 0


async def test_two_processes_ingest_and_roll_up_exactly(
    settings: Settings, empty_database: str, make_token: TokenFactory
) -> None:
    prefix = f"{settings.amqp_prefix}pair{uuid.uuid4().hex[:6]}."
    env = clean_env(
        ANALYTICS_DATABASE_URL=empty_database, ANALYTICS_JWT_SECRET=TEST_JWT_SECRET, ANALYTICS_AMQP_URL=AMQP_URL,
        ANALYTICS_REDIS_URL=REDIS_URL, ANALYTICS_AMQP_PREFIX=prefix, ANALYTICS_ROLLUP_INTERVAL_S="0.2",
        ANALYTICS_INGEST_BATCH_EVENTS="300",
    )  # fmt: skip
    assert (await run_cli("migrate", env=env))[0] == 0
    now = dt.datetime.now(dt.UTC)
    traffic = Traffic(seed=21, events=12000, orgs=3, models=3, start=now - dt.timedelta(hours=30),
                      span=dt.timedelta(hours=30), duplicate_share=0.2, late_share=0.2, late_hours=12,
                      source=f"//pair/{prefix}")  # fmt: skip
    events = list(generate(traffic))
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(serve(env))
        await stack.enter_async_context(serve(env))
        async with publisher(prefix) as pub:
            await publish_mixed(pub, events, batch=40)
        await drained(Topology.named(prefix).queue)
        await eventually(lambda: _rolled_up(empty_database), 60, "both workers to finish rolling up")
        token = make_token("org_admin", org="org_0000")
        async with httpx.AsyncClient(base_url=first.base_url) as http:
            for granularity, span in (("HOUR", dt.timedelta(hours=32)), ("DAY", dt.timedelta(days=3))):
                start, end = now - span, now + dt.timedelta(hours=1)
                variables = {"org": "org_0000", "from": start.isoformat(), "to": end.isoformat(), "g": granularity}
                body = (await graphql(http, QUERY, token, variables)).json()
                expected = expected_usage(distinct(events), [], org_id="org_0000", start=start, end=end,
                                          granularity=granularity, zone="UTC", group_by=["MODEL"])  # fmt: skip
                assert body["data"]["usage"] == as_api(expected), granularity
