"""GraphiQL in a real browser, offline: Debian's Chromium driven by Playwright against a real ``serve`` process.

Every request the page makes to anything but the gateway's own origin is aborted (and recorded), so the page
proves it needs no outside network: GraphiQL loads, asks for a token before fetching the schema, runs a
``usage`` query with the token from its Headers editor, and shows a ``freshness`` push that follows events
posted while the subscription is open (graphql-transport-ws, the token in ``connection_init``).

Playwright's own browser downloads are never used: the browser is ``/usr/bin/chromium`` (``make tools``).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright
from playwright.async_api import TimeoutError as PlaywrightTimeout

from gateway.graphiql import ASSET_DIR, ASSET_TYPES, CONTENT_SECURITY_POLICY, asset_url
from ingest.synthetic import Traffic, generate
from kernel.auth import issue_token
from tests.conftest import TEST_JWT_SECRET, TokenFactory
from tests.integration.serve_support import Served, clean_env, serve

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
WAIT_MS = 30_000
# GraphiQL's CodeMirror editors: the query, the response, and the visible one under the query (Variables or
# Headers: _headers() opens the Headers tab first).
EDITOR_JS = """(which) => document.querySelector({
  query: '.graphiql-query-editor .CodeMirror',
  response: '.graphiql-response .CodeMirror',
  headers: '.graphiql-editor-tool .graphiql-editor:not(.hidden) .CodeMirror',
}[which]).CodeMirror"""
SET_EDITOR = f"([which, text]) => ({EDITOR_JS})(which).setValue(text)"
GET_EDITOR = f"(which) => ({EDITOR_JS})(which).getValue()"
# True once the response editor shows a freshness whose lastEventAt is at or after the given instant (ms).
FRESHNESS_REACHED = """(ms) => {
  const text = document.querySelector('.graphiql-response .CodeMirror').CodeMirror.getValue();
  try {
    const at = JSON.parse(text).data.freshness.lastEventAt;
    return at !== null && Date.parse(at) >= ms;
  } catch (_) { return false; }
}"""


@pytest.fixture
async def gateway(migrated_database: str) -> AsyncIterator[Served]:
    """API and HTTP ingestion in one process, on its own database (no Redis: in-process pub/sub)."""
    env = clean_env(ANALYTICS_DATABASE_URL=migrated_database, ANALYTICS_JWT_SECRET=TEST_JWT_SECRET)
    async with serve(env, "--role", "api,ingest") as running:
        yield running


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert CHROMIUM.exists(), "Debian's chromium is needed (make tools installs it)"
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def _offline_page(browser: Browser, origin: str, blocked: list[str], posts: list[str]) -> Page:
    """A page that may reach ``origin`` only: every other request is aborted and listed in ``blocked``."""
    page = await browser.new_page(viewport={"width": 1400, "height": 900})

    async def only_the_gateway(route: Route) -> None:
        url = route.request.url
        if url == origin or url.startswith(origin + "/"):
            if route.request.method == "POST":
                posts.append(route.request.post_data or "")
            await route.continue_()
        else:
            blocked.append(url)
            await route.abort()

    await page.route("**/*", only_the_gateway)
    return page


async def _set_operation(page: Page, name: str, text: str) -> None:
    """Put an operation in the query editor and wait until GraphiQL has read it (the tab takes its name: until
    then a run would send the previous operation's name)."""
    await page.evaluate(SET_EDITOR, ["query", text])
    await page.wait_for_selector(f".graphiql-tab-active >> text='{name}'", timeout=WAIT_MS)


async def _run(page: Page) -> str:
    """Run the query editor's operation (the ▶ button) and return the response editor's first text."""
    await page.evaluate(SET_EDITOR, ["response", ""])
    await page.click(".graphiql-execute-button")
    await page.wait_for_function(f"() => ({GET_EDITOR})('response') !== ''", timeout=WAIT_MS)
    return str(await page.evaluate(GET_EDITOR, "response"))


async def _wait_for_freshness(page: Page, last_event_at: dt.datetime) -> None:
    """Until the response editor shows a freshness push whose lastEventAt has reached ``last_event_at``."""
    try:
        await page.wait_for_function(FRESHNESS_REACHED, arg=last_event_at.timestamp() * 1000, timeout=WAIT_MS)
    except PlaywrightTimeout:
        shown = await page.evaluate(GET_EDITOR, "response")
        raise AssertionError(
            f"no push with lastEventAt >= {last_event_at.isoformat()}; GraphiQL shows {shown}"
        ) from None


async def _post_events(gateway: Served, token: str, events: list[dict[str, object]]) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url) as http:
        response = await http.post(
            "/v1/events", content=json.dumps(events).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/cloudevents-batch+json"},
        )  # fmt: skip
    assert response.status_code == 202 and response.json()["accepted"] == len(events), response.text


def _traffic(tag: str, start: dt.datetime, events: int) -> list[dict[str, object]]:
    traffic = Traffic(events=events, orgs=1, org_prefix=f"gq{tag}", source=f"//graphiql/{tag}/{start.timestamp()}",
                      start=start, span=dt.timedelta(minutes=5), error_bursts=0)  # fmt: skip
    return list(generate(traffic))


