"""The append-only audit log."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


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
    """Append one entry in the caller's transaction."""
    await connection.execute(
        text(
            "INSERT INTO audit_log (org_id, actor, action, target, outcome, detail) "
            "VALUES (:org_id, :actor, :action, :target, :outcome, CAST(:detail AS jsonb))"
        ),
        {
            "org_id": org_id, "actor": actor, "action": action, "target": target, "outcome": outcome,
            "detail": orjson.dumps(detail or {}, default=str).decode(),
        },
    )  # fmt: skip
