"""Download links of finished exports: issued only while a job is SUCCEEDED, fresh each time (short-lived:
``ANALYTICS_EXPORT_LINK_TTL_S``), and each issue written to the audit trail with the caller and the org."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy.ext.asyncio import AsyncEngine

from db.audit import record
from db.exports import SUCCEEDED
from exports.storage.protocol import Storage

ACTION = "exportDownloadUrl"


async def issue_download_url(
    engine: AsyncEngine,
    storage: Storage,
    *,
    actor: str,
    job_id: uuid.UUID,
    org_id: str | None,
    status: str,
    object_key: str | None,
    ttl: dt.timedelta,
) -> str | None:
    """A signed link to the job's file, or None when the job is not SUCCEEDED (nothing to download)."""
    if status != SUCCEEDED or object_key is None:
        return None
    url = await storage.download_url(object_key, ttl)
    async with engine.begin() as connection:
        await record(connection, actor=actor, action=ACTION, outcome="ok", org_id=org_id, target=str(job_id),
                     detail={"ttl_s": int(ttl.total_seconds())})  # fmt: skip
    return url
