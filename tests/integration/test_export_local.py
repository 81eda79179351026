"""Exports without S3 (the local folder under the data dir) on real ``serve`` processes: the API in one, the
export worker in another. A finance user requests a month-to-date export, follows it on the ``exportJob``
subscription (pushed across replicas through Redis) to SUCCEEDED, and downloads the file through the
gateway's own signed link (the key file the worker's process generated, read by the API's); tampered links
are refused, and the link's signature never reaches the logs."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from gateway.logging import redact_text
from ingest.synthetic import Traffic, generate
from tests.conftest import REDIS_URL, RUN_ID, TEST_JWT_SECRET, TokenFactory
from tests.integration.serve_support import Served, clean_env, serve

pytestmark = pytest.mark.slow
FOLLOW = """subscription($id: ID!) { exportJob(id: $id) { id status attempts rowCount checksumSha256 downloadUrl
  totals { requests spend } } }"""
REQUEST = 'mutation { requestCostExport(input: {orgId: "%s"}) { id status } }'


@pytest.fixture
async def gateway(migrated_database: str, tmp_path: Path) -> AsyncIterator[Served]:
    """Two replicas on one host, as `make run` grown by one process: the API (and HTTP ingestion) in one, the
    export worker (and rollups) in the other, sharing the database, the data dir's folder and Redis."""
    env = clean_env(
        ANALYTICS_DATABASE_URL=migrated_database, ANALYTICS_JWT_SECRET=TEST_JWT_SECRET,
        ANALYTICS_DATA_DIR=str(tmp_path), ANALYTICS_EXPORT_POLL_S="0.2", ANALYTICS_LOG_LEVEL="WARNING",
        ANALYTICS_REDIS_URL=REDIS_URL, ANALYTICS_REDIS_PREFIX=f"test:{RUN_ID}:local{uuid.uuid4().hex[:6]}:",
    )  # fmt: skip
    async with serve(env, "--role", "export,rollup"), serve(env, "--role", "api,ingest") as api:
        yield api


async def frames(ws: Any) -> AsyncIterator[dict[str, Any]]:
    while True:
        yield json.loads(await asyncio.wait_for(ws.recv(), 30))


async def test_month_to_date_export_to_the_local_folder_followed_and_downloaded(
    gateway: Served, make_token: TokenFactory, tmp_path: Path
) -> None:
    events = list(generate(Traffic(seed=5, events=120, orgs=1, org_prefix="local", source="//local-export")))
    org = str(events[0]["data"]["org_id"])  # type: ignore[index]
    finance = make_token("finance", org=org)
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
        posted = await http.post(
            "/v1/events", content=json.dumps(events).encode(),
            headers={"Authorization": f"Bearer {make_token('ingest')}",
                     "Content-Type": "application/cloudevents-batch+json"},
        )  # fmt: skip
        assert posted.status_code == 202
        requested = await http.post("/graphql", json={"query": REQUEST % org},
                                    headers={"Authorization": f"Bearer {finance}"})  # fmt: skip
        job_id = requested.json()["data"]["requestCostExport"]["id"]

        statuses = []
        async with websockets.connect(gateway.ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
            await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {finance}"}}))
            assert json.loads(await ws.recv()) == {"type": "connection_ack"}
            await ws.send(json.dumps({"id": "1", "type": "subscribe",
                                      "payload": {"query": FOLLOW, "variables": {"id": job_id}}}))  # fmt: skip
            async for frame in frames(ws):
                if frame["type"] == "complete":
                    break
                assert frame["type"] == "next", frame
                job = frame["payload"]["data"]["exportJob"]
                statuses.append(job["status"])
        # Every push is a change, the last one final, and the stream completes after it.
        assert statuses[-1] == "SUCCEEDED" and len(statuses) == len(set(statuses)), statuses
        assert set(statuses) <= {"QUEUED", "RUNNING", "SUCCEEDED"}

        link = job["downloadUrl"]
        assert link.startswith("/exports/download/exports/") and "sig=" in link
        body = (await http.get(link)).content
        assert hashlib.sha256(body).hexdigest() == job["checksumSha256"]
        rows = list(csv.DictReader(io.StringIO(body.decode(), newline="")))
        assert len(rows) == job["rowCount"] and sum(int(r["requests"]) for r in rows) == job["totals"]["requests"]
        assert not list(tmp_path.rglob("*.part"))  # the file was renamed into place, nothing left behind

        path, _, query = link.partition("?")
        params = dict(urllib.parse.parse_qsl(query))
        tampered = urllib.parse.urlencode(params | {"sig": params["sig"][:-2] + "AA"})
        assert (await http.get(f"{path}?{tampered}")).status_code == 403
        assert (await http.get(path)).status_code == 403  # no signature at all
        later = urllib.parse.urlencode(params | {"expires": str(int(params["expires"]) + 3600)})
        assert (await http.get(f"{path}?{later}")).status_code == 403  # a signature is for its own expiry
        escape = path.replace(job_id, f"../../../{job_id}")
        assert (await http.get(f"{escape}?{query}")).status_code in (403, 404)


def test_download_signatures_are_redacted_from_logged_text() -> None:
    local = "GET /exports/download/exports/o/2026/11/x.csv?expires=1796000000&sig=c2VjcmV0LXNpZ25hdHVyZQ"
    s3 = "https://bucket.s3.amazonaws.com/k.csv?X-Amz-Credential=AKIA%2F&X-Amz-Signature=0f3e9a&X-Amz-Expires=900"
    assert "c2VjcmV0" not in redact_text(local) and "expires=1796000000" in redact_text(local)
    assert "0f3e9a" not in redact_text(s3) and "X-Amz-Signature=" in redact_text(s3)
