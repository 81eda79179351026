"""``GET /exports/download/{key}?expires=..&sig=..``: export files of the local folder (no S3 bucket set),
behind the links ``downloadUrl`` signs. The link is the credential (as an S3 presigned URL is): no bearer
token; a tampered or expired link is 403, a file that is gone (expired, deleted) 404. With S3 the links go to
the bucket and this route answers 404. The ``sig`` parameter is redacted from logs (gateway/logging.py)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from exports.storage.keys import InvalidKey
from exports.storage.local import LocalStorage
from exports.storage.protocol import ObjectMissing
from gateway.resources import State
from kernel.errors import Forbidden

PATH = "/exports/download/{key:path}"


async def download_export(request: Request[State]) -> Response:
    storage = request.state["resources"].storage
    if not isinstance(storage, LocalStorage):
        return _error(404, "exports are stored in S3: use the link downloadUrl gives")
    key = request.path_params["key"]
    try:
        path = storage.open_signed(key, request.query_params.get("expires", ""), request.query_params.get("sig", ""))
    except Forbidden as refused:
        return _error(403, refused.message)
    except (InvalidKey, ObjectMissing):
        return _error(404, "no such export file (it may have expired)")
    return FileResponse(
        path,
        media_type="text/csv; charset=utf-8",
        filename=path.name,
        headers={"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"},
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"Cache-Control": "no-store"})
