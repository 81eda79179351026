"""``analytics_platform_requests_total``: the SLO counter counts newly stored events only, read from /metrics."""

from __future__ import annotations

import json
import uuid
from collections import Counter

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ingest.synthetic import Traffic, generate
from tests.conftest import TokenFactory

BATCH = "application/cloudevents-batch+json"
Sample = tuple[str, str]  # model, status_class


async def _platform_requests(client: httpx.AsyncClient, prefix: str) -> Counter[Sample]:
    text = (await client.get("/metrics")).text
    return Counter({
        (s.labels["model"], s.labels["status_class"]): int(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "analytics_platform_requests_total" and s.labels["model"].startswith(prefix)
    })  # fmt: skip


def _events(tag: str, org: str, shapes: list[tuple[str, int]]) -> list[dict[str, object]]:
    """One event per (model suffix, status code), all of ``org``."""
    traffic = Traffic(events=len(shapes), source=f"//slo/{tag}/{org}", org_prefix=f"org_{tag}", orgs=1, seed=5)
    events = list(generate(traffic))
    for event, (model, status) in zip(events, shapes, strict=True):
        data = event["data"]
        assert isinstance(data, dict)
        data |= {"org_id": f"org_{tag}_{org}", "model": f"slo-{tag}-{model}", "status_code": status}
        data |= {"error_type": "boom"} if status >= 400 else {}
    return events


async def _post(client: httpx.AsyncClient, token: str, events: list[dict[str, object]]) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": BATCH}
    response = await client.post("/v1/events", content=json.dumps(events).encode(), headers=headers)
    assert response.status_code == 202, response.text
    body: dict[str, object] = response.json()
    return body


async def test_duplicates_never_count(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    tag, token = uuid.uuid4().hex[:8], make_token("ingest")
    prefix = f"slo-{tag}-"
    old = _events(tag, "x", [("a", 200), ("a", 503), ("b", 200), ("b", 429)])
    assert (await _post(client, token, old))["accepted"] == 4
    first = await _platform_requests(client, prefix)
    assert first == Counter({(f"{prefix}a", "2xx"): 1, (f"{prefix}a", "5xx"): 1, (f"{prefix}b", "2xx"): 1,
                             (f"{prefix}b", "4xx"): 1})  # fmt: skip

    # Org x's events again (stored already), and org y's new ones, one of them twice in the batch.
    new = _events(tag, "y", [("a", 500), ("b", 200), ("c", 201)])
    result = await _post(client, token, [old[1], new[0], old[0], new[0], new[1], new[2], old[3]])
    assert (result["accepted"], result["duplicates"]) == (3, 4)
    delta = await _platform_requests(client, prefix)
    delta.subtract(first)
    assert +delta == Counter({(f"{prefix}a", "5xx"): 1, (f"{prefix}b", "2xx"): 1, (f"{prefix}c", "2xx"): 1})

    assert (await _post(client, token, new + old))["accepted"] == 0
    assert await _platform_requests(client, prefix) == first + +delta + Counter({(f"{prefix}c", "5xx"): 0})


async def test_an_org_with_new_and_stored_events_in_one_batch_counts_its_new_ones(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    tag, token = uuid.uuid4().hex[:8], make_token("ingest")
    prefix = f"slo-{tag}-"
    events = _events(tag, "x", [("a", 200)] * 6 + [("a", 502)] * 2)
    await _post(client, token, events[:4])
    before = await _platform_requests(client, prefix)
    assert (await _post(client, token, events))["accepted"] == 4
    after = await _platform_requests(client, prefix)
    after.subtract(before)
    # Exactly the new ones, by class: the database says which rows it inserted, not just how many per org.
    assert +after == Counter({(f"{prefix}a", "2xx"): 2, (f"{prefix}a", "5xx"): 2})
