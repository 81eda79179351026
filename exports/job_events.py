"""Export job status changes on pub/sub: the one owner of a job's channel name and of its messages.

After each committed state change, the code that made it calls :func:`announce_job`; the Subscription
listens with :func:`subscribe_job`. A message says which job changed and to what; listeners re-read the job
(the row is the truth, and a message can be lost: Redis pub/sub is at most once). To miss no change, a
listener subscribes first and reads the job after, then re-reads on each message.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

import orjson
import structlog

from db.exports import ExportJobRow
from kernel.pubsub import PubSub

log = structlog.get_logger(__name__)


def job_channel(job_id: uuid.UUID) -> str:
    """The pub/sub channel of one export job."""
    return f"export_job:{job_id}"


async def announce_job(pubsub: PubSub | None, row: ExportJobRow) -> None:
    """Tell the job's listeners its new status. Best effort: the change is committed, and a lost message only
    delays a listener until it reads the job again."""
    if pubsub is None:
        return
    message = orjson.dumps({"id": str(row.id), "status": row.status, "attempts": row.attempts})
    try:
        await pubsub.publish(job_channel(row.id), message)
    except Exception:
        log.warning("exports.announce_failed", job_id=str(row.id), status=row.status, exc_info=True)


def subscribe_job(pubsub: PubSub, job_id: uuid.UUID) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
    """The messages :func:`announce_job` sends for one job."""
    return pubsub.subscribe([job_channel(job_id)])
