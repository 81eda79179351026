"""The usage event (CloudEvents 1.0, ``ai.usage.request.v1``) and its validation.

Types and bounds follow ``contracts/usage-event.schema.json``; the rules of its
``$comment`` (cached <= input, not too far in the future, not older than the
raw retention) are checked by :func:`validate`. Every error names the field
and the problem.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec

ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
MODEL_PATTERN = r"^[A-Za-z0-9._:/@+-]{1,128}$"
MAX_TOKENS = 100_000_000
MAX_FUTURE = dt.timedelta(minutes=5)

Identifier = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
Tokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Short = Annotated[str, msgspec.Meta(max_length=64)]


class UsageData(msgspec.Struct, frozen=True):
    org_id: Identifier
    model: Annotated[str, msgspec.Meta(pattern=MODEL_PATTERN)]
    input_tokens: Tokens
    output_tokens: Tokens
    latency_ms: Annotated[float, msgspec.Meta(ge=0, le=86_400_000)]
    status_code: Annotated[int, msgspec.Meta(ge=100, le=599)]
    project_id: Identifier | None = None
    api_key_id: Identifier | None = None
    cached_input_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    ttft_ms: NonNegative | None = None
    error_type: Short | None = None
    region: Short | None = None


class UsageEvent(msgspec.Struct, frozen=True):
    specversion: Literal["1.0"]
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    type: Literal["ai.usage.request.v1"]
    time: dt.datetime
    data: UsageData
    subject: str | None = None
    datacontenttype: Literal["application/json"] | None = None


@dataclass(frozen=True)
class TimeWindow:
    """Event times the gateway accepts: [oldest, newest]."""

    oldest: dt.datetime
    newest: dt.datetime

    @classmethod
    def around(cls, now: dt.datetime, retention_days: int) -> TimeWindow:
        return cls(oldest=now - dt.timedelta(days=retention_days), newest=now + MAX_FUTURE)


class InvalidEvent(ValueError):
    """One event broke a rule; the message names the field and the problem."""


def validate(item: object, window: TimeWindow) -> UsageEvent:
    """A decoded JSON value as a valid event, or :class:`InvalidEvent`."""
    try:
        event = msgspec.convert(item, UsageEvent)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(_describe(str(exc))) from None
    check_rules(event, window)
    return event


def check_rules(event: UsageEvent, window: TimeWindow) -> None:
    """The rules the types cannot say (the schema's ``$comment``)."""
    if event.time.tzinfo is None:
        raise InvalidEvent("time: must be RFC 3339 with an offset (Z or ±hh:mm)")
    if event.data.cached_input_tokens > event.data.input_tokens:
        raise InvalidEvent("data.cached_input_tokens: must not exceed data.input_tokens")
    if event.time > window.newest:
        raise InvalidEvent(f"time: {event.time.isoformat()} is more than 5 minutes in the future")
    if event.time < window.oldest:
        raise InvalidEvent(f"time: {event.time.isoformat()} is older than the raw-event retention")


def _describe(message: str) -> str:
    """msgspec's "problem - at `$.a.b`" as "a.b: problem"."""
    problem, _, where = message.rpartition(" - at `$")
    if not problem:
        return message
    return f"{where.rstrip('`').lstrip('.')}: {problem}"
