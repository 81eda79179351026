"""``POST /v1/events``: the CloudEvents HTTP binding (structured, batch and binary modes: ``ingest.http_body``).

Answers 202 once the accepted events are committed, with what was accepted,
what was a duplicate and why each rejected event was rejected.
"""

from __future__ import annotations

import datetime as dt

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.resources import State
from ingest.decode import MAX_BODY_BYTES, UnreadableMessage, decode_body
from ingest.events import TimeWindow
from ingest.http_body import Binary, UnsupportedMode, decode_binary, request_mode
from kernel.errors import Forbidden, GatewayError, Unauthenticated

log = structlog.get_logger(__name__)


class PayloadTooLarge(Exception):
    pass


async def post_events(request: Request[State]) -> Response:
    resources = request.state["resources"]
    try:
        caller = await resources.verifier.verify_header(request.headers.get("authorization"))
        if not caller.may_ingest:
            raise Forbidden("role 'ingest' is required to post events")
    except Unauthenticated as exc:
        return _error(exc.message, exc.code.value, 401, {"WWW-Authenticate": 'Bearer realm="analytics"'})
    except GatewayError as exc:
        return _error(exc.message, exc.code.value, 403)
    try:
        mode = request_mode(request.headers.get("content-type"), request.headers.items())
    except UnsupportedMode as exc:
        return _error(str(exc), "UNSUPPORTED_MEDIA_TYPE", 415)
    except UnreadableMessage as exc:
        return _error(str(exc), "BAD_USER_INPUT", 400)
    try:
        body = await _read_limited(request)
        window = TimeWindow.around(dt.datetime.now(dt.UTC), resources.settings.raw_retention_days)
        decoded = decode_binary(body, mode, window) if isinstance(mode, Binary) else decode_body(body, mode, window)
    except PayloadTooLarge:
        return _error(f"body is over {MAX_BODY_BYTES:,} bytes (10 MiB)", "PAYLOAD_TOO_LARGE", 413)
    except UnreadableMessage as exc:
        return _error(str(exc), "BAD_USER_INPUT", 400)
    try:
        result = await resources.writer.write_isolating(decoded.events, channel="http", rejected=len(decoded.rejected))
    except Exception:
        log.warning("ingest.http_write_failed", exc_info=True)
        message = "the database is unavailable; retry the same request (events already stored count as duplicates)"
        return _error(message, "UNAVAILABLE", 503, {"Retry-After": "1"})
    refused = [(decoded.indexes[p.index], p.reason) for p in result.poisoned]
    listed = sorted([(r.index, r.error) for r in decoded.rejected] + refused)
    rejected = [{"index": index, "error": error} for index, error in listed]
    body_out = {"accepted": result.accepted, "duplicates": result.duplicates, "rejected": rejected}
    return JSONResponse(body_out, status_code=202)


async def _read_limited(request: Request[State]) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _error(message: str, code: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": code}}, status_code=status, headers=headers)
