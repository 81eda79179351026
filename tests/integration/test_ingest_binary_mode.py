"""``POST /v1/events`` in CloudEvents binary mode (``ce-*`` headers, the data as the body), beside structured and
batch modes: the same identity, validation and messages, and clear refusals for what no mode reads."""

from __future__ import annotations

import copy
import datetime as dt
import json
import uuid
from urllib.parse import quote

import httpx
import pytest

from ingest.synthetic import Traffic, generate
from tests.conftest import TokenFactory
from tests.integration.ingest_support import stored

SINGLE = "application/cloudevents+json"
# What the SDK leaves unencoded: printable ASCII but space, '"' and '%' (the binding, section 3.1.3.2).
SAFE = "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in ' "%')


def _event(tag: str) -> dict[str, object]:
    traffic = Traffic(events=1, orgs=1, source=f"//binary/{tag}", org_prefix=f"bin_{tag}", seed=5)
    return next(iter(generate(traffic)))


def _binary(event: dict[str, object]) -> tuple[list[tuple[str, str]], bytes]:
    """The request the CloudEvents SDK's HTTP ``to_binary`` (cloudevents 2.2) makes of ``event``: each attribute a
    percent-encoded ``ce-`` header, no Content-Type (the event names no datacontenttype), the data as JSON."""
    headers = [(f"ce-{name}", quote(str(value), safe=SAFE)) for name, value in event.items() if name != "data"]
    return headers, json.dumps(event["data"]).encode()


async def _post(client: httpx.AsyncClient, token: str, headers: list[tuple[str, str]], body: bytes) -> httpx.Response:
    return await client.post("/v1/events", content=body, headers=[("Authorization", f"Bearer {token}"), *headers])


async def test_the_sdk_binary_request_is_stored_like_its_structured_twin(
    client: httpx.AsyncClient, make_token: TokenFactory, database_url: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    event = _event(tag)
    when = dt.datetime.fromisoformat(str(event["time"])).astimezone(dt.UTC)
    # The SDK's forms: a datetime's isoformat with "Z", an id that needs percent-encoding.
    event |= {"id": f"évènement {tag}", "time": when.isoformat().replace("+00:00", "Z")}
    headers, body = _binary(event)
    assert ("ce-id", f"%C3%A9v%C3%A8nement%20{tag}") in headers  # percent-encoded as the binding says
    response = await _post(client, make_token("ingest"), headers, body)
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 1, "duplicates": 0, "rejected": []}
    rows = await stored(database_url, str(event["source"]))
    data = event["data"]
    assert isinstance(data, dict)
    assert [(r["event_id"], r["org_id"], r["input_tokens"]) for r in rows] == [
        (event["id"], data["org_id"], data["input_tokens"])
    ]
    # One identity across modes: the same event in structured mode, then in binary mode with a Content-Type.
    structured = await _post(client, make_token("ingest"), [("Content-Type", SINGLE)], json.dumps(event).encode())
    assert structured.json() == {"accepted": 0, "duplicates": 1, "rejected": []}
    typed = await _post(client, make_token("ingest"), [*headers, ("Content-Type", "application/json; charset=utf-8")],
                        body)  # fmt: skip
    assert typed.json() == {"accepted": 0, "duplicates": 1, "rejected": []}


@pytest.mark.parametrize("case", ["cached over input", "no ce-type", "wrong ce-type", "data not an object", "bad time"])
async def test_invalid_binary_events_get_the_structured_mode_rejection(
    client: httpx.AsyncClient, make_token: TokenFactory, case: str
) -> None:
    event = _event(uuid.uuid4().hex[:8])
    data = event["data"]
    assert isinstance(data, dict)
    if case == "cached over input":
        data["cached_input_tokens"] = data["input_tokens"] + 1
    elif case == "no ce-type":
        del event["type"]
    elif case == "wrong ce-type":
        event["type"] = "ai.usage.request.v2"
    elif case == "data not an object":
        event["data"] = [data]
    else:
        event["time"] = "yesterday"
    headers, body = _binary(event)
    binary = await _post(client, make_token("ingest"), headers, body)
    twin = await _post(client, make_token("ingest"), [("Content-Type", SINGLE)], json.dumps(event).encode())
    assert binary.status_code == twin.status_code == 202
    assert binary.json()["accepted"] == 0 and len(binary.json()["rejected"]) == 1
    assert binary.json() == twin.json()


async def test_binary_mode_data_must_be_json(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    headers, _ = _binary(_event(uuid.uuid4().hex[:8]))
    token = make_token("ingest")
    for body in (b'{"org_id": ', b"", b'{"a": 1} {"b": 2}'):
        response = await _post(client, token, [*headers, ("Content-Type", "application/json")], body)
        assert response.status_code == 400, body
        assert response.json()["error"]["message"].startswith("binary mode: the body (the event's data) is ")
    xml = await _post(client, token, [*headers, ("Content-Type", "application/xml")], b"<usage/>")
    assert xml.status_code == 415
    error = xml.json()["error"]
    assert error["code"] == "UNSUPPORTED_MEDIA_TYPE"
    assert "binary mode: the data must be application/json, not 'application/xml'" in error["message"]


async def test_unsupported_content_types_get_415_naming_the_modes(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    for content_type in ("text/plain", "application/octet-stream", None):
        headers: list[tuple[str, str]] = [] if content_type is None else [("Content-Type", content_type)]
        response = await _post(client, make_token("ingest"), headers, b"{}")
        assert response.status_code == 415, content_type
        message = response.json()["error"]["message"]
        for mode in ("structured mode", "batch mode", "binary mode (ce-specversion"):
            assert mode in message


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ([("ce-id", "a"), ("ce-source", "//x")], "ce-* headers without ce-specversion"),
        ([("ce-specversion", "1.0"), ("ce-id", "a"), ("ce-id", "b")], "header ce-id is given more than once"),
        ([("ce-specversion", "1.0"), ("ce-data", "{}")], "header ce-data: in binary mode the body is the data"),
        ([("ce-specversion", "1.0"), ("ce-Org_Id", "x")], "attribute names are 1-20 lower-case letters"),
        ([("ce-specversion", "1.0"), ("ce-id", "%FF%FE")], "header ce-id: percent-encoded bytes are not UTF-8"),
    ],
    ids=["no specversion", "twice", "ce-data", "bad name", "bad percent-encoding"],
)
async def test_ce_headers_that_make_no_binary_request_get_400(
    client: httpx.AsyncClient, make_token: TokenFactory, headers: list[tuple[str, str]], words: str
) -> None:
    response = await _post(client, make_token("ingest"), [*headers, ("Content-Type", "application/json")], b"{}")
    assert response.status_code == 400
    assert words in response.json()["error"]["message"]


async def test_structured_mode_ignores_ce_headers(
    client: httpx.AsyncClient, make_token: TokenFactory, database_url: str
) -> None:
    """The binding: an application/cloudevents+json body is the event, whatever ce-* headers come with it."""
    event = _event(uuid.uuid4().hex[:8])
    other = copy.deepcopy(event) | {"id": "not-this-one"}
    headers, _ = _binary(other)
    response = await _post(
        client, make_token("ingest"), [*headers, ("Content-Type", SINGLE)], json.dumps(event).encode()
    )
    assert response.json() == {"accepted": 1, "duplicates": 0, "rejected": []}
    assert [r["event_id"] for r in await stored(database_url, str(event["source"]))] == [event["id"]]
