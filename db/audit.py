"""The append-only audit log: what one entry holds, made storable, and the one INSERT.

Audit values come from callers (org ids, operation names, arguments), so every value is made storable
before it reaches PostgreSQL: text holds no NUL and no lone surrogate, and every column and the JSON
detail are bounded (the ``(org_id, at)`` index refuses keys over about 2.7 kB). What was cut or replaced is
still recognisable: NUL becomes the six characters ``\\u0000``, a lone surrogate its ``\\udXXX`` escape, and a
cut value ends in ``…``. Nothing a caller sends can make an entry unstorable.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

ORG_ID_CHARS = 200
ACTOR_CHARS = 256
ACTION_CHARS = 64
TARGET_CHARS = 256
OUTCOME_CHARS = 512
DETAIL_STRING_CHARS = 512
DETAIL_ITEMS = 50
DETAIL_DEPTH = 4

INSERT = text(
    "INSERT INTO audit_log (org_id, at, actor, action, target, outcome, detail) "
    "VALUES (:org_id, coalesce(:at, now()), :actor, :action, :target, :outcome, CAST(:detail AS jsonb))"
)


@dataclass(frozen=True)
class AuditEntry:
    """One audited action: who, what, on which org and target, and how it ended."""

    actor: str
    action: str
    outcome: str
    org_id: str | None = None
    target: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def row(self, at: dt.datetime | None = None) -> dict[str, Any]:
        """The entry as bound parameters of :data:`INSERT`, every value storable and bounded."""
        return {
            "org_id": storable(self.org_id, ORG_ID_CHARS),
            "at": at,
            "actor": storable(self.actor, ACTOR_CHARS) or "?",
            "action": storable(self.action, ACTION_CHARS) or "?",
            "target": storable(self.target, TARGET_CHARS),
            "outcome": storable(self.outcome, OUTCOME_CHARS) or "?",
            "detail": orjson.dumps(storable_json(self.detail, DETAIL_DEPTH)).decode(),
        }


def storable(value: str | None, limit: int) -> str | None:
    """``value`` as PostgreSQL text can hold it, at most ``limit`` characters."""
    if value is None:
        return None
    value = str(value)
    if "\x00" in value:
        value = value.replace("\x00", "\\u0000")
    if not value.isascii():
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value if len(value) <= limit else value[: limit - 1] + "…"


def storable_json(value: Any, depth: int) -> Any:
    """A JSON value jsonb can hold (no NUL, no lone surrogate), bounded in depth, items and string length."""
    if isinstance(value, str):
        return storable(value, DETAIL_STRING_CHARS)
    if value is None or isinstance(value, bool | int | float):
        return value if not isinstance(value, int) or abs(value) < 2**63 else str(value)
    if depth <= 0:
        return "…"
    if isinstance(value, Mapping):
        items = list(value.items())[:DETAIL_ITEMS]
        return {storable(str(k), DETAIL_STRING_CHARS): storable_json(v, depth - 1) for k, v in items}
    if isinstance(value, list | tuple | set | frozenset):
        return [storable_json(v, depth - 1) for v in list(value)[:DETAIL_ITEMS]]
    return storable(str(value), DETAIL_STRING_CHARS)


async def insert(connection: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append rows made by :meth:`AuditEntry.row`, in the caller's transaction."""
    await connection.execute(INSERT, list(rows))


async def record(
    connection: AsyncConnection,
    *,
    actor: str,
    action: str,
    outcome: str,
    org_id: str | None = None,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one entry in the caller's transaction: for actions audited with what they record."""
    entry = AuditEntry(actor=actor, action=action, outcome=outcome, org_id=org_id, target=target, detail=detail or {})
    await insert(connection, [entry.row()])
