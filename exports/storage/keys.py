"""Object keys of exports (contract §5): ``exports/{org_id or _all}/{yyyy}/{mm}/{job_id}.csv``.

The one owner of the key layout: the worker names objects with :func:`key_for`, and the local download route
accepts only keys that :func:`check_key` passes. Org ids are producer-chosen (``[A-Za-z0-9._:-]``, so ``..`` is
a valid org id): a segment is escaped where it could mean something else, a leading ``.`` (``.``/``..``) or
``_`` (the all-org ``_all``), and any character outside that set, as ``%XX``. Every real org id but those
keeps its plain name, and no two org ids share a folder.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid

from kernel.errors import BadUserInput

ALL_ORGS = "_all"
PREFIX = "exports/"
_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.:-_")
_KEY = re.compile(
    r"exports/(?:_all|[A-Za-z0-9%:-][A-Za-z0-9._%:-]{0,1023})/[0-9]{4}/(?:0[1-9]|1[0-2])/"
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.csv"
)


class InvalidKey(BadUserInput):
    """A key that is not an export object's key (a path escape, another file, a malformed name)."""


def _escape(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))


def org_segment(org_id: str | None) -> str:
    """The folder of one org's exports (``_all`` for an all-org export)."""
    if org_id is None:
        return ALL_ORGS
    if not org_id:
        raise ValueError("org_id is empty")
    head = org_id[0] if org_id[0] in _PLAIN and org_id[0] not in "._" else _escape(org_id[0])
    return head + "".join(char if char in _PLAIN else _escape(char) for char in org_id[1:])


def key_for(org_id: str | None, created_at: dt.datetime, job_id: uuid.UUID) -> str:
    """The object key of a job's file, filed by the UTC month the job was created in."""
    if created_at.tzinfo is None:
        raise ValueError("created_at must be timezone-aware")
    month = created_at.astimezone(dt.UTC)
    return f"{PREFIX}{org_segment(org_id)}/{month:%Y}/{month:%m}/{uuid.UUID(str(job_id))}.csv"


def check_key(key: str) -> str:
    """``key`` itself if it is an export object's key, else :class:`InvalidKey` (``..``, ``/abs``, NUL, ...)."""
    if not _KEY.fullmatch(key):
        raise InvalidKey("not an export file")
    return key
