"""``/healthz``, ``/readyz`` and ``/metrics``: the endpoints that need no token."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from db.migrate import applied_revision
from gateway.resources import Resources, State

CHECK_TIMEOUT_S = 2.0


async def healthz(request: Request[State]) -> Response:
    """Liveness: the process serves."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request[State]) -> Response:
    """Readiness: 200 only when the database answers, its migrations are current and the
    AMQP consumer has not been failing to commit for longer than its threshold."""
    resources = request.state["resources"]
    database = await _check(_database(resources))
    ingest = resources.ingest_metrics.flush_state()
    checks = {
        "database": database,
        "redis": await _check(_redis(resources)),
        "amqp": _amqp(resources),
        "ingest": ingest,
    }
    ready = database["ok"] is True and ingest["ok"] is True
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503
    )


async def metrics(request: Request[State]) -> Response:
    resources = request.state["resources"]
    return Response(resources.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def _check(probe: Any) -> dict[str, Any]:
    try:
        return dict(await asyncio.wait_for(probe, CHECK_TIMEOUT_S))
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        return {"ok": False, "error": type(exc).__name__}


async def _database(resources: Resources) -> dict[str, Any]:
    async with resources.engine.connect() as connection:
        revision = await applied_revision(connection)
    current = revision == resources.migrations_head
    result: dict[str, Any] = {"ok": current, "migration": revision, "expected_migration": resources.migrations_head}
    if not current:
        result["error"] = "migrations not current: run 'analytics-gateway migrate'"
    return result


async def _redis(resources: Resources) -> dict[str, Any]:
    if resources.redis is None:
        return {"ok": True, "configured": False}
    await resources.redis.ping()
    return {"ok": True, "configured": True}


def _amqp(resources: Resources) -> dict[str, Any]:
    if resources.amqp is None:
        return {"ok": True, "configured": False}
    return {"ok": not resources.amqp.is_closed, "configured": True}