async def test_graphiql_offline_query_and_subscription(
    gateway: Served, browser: Browser, make_token: TokenFactory
) -> None:
    tag = uuid.uuid4().hex[:8]
    org = f"gq{tag}_0000"
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    first = _traffic(tag, now - dt.timedelta(minutes=30), 40)
    await _post_events(gateway, make_token("ingest"), first)
    blocked: list[str] = []
    posts: list[str] = []
    sockets: list[str] = []
    page = await _offline_page(browser, gateway.base_url, blocked, posts)
    page.on("websocket", lambda ws: sockets.append(ws.url))

    await page.goto(f"{gateway.base_url}/graphql")
    await page.wait_for_selector(".graphiql-query-editor .CodeMirror", timeout=WAIT_MS)
    await page.click(".graphiql-editor-tools button[data-name='headers']")
    headers = await page.evaluate(GET_EDITOR, "headers")
    assert "analytics-gateway token --role org_admin --org org_0000" in headers
    assert "analytics-gateway token" in await page.evaluate(GET_EDITOR, "query")
    # No token yet: running says what to do, and nothing (not even the schema) was asked of the gateway.
    assert "No token yet" in await _run(page)
    assert posts == []

    # A refused token: the subscription says so at once (GraphiQL's WebSocket client alone would retry the 4403
    # close for about 40 s and then show "Socket closed with event 4403").
    forged = issue_token("not-the-gateway-secret-" + "x" * 32, ["viewer"], subject="mallory", org_id=org)
    await page.evaluate(SET_EDITOR, ["headers", json.dumps({"Authorization": f"Bearer {forged}"})])
    subscription = f'subscription Freshness {{ freshness(orgId: "{org}") {{ orgId lastEventAt }} }}'
    await _set_operation(page, "Freshness", subscription)
    refused = json.loads(await _run(page))
    assert refused["errors"][0]["message"].startswith("The gateway refused the token: invalid token")
    assert refused["errors"][0]["extensions"] == {"code": "UNAUTHENTICATED"}
    assert sockets == []

    token = make_token("viewer", org=org)
    await page.evaluate(SET_EDITOR, ["headers", json.dumps({"Authorization": f"Bearer {token}"})])
    # The schema is fetched once a token is there: the Docs panel lists the root types.
    await page.click("button[aria-label='Show Documentation Explorer']")
    await page.wait_for_selector(".graphiql-doc-explorer >> text=Subscription", timeout=WAIT_MS)
    assert any("IntrospectionQuery" in body for body in posts)

    since, until = (now - dt.timedelta(hours=1)).isoformat(), (now + dt.timedelta(minutes=5)).isoformat()
    usage = (
        f'query Usage {{ usage(orgId: "{org}", range: {{from: "{since}", to: "{until}"}}) '
        "{ orgId totals { requests } } }"
    )
    await _set_operation(page, "Usage", usage)
    answer = json.loads(await _run(page))
    assert answer == {"data": {"usage": {"orgId": org, "totals": {"requests": len(first)}}}}

    await _set_operation(page, "Freshness", subscription)
    await page.click(".graphiql-execute-button")
    first_last = max(dt.datetime.fromisoformat(str(e["time"])) for e in first)
    await _wait_for_freshness(page, first_last)
    second = _traffic(tag, now - dt.timedelta(minutes=4), 10)
    second_last = max(dt.datetime.fromisoformat(str(e["time"])) for e in second)
    assert second_last > first_last
    await _post_events(gateway, make_token("ingest"), second)
    await _wait_for_freshness(page, second_last)
    pushed = json.loads(await page.evaluate(GET_EDITOR, "response"))["data"]["freshness"]
    assert pushed["orgId"] == org
    assert dt.datetime.fromisoformat(pushed["lastEventAt"]) == second_last

    assert blocked == []
    assert sockets and all(url.startswith(gateway.ws_url) for url in sockets), sockets


async def test_the_page_has_a_csp_and_names_its_assets_by_digest(client: httpx.AsyncClient) -> None:
    page = await client.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 200
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY and "unsafe-eval" not in CONTENT_SECURITY_POLICY
    assert page.headers["cache-control"] == "no-cache"
    assert "https://" not in page.text and "http://" not in page.text
    for name in ASSET_TYPES:
        assert asset_url(name) in page.text


async def test_assets_are_cached_for_a_year_gzipped_and_only_by_name(client: httpx.AsyncClient) -> None:
    url = asset_url("graphiql.min.js")
    plain = await client.get(url, headers={"Accept-Encoding": "identity"})
    zipped = await client.get(url, headers={"Accept-Encoding": "gzip"})
    on_disk = (ASSET_DIR / "graphiql.min.js").read_bytes()
    assert plain.content == on_disk and zipped.content == on_disk  # httpx undoes the gzip
    assert "content-encoding" not in plain.headers and zipped.headers["content-encoding"] == "gzip"
    assert int(zipped.headers["content-length"]) < len(on_disk) // 2
    assert plain.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert plain.headers["content-type"] == "text/javascript; charset=utf-8"
    again = await client.get(url, headers={"If-None-Match": plain.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    for probe in ("README.md", "LICENSE.react", "..%2Fgraphiql.py", "../../graphiql.py", "nope.js"):
        assert (await client.get(f"/graphiql/static/{probe}")).status_code == 404, probe
