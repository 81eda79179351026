"""Exports end to end through GraphQL, the worker, S3 (moto over HTTP) and the download link: finance month to
date (one org and every org), an engineer's incident window, viewers and other orgs refused; files whose
sums equal ``totals`` and ``totals`` equal to ``usage`` to the last decimal, with a mid-month price change, an
unpriced model, late events, duplicates and adversarial decimals.

The app here runs the api and ingest roles; each test drives one worker attempt itself
(``ExportWorker.run_once``), so every step is awaited, never waited for.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import hashlib
import io
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import httpx
import pytest
from asgi_lifespan import LifespanManager

from db.prices import EXACT
from db.rollup import run_cycle
from exports.metrics import ExportMetrics
from exports.verify import verify_export
from exports.worker import ExportWorker
from gateway.app import create_app
from gateway.resources import Resources
from ingest.synthetic import Traffic, generate
from kernel.settings import ProcessRole, Settings
from tests.conftest import RUN_ID, TokenFactory, create_migrated_database, drop_database
from tests.helpers import graphql

NOW = dt.datetime.now(dt.UTC)
MONTH_START = NOW.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
DATA_START = max(MONTH_START, NOW - dt.timedelta(days=3))  # month_orgs' traffic: minutes of it on a month's first day
# Between the largest org's rows in the last tenth of the data and all of them (about 400 of 600 events), whatever
# the day of the month (it was 400, and that org has 398 to 401 rows as the data's span varies).
INCIDENT_CAP = 200


@pytest.fixture(scope="module")
async def bucket(s3_endpoint: str) -> str:
    name = f"exports-e2e-{RUN_ID}-{uuid.uuid4().hex[:6]}".lower()
    session = aioboto3.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
    async with session.client("s3", endpoint_url=s3_endpoint) as s3:
        await s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
async def export_env(settings: Settings, s3_endpoint: str, bucket: str) -> AsyncIterator[tuple[Resources, Any]]:
    """A gateway on a database of its own, storing exports in S3, and its app."""
    name = f"analytics_test_{RUN_ID}_exp{uuid.uuid4().hex[:6]}"
    url = await create_migrated_database(name)
    assert settings.database_url is not None
    own = settings.model_copy(
        update={
            "database_url": settings.database_url.__class__(url),
            "s3_bucket": bucket,
            "s3_endpoint_url": s3_endpoint,
            "export_incident_max_rows": INCIDENT_CAP,
            "export_lease_s": 5.0,
            "export_retry_base_s": 0.0,
        }
    )
    app = create_app(own, frozenset({ProcessRole.API, ProcessRole.INGEST}))
    async with LifespanManager(app, startup_timeout=60) as manager:
        yield manager._state["resources"], manager.app
    await drop_database(name)


@pytest.fixture
async def client(export_env: tuple[Resources, Any]) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=export_env[1])
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
        yield http


@pytest.fixture
def worker(export_env: tuple[Resources, Any]) -> ExportWorker:
    resources = export_env[0]
    return ExportWorker(resources.engine, resources.storage, resources.pubsub, resources.settings,
                        ExportMetrics(resources.metrics.meter("test.exports")))  # fmt: skip


async def post_events(client: httpx.AsyncClient, token: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    response = await client.post(
        "/v1/events", content=json.dumps(events).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/cloudevents-batch+json"},
    )  # fmt: skip
    assert response.status_code == 202, response.text
    return dict(response.json())


async def gql(client: httpx.AsyncClient, token: str, query: str, variables: dict[str, Any] | None = None) -> Any:
    return (await graphql(client, query, token, variables)).json()


JOB_FIELDS = """id kind orgId status attempts error rowCount checksumSha256 from to snapshotAt downloadUrl
  totals { requests inputTokens cachedInputTokens outputTokens spend unpricedModels }"""
COST = f"mutation($i: CostExportInput!) {{ requestCostExport(input: $i) {{ {JOB_FIELDS} }} }}"
INCIDENT = f"mutation($i: IncidentExportInput!) {{ requestIncidentExport(input: $i) {{ {JOB_FIELDS} }} }}"
JOB = f"query($id: ID!) {{ exportJob(id: $id) {{ {JOB_FIELDS} }} }}"
USAGE = """query($org: ID!, $r: TimeRange!) { usage(orgId: $org, range: $r, granularity: DAY) {
  totals { requests inputTokens cachedInputTokens outputTokens spend } unpricedModels } }"""
PRICE = """mutation($i: ModelPriceInput!) { upsertModelPrice(input: $i) { model } }"""


async def finished(client: httpx.AsyncClient, token: str, worker: ExportWorker, job_id: str) -> dict[str, Any]:
    """The job after one worker attempt: SUCCEEDED, and accepted by verify-export (checksum, columns, totals,
    a fresh usage answer)."""
    ended = await worker.run_once()
    assert ended is not None and str(ended.id) == job_id and ended.status == "SUCCEEDED", ended
    verification = await verify_export(worker.engine, worker.storage, ended.id)
    assert verification.ok, verification.render()
    body = await gql(client, token, JOB, {"id": job_id})
    # Only spend may be refused (callers without SPEND_READ): null with FORBIDDEN at its path.
    assert all(e["path"] == ["exportJob", "totals", "spend"] for e in body.get("errors", [])), body
    return dict(body["data"]["exportJob"])


async def download(client: httpx.AsyncClient, url: str) -> bytes:
    if url.startswith("/"):  # the local folder's link, served by the gateway itself
        response = await client.get(url)
    else:
        async with httpx.AsyncClient() as outside:
            response = await outside.get(url)
    assert response.status_code == 200, response.text
    return response.content


def column_sums(body: bytes, spend: bool = True) -> dict[str, Any]:
    rows = list(csv.DictReader(io.StringIO(body.decode("utf-8"), newline="")))
    sums: dict[str, Any] = {
        "requests": sum(int(r["requests"]) for r in rows) if spend else len(rows),
        "inputTokens": sum(int(r["input_tokens"]) for r in rows),
        "cachedInputTokens": sum(int(r["cached_input_tokens"]) for r in rows),
        "outputTokens": sum(int(r["output_tokens"]) for r in rows),
    }
    if spend:
        with decimal.localcontext(EXACT):
            sums["spend"] = sum((decimal.Decimal(r["spend_usd"]) for r in rows), decimal.Decimal(0))
    return sums


def exact(value: str | None) -> decimal.Decimal | None:
    return decimal.Decimal(value) if value is not None else None


@pytest.fixture(scope="module")
async def month_orgs(export_env: tuple[Resources, Any], make_token: TokenFactory) -> list[str]:
    """Two orgs with traffic this month: prices with adversarial decimals changed mid-month, one model left
    unpriced, duplicates resent, late events after a rollup, part of the month in the rollups."""
    resources, app = export_env
    admin = make_token("platform_admin")
    tag = uuid.uuid4().hex[:6]
    start = DATA_START
    traffic = Traffic(seed=41, events=600, orgs=2, models=4, span=(NOW - start) * 0.9, start=start,
                      org_prefix=f"fin{tag}", source=f"//exports-e2e/{tag}", duplicate_share=0.05,
                      late_share=0.05)  # fmt: skip
    events: list[dict[str, Any]] = list(generate(traffic))
    models = sorted({e["data"]["model"] for e in events})
    middle = (start + (NOW - start) / 2).replace(minute=0, second=0, microsecond=0)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
        for model, price_from, values in (
            (models[0], MONTH_START - dt.timedelta(days=40), ("0.000000001", "123456.123456789", "0.1")),
            (models[0], middle, ("3.3333333333", "0.0000000007", "1.00000000000000000001")),
            (models[1], MONTH_START - dt.timedelta(days=40), ("2.5", "10", "1.25")),
        ):  # models[2:] stay unpriced
            body = await gql(http, admin, PRICE, {"i": {"model": model, "effectiveFrom": price_from.isoformat(),
                             "inputPerMillion": values[0], "outputPerMillion": values[1],
                             "cachedInputPerMillion": values[2]}})  # fmt: skip
            assert "errors" not in body, body
        token = make_token("ingest")
        half = len(events) // 2
        await post_events(http, token, events[:half])
        await run_cycle(resources.engine, NOW)  # part of the month from the rollups, the rest from raw events
        await post_events(http, token, events[half:])
        again = await post_events(http, token, events[: half // 2])  # a replay: duplicates never count
        assert again["accepted"] == 0
    return sorted({e["data"]["org_id"] for e in events})


async def test_finance_month_to_date_one_org_reconciles_exactly_with_usage(
    client: httpx.AsyncClient, make_token: TokenFactory, worker: ExportWorker, month_orgs: list[str]
) -> None:
    org = month_orgs[0]
    token = make_token("finance", org=org)
    body = await gql(client, token, COST, {"i": {"orgId": org}})
    job = body["data"]["requestCostExport"]
    assert job["status"] == "QUEUED" and job["kind"] == "COST" and job["downloadUrl"] is None
    done = await finished(client, token, worker, job["id"])
    data = await download(client, done["downloadUrl"])
    assert hashlib.sha256(data).hexdigest() == done["checksumSha256"]
    assert data.startswith(b"org_id,project_id,model,day,requests,input_tokens,cached_input_tokens,output_tokens,"
                           b"spend_usd\r\n")  # fmt: skip
    totals = done["totals"]
    sums = column_sums(data)
    assert sums == {"requests": totals["requests"], "inputTokens": totals["inputTokens"],
                    "cachedInputTokens": totals["cachedInputTokens"], "outputTokens": totals["outputTokens"],
                    "spend": exact(totals["spend"])}  # fmt: skip
    usage = (await gql(client, token, USAGE, {"org": org, "r": {"from": done["from"], "to": done["to"]}}))["data"]
    counts = ("requests", "inputTokens", "cachedInputTokens", "outputTokens")
    assert {k: usage["usage"]["totals"][k] for k in counts} == {k: totals[k] for k in counts}
    assert exact(usage["usage"]["totals"]["spend"]) == exact(totals["spend"]) and sums["spend"] > 0
    assert sorted(usage["usage"]["unpricedModels"]) == totals["unpricedModels"] != []
    assert done["rowCount"] == data.count(b"\r\n") - 1


async def audit_rows(resources: Resources, target: str) -> list[tuple[str, str, str | None, str]]:
    async with resources.engine.connect() as connection:
        result = await connection.exec_driver_sql(
            "SELECT action, actor, org_id, outcome FROM audit_log WHERE target = $1 ORDER BY id", (target,)
        )
        return [tuple(row) for row in result]


async def test_requests_and_each_download_link_are_audited(
    client: httpx.AsyncClient, make_token: TokenFactory, worker: ExportWorker, month_orgs: list[str],
    export_env: tuple[Resources, Any],
) -> None:  # fmt: skip
    org = month_orgs[0]
    token = make_token("finance", org=org, sub="fin-alice")
    job = (await gql(client, token, COST, {"i": {"orgId": org}}))["data"]["requestCostExport"]
    await finished(client, token, worker, job["id"])  # one link issued (JOB selects downloadUrl)
    again = await gql(client, token, JOB, {"id": job["id"]})
    assert again["data"]["exportJob"]["downloadUrl"] != ""  # a second, fresh link
    rows = await audit_rows(export_env[0], job["id"])
    assert rows == [("requestCostExport", "fin-alice", org, "created"), ("exportDownloadUrl", "fin-alice", org, "ok"),
                    ("exportDownloadUrl", "fin-alice", org, "ok")]  # fmt: skip
    refused = await gql(client, token, INCIDENT, {"i": {"orgId": org, "range": {"from": NOW.isoformat(),
                                                                                 "to": NOW.isoformat()}}})  # fmt: skip
    assert refused["errors"][0]["extensions"]["code"] == "FORBIDDEN"  # finance may not export incidents


async def test_platform_finance_exports_every_org_and_org_finance_may_not(
    client: httpx.AsyncClient, make_token: TokenFactory, worker: ExportWorker, month_orgs: list[str]
) -> None:
    refused = await gql(client, make_token("finance", org=month_orgs[0]), COST, {"i": {"orgId": None}})
    assert refused["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    token = make_token("platform_finance")
    job = (await gql(client, token, COST, {"i": {}}))["data"]["requestCostExport"]
    assert job["orgId"] is None
    done = await finished(client, token, worker, job["id"])
    data = await download(client, done["downloadUrl"])
    rows = list(csv.DictReader(io.StringIO(data.decode(), newline="")))
    assert {r["org_id"] for r in rows} == set(month_orgs)
    assert [(r["org_id"], r["project_id"], r["model"], r["day"]) for r in rows] == sorted(
        (r["org_id"], r["project_id"], r["model"], r["day"]) for r in rows
    )
    window = {"from": done["from"], "to": done["to"]}
    spend = decimal.Decimal(0)
    requests = 0
    for org in month_orgs:
        usage = (await gql(client, token, USAGE, {"org": org, "r": window}))["data"]["usage"]["totals"]
        spend = EXACT.add(spend, exact(usage["spend"]) or 0)
        requests += usage["requests"]
    assert column_sums(data)["spend"] == exact(done["totals"]["spend"]) == spend
    assert done["totals"]["requests"] == requests


async def test_engineer_exports_an_incident_window_of_errors_only(
    client: httpx.AsyncClient, make_token: TokenFactory, worker: ExportWorker, month_orgs: list[str],
    export_env: tuple[Resources, Any],
) -> None:  # fmt: skip
    org = month_orgs[1]
    token = make_token("engineer", org=org)
    window = {"from": (NOW - dt.timedelta(days=4)).isoformat(), "to": (NOW + dt.timedelta(minutes=1)).isoformat()}
    job = await gql(client, token, INCIDENT, {"i": {"orgId": org, "range": window, "errorsOnly": True}})
    job = job["data"]["requestIncidentExport"]
    done = await finished(client, token, worker, job["id"])
    assert done["totals"]["spend"] is None
    data = await download(client, done["downloadUrl"])
    rows = list(csv.DictReader(io.StringIO(data.decode(), newline="")))
    assert rows and all(int(r["status_code"]) >= 400 and r["org_id"] == org for r in rows)
    assert [(r["time"], r["event_id"]) for r in rows] == sorted((r["time"], r["event_id"]) for r in rows)
    async with export_env[0].engine.connect() as connection:
        raw = await connection.exec_driver_sql(
            "SELECT count(*) FROM usage_events WHERE org_id = $1 AND status_code >= 400", (org,)
        )
        expected = raw.scalar_one()
    assert done["rowCount"] == len(rows) == expected == done["totals"]["requests"]
    assert column_sums(data, spend=False) == {
        k: done["totals"][k] for k in ("requests", "inputTokens", "cachedInputTokens", "outputTokens")
    }


async def test_viewers_and_other_orgs_are_refused(
    client: httpx.AsyncClient, make_token: TokenFactory, worker: ExportWorker, month_orgs: list[str]
) -> None:
    org, other = month_orgs
    viewer = make_token("viewer", org=org)
    window = {"from": (NOW - dt.timedelta(hours=1)).isoformat(), "to": NOW.isoformat()}
    for query, variables in ((COST, {"i": {"orgId": org}}),
                             (INCIDENT, {"i": {"orgId": org, "range": window}}),
                             ("{ exportJobs { edges { node { id } } } }", None)):  # fmt: skip
        body = await gql(client, viewer, query, variables)
        assert body["errors"][0]["extensions"]["code"] == "FORBIDDEN", body
    finance = make_token("finance", org=org)
    job = (await gql(client, finance, COST, {"i": {"orgId": org}}))["data"]["requestCostExport"]
    stranger = make_token("finance", org=other)
    body = await gql(client, stranger, JOB, {"id": job["id"]})
    assert body["data"]["exportJob"] is None and body["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    body = await gql(client, stranger, COST, {"i": {"orgId": org}})
    assert body["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    listed = await gql(client, stranger, "{ exportJobs { edges { node { id orgId } } } }")
    assert all(e["node"]["orgId"] == other for e in listed["data"]["exportJobs"]["edges"])
    await finished(client, finance, worker, job["id"])
    # An engineer of the org sees the job but not its file: spend_usd is spend (SPEND_READ).
    body = await gql(client, make_token("engineer", org=org), JOB, {"id": job["id"]})
    assert body["data"]["exportJob"]["downloadUrl"] is None
    refusals = {tuple(e["path"]): e["extensions"]["code"] for e in body["errors"]}
    assert refusals == {("exportJob", "downloadUrl"): "FORBIDDEN", ("exportJob", "totals", "spend"): "FORBIDDEN"}


async def test_idempotency_cap_cancel_and_listing(
    client: httpx.AsyncClient, make_token: TokenFactory, worker: ExportWorker, month_orgs: list[str],
    export_env: tuple[Resources, Any],
) -> None:  # fmt: skip
    org = month_orgs[0]
    token = make_token("org_admin", org=org)
    key = f"key-{uuid.uuid4().hex}"
    window = {"from": (NOW - (NOW - DATA_START) / 10).isoformat(), "to": NOW.isoformat()}  # under the cap
    first = await gql(client, token, INCIDENT, {"i": {"orgId": org, "range": window, "idempotencyKey": key}})
    again = await gql(client, token, INCIDENT, {"i": {"orgId": org, "range": window, "idempotencyKey": key}})
    assert first["data"]["requestIncidentExport"]["id"] == again["data"]["requestIncidentExport"]["id"]
    other = await gql(client, token, INCIDENT,
                      {"i": {"orgId": org, "range": window, "idempotencyKey": key, "errorsOnly": True}})  # fmt: skip
    assert other["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT" and key in other["errors"][0]["message"]
    # Above the cap: refused with the cap and the count.
    wide = {"from": (NOW - dt.timedelta(days=5)).isoformat(), "to": (NOW + dt.timedelta(hours=1)).isoformat()}
    big = await gql(client, token, INCIDENT, {"i": {"orgId": org, "range": wide}})
    message = big["errors"][0]["message"]
    assert big["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT" and f"{INCIDENT_CAP:,}" in message, message
    async with export_env[0].engine.connect() as connection:
        refusals = await connection.exec_driver_sql(
            "SELECT outcome FROM audit_log WHERE action = 'requestIncidentExport' AND org_id = $1 "
            "AND outcome LIKE 'refused:%' ORDER BY id", (org,)
        )  # fmt: skip
        outcomes = [row[0] for row in refusals]
    assert any(key in o for o in outcomes) and any(f"{INCIDENT_CAP:,}" in o for o in outcomes)  # refusals audited
    # Cancel a queued job: idempotent; the worker then has nothing of it to run.
    job_id = first["data"]["requestIncidentExport"]["id"]
    cancel = "mutation($id: ID!) { cancelExportJob(id: $id) { id status } }"
    for _ in range(2):
        body = await gql(client, token, cancel, {"id": job_id})
        assert body["data"]["cancelExportJob"]["status"] == "CANCELLED"
    assert (await gql(client, make_token("finance", org=month_orgs[1]), cancel, {"id": job_id}))["errors"][0][
        "extensions"]["code"] == "FORBIDDEN"  # fmt: skip
    listed = await gql(client, token, "{ exportJobs(status: CANCELLED, first: 5) { edges { node { id } } "
                                      "pageInfo { hasNextPage endCursor } } }")  # fmt: skip
    assert job_id in [e["node"]["id"] for e in listed["data"]["exportJobs"]["edges"]]
    bad = await gql(client, token, '{ exportJob(id: "not-a-uuid") { id } }')
    assert bad["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    assert (await gql(client, token, JOB, {"id": str(uuid.uuid4())}))["data"]["exportJob"] is None
