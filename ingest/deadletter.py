"""Dead-lettering what cannot be ingested, with the reason in a header."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractExchange

ERROR_HEADER = "x-analytics-error"
INDEX_HEADER = "x-analytics-index"
MAX_REASON_CHARS = 1000


async def dead_letter(
    exchange: AbstractExchange,
    body: bytes,
    reason: str,
    *,
    content_type: str | None,
    index: int | None = None,
    message_id: str | None = None,
) -> None:
    """Publish ``body`` to the dead-letter exchange (confirmed by the broker)."""
    headers: dict[str, str | int] = {ERROR_HEADER: reason[:MAX_REASON_CHARS]}
    if index is not None:
        headers[INDEX_HEADER] = index
    message = aio_pika.Message(
        body,
        headers=headers,  # type: ignore[arg-type]
        content_type=content_type,
        message_id=message_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    await exchange.publish(message, routing_key="dead-letter")
