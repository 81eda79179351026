"""What the export worker needs of a store: multipart uploads, reads, deletes, links, and a lifecycle."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Protocol

from kernel.errors import ErrorCode, GatewayError

MAX_LINK_TTL = dt.timedelta(days=7)  # SigV4's own limit for presigned URLs; the local links keep the same bound


def check_ttl(ttl: dt.timedelta) -> int:
    """Whole seconds of a link's lifetime: at least 1 s, at most 7 days."""
    seconds = ttl.total_seconds()
    if seconds < 1 or ttl > MAX_LINK_TTL:
        raise ValueError(f"a download link lives between 1 second and 7 days, got {ttl}")
    return int(seconds)


class Upload(Protocol):
    """One object being written. ``write`` parts in order, then ``complete`` or ``abort``.

    ``complete`` returns the stored size and the sha256 (hex) of exactly the bytes stored. After a failure
    of ``write`` or ``complete`` the upload has aborted itself; ``abort`` is idempotent.
    """

    async def write(self, part: bytes) -> None: ...

    async def complete(self) -> tuple[int, str]: ...

    async def abort(self) -> None: ...


class Storage(Protocol):
    async def start(self, key: str) -> Upload: ...

    async def abort_incomplete(self, key: str) -> int:
        """Abort uploads of ``key`` left behind by a dead worker; returns how many were aborted."""
        ...

    async def delete(self, key: str) -> None: ...

    async def exists(self, key: str) -> bool: ...

    def read(self, key: str) -> AsyncIterator[bytes]: ...

    async def download_url(self, key: str, ttl: dt.timedelta) -> str: ...

    async def ensure_lifecycle(self, expire_days: int) -> None: ...


class ObjectMissing(GatewayError):
    """The export's object is not in the store (expired, deleted, never completed)."""

    code = ErrorCode.NOT_FOUND
