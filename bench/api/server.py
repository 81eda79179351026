"""The API process under test: ``create_app(settings, roles={api})`` on uvicorn, plus ``/bench/plain`` (a route
inside the gateway's app, behind its middleware), ``/bench/bare`` (the same handler outside it) and ``/bench/gc``
(the process's garbage collections, from a ``gc.callbacks`` hook)."""

from __future__ import annotations

import contextlib
import gc
import sys
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from bench.harness.servers import Server, child_env, free_port, start_server
from gateway.app import create_app
from gateway.gc_policy import GcPauses
from gateway.logging import configure_logging
from kernel.settings import ProcessRole, load_settings

READY_TIMEOUT_S = 120
# One benchmark token sends from 16-32 connections at once: per-caller limits would measure refusals.
UNLIMITED = {"ANALYTICS_RATE_LIMIT_PER_MINUTE": "1000000000", "ANALYTICS_MAX_CONCURRENT_PER_CALLER": "256"}


def gateway_env(**extra: str) -> dict[str, str]:
    """The environment of a gateway the benchmark starts: no per-caller limits, ``extra`` settings."""
    return child_env(**UNLIMITED, **extra)


async def start_api(env: dict[str, str], work: Path, name: str = "api_gateway") -> Server:
    """The API in a child process (``python -m bench.graphql_bench --serve-app <port>``), once ready."""
    port = free_port()
    command = [sys.executable, "-m", "bench.graphql_bench", "--serve-app", str(port)]
    return await start_server(name, command, env, port, work, READY_TIMEOUT_S)


def serve_app(port: int) -> None:
    """Child process: the API (settings from ``ANALYTICS_*``) plus the plain endpoints, on uvicorn."""
    settings = load_settings()
    configure_logging(settings.log_level)
    pauses = GcPauses()
    gc.callbacks.append(pauses.callback)
    config = uvicorn.Config(
        _bench_app(create_app(settings, frozenset({ProcessRole.API})), pauses), host="127.0.0.1", port=port,
        log_config=None, access_log=False, log_level="warning", workers=1,
    )  # fmt: skip
    uvicorn.Server(config).run()


def _bench_app(app: Starlette, pauses: GcPauses) -> ASGIApp:
    async def plain(request: Request) -> Response:
        return JSONResponse({"subject": "x"})

    async def gc_stats(request: Request) -> Response:
        return JSONResponse(gc_snapshot(pauses))

    app.router.routes.insert(0, Route("/bench/plain", plain))  # inside the gateway's middleware
    bare = Starlette(routes=[Route("/bench/bare", plain), Route("/bench/gc", gc_stats)])

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/bench/") and scope["path"] != "/bench/plain":
            await bare(scope, receive, send)
        else:
            await app(scope, receive, send)

    return dispatch


def gc_snapshot(pauses: GcPauses) -> dict[str, Any]:
    """The API process's collections so far; the longest pauses since the previous snapshot."""
    out = {
        "count": list(pauses.collections),
        "total_ms": [round(t * 1000, 2) for t in pauses.seconds],
        "longest_ms": [round(t * 1000, 2) for t in pauses.longest],
        "tracked_objects": len(gc.get_objects()),
    }
    pauses.longest = [0.0, 0.0, 0.0]
    return out


async def api_gc(server: Server) -> dict[str, Any] | None:
    """The API's ``/bench/gc`` snapshot (None when it does not answer)."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = await http.get("/bench/gc")
            if response.status_code == 200:
                return dict(response.json())
    return None


def gc_delta(before: dict[str, Any] | None, after: dict[str, Any] | None, requests: int) -> dict[str, Any]:
    """The API process's collections during a window: per generation, count, time, longest pause."""
    if before is None or after is None:
        return {}
    count = [a - b for a, b in zip(after["count"], before["count"], strict=True)]
    total = [round(a - b, 2) for a, b in zip(after["total_ms"], before["total_ms"], strict=True)]
    return {
        "collections": count,
        "total_ms": total,
        "longest_ms": after["longest_ms"],
        "ms_per_request": round(sum(total) / max(requests, 1), 3),
        "tracked_objects": after["tracked_objects"],
    }
