"""The GraphiQL page and its assets, served by the gateway itself: no CDN, so the IDE works offline.

The vendored builds (``gateway/static/graphiql/``, see its README) are read once, gzipped once, and served under
``/graphiql/static/<name>?v=<digest>`` with a year's ``Cache-Control``: the page names each asset with the
digest of its bytes, so a new build is a new URL and a cached copy is never stale.

The page carries a Content-Security-Policy that allows only the gateway's own origin: scripts, styles, fonts
and images from ``'self'`` (fonts and icons of the GraphiQL stylesheet are ``data:`` URLs inside it), requests
and the WebSocket to ``'self'``, and nothing else (no inline script, no frames, no form posts, no ``<base>``).
The one allowance beyond ``'self'`` is ``style-src 'unsafe-inline'``: GraphiQL's dialogs (Radix UI's scroll lock,
``react-remove-scroll``) add ``<style>`` elements at run time whose text changes with the page, so no hash or
nonce can name them in advance; styles cannot run code, and scripts stay ``'self'`` only.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.resources import resources_of

ASSET_DIR = Path(__file__).parent / "static" / "graphiql"
ASSET_PREFIX = "/graphiql/static"
ASSET_TYPES = {
    "graphiql.min.js": "text/javascript; charset=utf-8",
    "graphiql.min.css": "text/css; charset=utf-8",
    "react.production.min.js": "text/javascript; charset=utf-8",
    "react-dom.production.min.js": "text/javascript; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
}
IMMUTABLE = "public, max-age=31536000, immutable"
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "font-src 'self' data:",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
DEV_JWT_COMMAND = ".venv/bin/analytics-gateway token --role org_admin --org org_0000"

PAGE = """<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <title>Analytics gateway · GraphiQL</title>
    <link rel="icon" href="data:,">
    <link rel="stylesheet" href="{css}">
    <style>body {{ margin: 0; }} #graphiql {{ height: 100vh; }}</style>
  </head>
  <body>
    <div id="graphiql" data-token-command="{token_command}">Loading GraphiQL…</div>
    <script src="{react}"></script>
    <script src="{react_dom}"></script>
    <script src="{graphiql}"></script>
    <script src="{page}"></script>
  </body>
</html>
"""


@dataclass(frozen=True)
class Asset:
    """One vendored file, with its gzip encoding and a digest that names its version in URLs."""

    body: bytes
    gzipped: bytes
    media_type: str
    digest: str

    @property
    def etag(self) -> str:
        return f'"{self.digest}"'


@cache
def asset(name: str) -> Asset | None:
    """The named asset (None for any name outside the fixed list: no path from the URL reaches the disk)."""
    media_type = ASSET_TYPES.get(name)
    if media_type is None:
        return None
    body = (ASSET_DIR / name).read_bytes()
    digest = hashlib.sha256(body).hexdigest()[:16]
    return Asset(body, gzip.compress(body, compresslevel=9, mtime=0), media_type, digest)


def asset_url(name: str) -> str:
    found = asset(name)
    assert found is not None, name
    return f"{ASSET_PREFIX}/{name}?v={found.digest}"


@cache
def page_html() -> str:
    return PAGE.format(
        css=asset_url("graphiql.min.css"),
        react=asset_url("react.production.min.js"),
        react_dom=asset_url("react-dom.production.min.js"),
        graphiql=asset_url("graphiql.min.js"),
        page=asset_url("page.js"),
        token_command=DEV_JWT_COMMAND,
    )


def page_response() -> Response:
    """The IDE page: the assets above, the CSP, and never cached (it names the current assets' versions)."""
    return Response(page_html(), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


async def serve_asset(request: Request) -> Response:
    """``GET /graphiql/static/{name}``: a vendored file, gzipped when the client accepts it, cached for a year;
    404 for unknown names and while GraphiQL is switched off (``ANALYTICS_GRAPHIQL_ENABLED``)."""
    found = asset(request.path_params["name"])
    if found is None or not resources_of(request.scope).settings.graphiql_enabled:
        return Response("not found", status_code=404, media_type="text/plain")
    headers = {"Cache-Control": IMMUTABLE, "ETag": found.etag, "Vary": "Accept-Encoding",
               "X-Content-Type-Options": "nosniff"}  # fmt: skip
    if request.headers.get("if-none-match") == found.etag:
        return Response(status_code=304, headers=headers)
    body = found.body
    if "gzip" in request.headers.get("accept-encoding", ""):
        body, headers["Content-Encoding"] = found.gzipped, "gzip"
    return Response(body, media_type=found.media_type, headers=headers)


def asset_route() -> Route:
    """The route of the assets, for the ``api`` role's routes in :func:`gateway.app.create_app`."""
    return Route(f"{ASSET_PREFIX}/{{name}}", serve_asset, methods=["GET", "HEAD"])
