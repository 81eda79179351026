"""The production topology without containers, on one machine, from the CLI: two API processes (``serve --role
api``), one ingester (``--role ingest``), one worker (``--role rollup,export``), one database, one Redis prefix,
one AMQP prefix and an S3 bucket (moto), as the compose stack runs them (issue 14).

Events go in over AMQP with the ``publish`` command; the first API answers ``usage`` with exactly their counts,
the second pushes a freshness update once they are committed (it hears the ingester through Redis), and a COST
export requested on the first is produced by the worker and downloaded through the second's ``downloadUrl``.
No process does another's part: the APIs neither ingest nor export, the worker serves no ingestion.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import hashlib
import io
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioboto3
import httpx
import pytest
import websockets

from ingest.synthetic import Traffic, generate
from ingest.topology import Topology
from tests.conftest import AMQP_URL, REDIS_URL, RUN_ID, TEST_JWT_SECRET, TokenFactory
from tests.helpers import graphql
from tests.integration.ingest_support import drained
from tests.integration.serve_support import Served, clean_env, run_cli, serve
from tests.integration.usage_truth import as_api, distinct, expected_usage

pytestmark = pytest.mark.slow

USAGE = """query($org: ID!, $from: DateTime!, $to: DateTime!) {
  usage(orgId: $org, range: {from: $from, to: $to}, granularity: HOUR, groupBy: [MODEL]) {
    totals { requests inputTokens cachedInputTokens outputTokens totalTokens spend }
    series { start end group { model projectId apiKeyId } requests inputTokens cachedInputTokens outputTokens
             totalTokens spend }
    unpricedModels
  }
}"""
FRESHNESS = "subscription($org: ID!) { freshness(orgId: $org) { orgId lastEventAt lastIngestedAt } }"
FOLLOW = """subscription($id: ID!) { exportJob(id: $id) { id status rowCount checksumSha256 downloadUrl
  totals { requests inputTokens outputTokens } } }"""
REQUEST = 'mutation { requestCostExport(input: {orgId: "%s"}) { id status } }'
WAIT_S = 30


@pytest.fixture
async def bucket(s3_endpoint: str) -> str:
    name = f"topology-{RUN_ID}-{uuid.uuid4().hex[:6]}".lower()
    session = aioboto3.Session(region_name="us-east-1")  # credentials from the environment, as in production
    async with session.client("s3", endpoint_url=s3_endpoint) as s3:
        await s3.create_bucket(Bucket=name)
    return name


@dataclass(frozen=True)
class Deployment:
    """The four processes of the topology."""

    api1: Served
    api2: Served
    ingester: Served
    worker: Served


@pytest.fixture
def env(migrated_database: str, prefix: str, s3_endpoint: str, bucket: str, tmp_path: Path) -> dict[str, str]:
    """One deployment's settings, shared by every process (the roles come from ``--role``)."""
    return clean_env(
        ANALYTICS_DATABASE_URL=migrated_database, ANALYTICS_JWT_SECRET=TEST_JWT_SECRET,
        ANALYTICS_AMQP_URL=AMQP_URL, ANALYTICS_AMQP_PREFIX=prefix,
        ANALYTICS_REDIS_URL=REDIS_URL, ANALYTICS_REDIS_PREFIX=f"test:{RUN_ID}:topology{uuid.uuid4().hex[:6]}:",
        ANALYTICS_S3_ENDPOINT_URL=s3_endpoint, ANALYTICS_S3_BUCKET=bucket, ANALYTICS_DATA_DIR=str(tmp_path),
        ANALYTICS_ROLLUP_INTERVAL_S="0.5", ANALYTICS_EXPORT_POLL_S="0.2", ANALYTICS_DB_POOL_SIZE="4",
        ANALYTICS_LOG_LEVEL="WARNING",
        # No periodic pushes: a freshness push can only come from the ingester's commit, relayed through Redis.
        ANALYTICS_FRESHNESS_PUSH_S="3600",
    )  # fmt: skip


@pytest.fixture
async def topology(env: dict[str, str]) -> AsyncIterator[Deployment]:
    """The four processes, started at once (each start is mostly imports and connecting: they overlap)."""
    async with AsyncExitStack() as stack:

        async def start(role: str) -> Served:
            return await stack.enter_async_context(serve(env, "--role", role))

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(start(role)) for role in ("api", "api", "ingest", "rollup,export")]
        yield Deployment(*(task.result() for task in tasks))


async def frames(ws: Any) -> AsyncIterator[dict[str, Any]]:
    """The ``next`` payloads of subscription 1 until it completes; a frame later than WAIT_S fails the test."""
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
        if frame["type"] == "complete":
            return
        assert frame["type"] == "next" and "errors" not in frame["payload"], frame
        yield frame["payload"]["data"]


