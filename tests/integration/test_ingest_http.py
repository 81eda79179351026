"""``POST /v1/events``: the same validation and writer as AMQP, over HTTP."""

from __future__ import annotations

import copy
import json
import uuid

import httpx
import pytest
from asgi_lifespan import LifespanManager
from pydantic import SecretStr

from gateway.app import create_app
from ingest.synthetic import Traffic, generate
from kernel.settings import ProcessRole, Settings
from tests.conftest import TokenFactory
from tests.integration.ingest_support import stored

BATCH = "application/cloudevents-batch+json"
SINGLE = "application/cloudevents+json"


def _events(count: int) -> tuple[str, list[dict[str, object]]]:
    tag = uuid.uuid4().hex[:8]
    traffic = Traffic(events=count, source=f"//http/{tag}", org_prefix=f"org_{tag}", seed=3)
    return traffic.source, list(generate(traffic))


async def _post(client: httpx.AsyncClient, token: str, body: bytes, content_type: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
    return await client.post("/v1/events", content=body, headers=headers)


async def test_batch_with_duplicates_and_rejects(
    client: httpx.AsyncClient, make_token: TokenFactory, database_url: str
) -> None:
    source, events = _events(5)
    bad = copy.deepcopy(events[4])
    bad["data"]["cached_input_tokens"] = bad["data"]["input_tokens"] + 1  # type: ignore[index,operator]
    body = [events[0], events[1], events[0], bad, events[2], "not an event", events[3]]
    response = await _post(client, make_token("ingest"), json.dumps(body).encode(), BATCH)
    assert response.status_code == 202
    assert response.json() == {
        "accepted": 4,
        "duplicates": 1,
        "rejected": [
            {"index": 3, "error": "data.cached_input_tokens: must not exceed data.input_tokens"},
            {"index": 5, "error": "Expected `object`, got `str`"},
        ],
    }
    again = await _post(client, make_token("ingest"), json.dumps(events[:2]).encode(), "application/json")
    assert again.json() == {"accepted": 0, "duplicates": 2, "rejected": []}
    assert sorted(r["event_id"] for r in await stored(database_url, source)) == sorted(str(e["id"]) for e in events[:4])


async def test_single_event_and_plain_json(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    _, events = _events(2)
    single = await _post(client, make_token("ingest"), json.dumps(events[0]).encode(), SINGLE)
    plain = await _post(client, make_token("ingest"), json.dumps(events[1]).encode(), "application/json; charset=utf-8")
    assert single.json()["accepted"] == 1 and plain.json()["accepted"] == 1


@pytest.mark.parametrize(("role", "status"), [("viewer", 403), ("platform_admin", 403), ("org_admin", 403)])
async def test_only_the_ingest_role_may_post(
    client: httpx.AsyncClient, make_token: TokenFactory, role: str, status: int
) -> None:
    _, events = _events(1)
    response = await _post(client, make_token(role, org="org_x"), json.dumps(events).encode(), BATCH)
    assert response.status_code == status
    assert response.json()["error"]["code"] == "FORBIDDEN"


async def test_missing_token_is_401(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/events", content=b"[]", headers={"Content-Type": BATCH})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "UNAUTHENTICATED"
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_wrong_content_type_is_415_and_bad_body_400(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    token = make_token("ingest")
    assert (await _post(client, token, b"<xml/>", "application/xml")).status_code == 415
    unreadable = await _post(client, token, b"{nope", SINGLE)
    assert unreadable.status_code == 400 and "not valid JSON" in unreadable.json()["error"]["message"]
    shape = await _post(client, token, b"{}", BATCH)
    assert shape.status_code == 400 and "JSON array" in shape.json()["error"]["message"]


async def test_over_10_mib_is_413(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    body = b"[" + b" " * (10 * 1024 * 1024) + b"]"
    response = await _post(client, make_token("ingest"), body, BATCH)
    assert response.status_code == 413


async def test_ingest_metrics_count_outcomes(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    _, events = _events(2)
    await _post(client, make_token("ingest"), json.dumps([events[0], events[0], {"x": 1}]).encode(), BATCH)
    text = (await client.get("/metrics")).text
    for outcome in ("accepted", "duplicate", "rejected"):
        assert any(
            line.startswith("analytics_ingest_events") and f'outcome="{outcome}"' in line and 'channel="http"' in line
            for line in text.splitlines()
        ), outcome
    assert "analytics_ingest_flush_seconds_bucket" in text
    assert "analytics_ingest_batch_events_bucket" in text
    depths = [line for line in text.splitlines() if line.startswith("analytics_ingest_queue_messages{")]
    assert any('analytics.usage.dlq"' in line for line in depths), depths  # queue and DLQ depth, from the consumer


async def test_database_down_is_503_with_retry_after(settings: Settings, make_token: TokenFactory) -> None:
    dead = settings.model_copy(update={"database_url": SecretStr("postgresql://postgres@127.0.0.1:1/none"),
                                       "amqp_url": None})  # fmt: skip
    _, events = _events(2)
    # The ingest role alone: the workers of the other roles, failing on the dead database, have nothing to do
    # with this answer (and their failure logs could hold the loop past the lifespan's 5 s on a loaded machine).
    async with LifespanManager(create_app(dead, frozenset({ProcessRole.INGEST}))) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
            response = await _post(http, make_token("ingest"), json.dumps(events).encode(), BATCH)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "UNAVAILABLE"
