"""The list of export jobs as a Relay connection: newest first, filtered by org and status, scoped to the
orgs the caller sees, paged by an opaque cursor.

A cursor is the position of the last job of a page, ``(created_at, id)``, with a short digest, base64url
encoded. It is opaque, not secret: a well-formed cursor only positions the list (scoping is applied on every
page), so the digest is there to refuse a damaged or edited cursor with a clear error, not to authenticate.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from db import exports as queries
from db.exports import ExportJobRow
from kernel.errors import BadUserInput, Forbidden

MAX_FIRST = 100
_VERSION = "j1"
_STATUSES = frozenset({"QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"})


class InvalidCursor(BadUserInput):
    """The ``after`` cursor is not one this list produced."""


def _digest(payload: str) -> str:
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def encode_cursor(row: ExportJobRow) -> str:
    payload = f"{_VERSION}|{row.created_at.astimezone(dt.UTC).isoformat()}|{row.id}"
    return base64.urlsafe_b64encode(f"{payload}|{_digest(payload)}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    refused = InvalidCursor(f"after: {cursor[:40]!r} is not a cursor of this list; page again from the start")
    if not 0 < len(cursor) <= 200:
        raise refused
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        version, created, job_id, digest = text.split("|")
        if version != _VERSION or digest != _digest(f"{version}|{created}|{job_id}"):
            raise ValueError("not ours")
        created_at, parsed_id = dt.datetime.fromisoformat(created), uuid.UUID(job_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise refused from None
    if created_at.tzinfo is None:
        raise refused
    return created_at, parsed_id


@dataclass(frozen=True)
class Page:
    rows: list[ExportJobRow]
    has_next_page: bool

    @property
    def end_cursor(self) -> str | None:
        return encode_cursor(self.rows[-1]) if self.rows else None


async def list_page(
    connection: AsyncConnection,
    *,
    visible_orgs: Sequence[str] | None,
    org_id: str | None,
    status: str | None,
    first: int,
    after: str | None,
) -> Page:
    """One page of jobs. ``visible_orgs``: the orgs the caller sees (None: every org, all-org jobs
    included: platform roles). ``org_id``: only that org's jobs (FORBIDDEN outside the caller's orgs); None:
    every job the caller sees."""
    if not 1 <= first <= MAX_FIRST:
        raise BadUserInput(f"first must be between 1 and {MAX_FIRST}")
    if status is not None and status not in _STATUSES:
        raise BadUserInput(f"status {status[:20]!r} is not an export status")
    position = decode_cursor(after) if after is not None else None
    if org_id is not None:
        if visible_orgs is not None and org_id not in visible_orgs:
            raise Forbidden(f"caller may not see org {org_id!r}")
        orgs: Sequence[str] | None = [org_id]
    else:
        orgs = visible_orgs
    rows = await queries.list_jobs(connection, org_ids=orgs, status=status, after=position, limit=first + 1)
    return Page(rows[:first], len(rows) > first)