async def subscribe(ws: Any, token: str, query: str, variables: dict[str, str]) -> None:
    await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}}))
    assert json.loads(await ws.recv()) == {"type": "connection_ack"}
    await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": query, "variables": variables}}))


def month_to_date_traffic(tag: str) -> Traffic:
    """A little traffic of one org in the last hour, kept inside the current UTC month (the COST export's
    window), with producer retries (duplicates) that must count once."""
    now = dt.datetime.now(dt.UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    span = min(dt.timedelta(hours=1), (now - month_start) - dt.timedelta(seconds=5))
    return Traffic(seed=14, events=400, orgs=1, models=3, span=span, duplicate_share=0.1,
                   org_prefix=f"topo{tag}", source=f"//topology/{tag}")  # fmt: skip


async def test_two_apis_an_ingester_and_a_worker_serve_one_deployment(
    topology: Deployment, env: dict[str, str], prefix: str, make_token: TokenFactory, tmp_path: Path
) -> None:
    events = list(generate(month_to_date_traffic(uuid.uuid4().hex[:6])))
    unique = distinct(events)
    assert len(unique) < len(events)  # the duplicates are there to be dropped
    org = str(events[0]["data"]["org_id"])  # type: ignore[index]
    newest = max(dt.datetime.fromisoformat(str(e["time"])) for e in unique)
    lines = tmp_path / "events.jsonl"
    lines.write_text("".join(json.dumps(event) + "\n" for event in events))

    async with websockets.connect(topology.api2.ws_url, subprotocols=["graphql-transport-ws"]) as fresh:  # type: ignore[list-item]
        await subscribe(fresh, make_token("viewer", org=org), FRESHNESS, {"org": org})
        pushes = frames(fresh)
        assert (await anext(pushes))["freshness"]["lastEventAt"] is None  # the state before anything came in

        code, _, stderr = await run_cli("publish", str(lines), "--batch", "25", env=env)
        assert code == 0 and f"published {len(events)} events" in stderr, stderr
        await drained(Topology.named(prefix).queue, f"analytics-gateway/{topology.ingester.process.pid}", WAIT_S)

        # Pushed on the other API process, through Redis, once the batch holding the newest event committed.
        async for data in pushes:
            if dt.datetime.fromisoformat(data["freshness"]["lastEventAt"]) == newest:
                break
        assert data["freshness"]["orgId"] == org and data["freshness"]["lastIngestedAt"] is not None

    async with httpx.AsyncClient(base_url=topology.api1.base_url, timeout=WAIT_S) as api1:
        start = min(dt.datetime.fromisoformat(str(e["time"])) for e in unique) - dt.timedelta(hours=1)
        end = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        answer = await graphql(api1, USAGE, make_token("org_admin", org=org),
                               {"org": org, "from": start.isoformat(), "to": end.isoformat()})  # fmt: skip
        expected = expected_usage(unique, [], org_id=org, start=start, end=end, granularity="HOUR", zone="UTC",
                                  group_by=["MODEL"])  # fmt: skip
        assert answer.json() == {"data": {"usage": as_api(expected)}}
        assert answer.json()["data"]["usage"]["totals"]["requests"] == len(unique)

        finance = make_token("finance", org=org)
        requested = (await graphql(api1, REQUEST % org, finance)).json()
        job_id = requested["data"]["requestCostExport"]["id"]

    async with websockets.connect(topology.api2.ws_url, subprotocols=["graphql-transport-ws"]) as follow:  # type: ignore[list-item]
        await subscribe(follow, finance, FOLLOW, {"id": job_id})
        statuses = [data["exportJob"] async for data in frames(follow)]
    job = statuses[-1]
    assert job["status"] == "SUCCEEDED", statuses
    assert job["totals"]["requests"] == len(unique)
    assert job["totals"]["inputTokens"] == expected["totals"]["inputTokens"]  # type: ignore[index]

    async with httpx.AsyncClient(timeout=WAIT_S) as store:
        downloaded = await store.get(job["downloadUrl"])  # a presigned link to the bucket, issued by API 2
    assert downloaded.status_code == 200
    assert hashlib.sha256(downloaded.content).hexdigest() == job["checksumSha256"]
    rows = list(csv.DictReader(io.StringIO(downloaded.content.decode(), newline="")))
    assert len(rows) == job["rowCount"] and {r["org_id"] for r in rows} == {org}
    assert sum(int(r["requests"]) for r in rows) == len(unique)
