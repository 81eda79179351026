"""The usage event (CloudEvents 1.0, ``ai.usage.request.v1``) and its validation.

Types and bounds follow ``contracts/usage-event.schema.json`` exactly; the rules
of its ``$comment`` (cached <= input, not too far in the future, not older than
the raw retention) are checked by :func:`check_rules`, and what PostgreSQL
cannot store (NUL in text, lone surrogates, non-finite numbers) by
:func:`validate`. Every error names the field and the problem.

Optional members default to ``UNSET`` (not ``None``) so that an absent member
and an explicit ``null`` stay distinguishable: ``ingest.decode`` relies on it
to prove a body has no duplicate keys without re-parsing it.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, UnsetType

# ``\Z``, not ``$``: msgspec (like ``re.search``) lets ``$`` match before a trailing
# newline, while the JSON Schema's ECMA-262 ``$`` matches only at the very end.
ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}\Z"
MODEL_PATTERN = r"^[A-Za-z0-9._:/@+-]{1,128}\Z"
MAX_TOKENS = 100_000_000
MAX_FUTURE = dt.timedelta(minutes=5)
# RFC 3339 ``date-time`` as JSON Schema's format checker reads it (msgspec checks the values);
# msgspec also takes a space for the ``T``, which the schema refuses. One leniency is kept on
# purpose (docs/events.md): msgspec's ISO 8601 basic offsets, ``+hhmm``.
RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(?:\.\d+)?(?:[Zz]|[+-]\d\d:?\d\d)\Z", re.ASCII)
INTEGER_FIELDS = ("input_tokens", "cached_input_tokens", "output_tokens", "status_code")
# Free-text columns: the pattern-checked ones cannot hold a NUL anyway.
TEXT_FIELDS = (("id",), ("source",), ("data", "error_type"), ("data", "region"))

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
    project_id: Identifier | UnsetType | None = UNSET
    api_key_id: Identifier | UnsetType | None = UNSET
    cached: Annotated[int, msgspec.Meta(ge=0)] | UnsetType = msgspec.field(default=UNSET, name="cached_input_tokens")
    ttft_ms: NonNegative | UnsetType | None = UNSET
    error_type: Short | UnsetType | None = UNSET
    region: Short | UnsetType | None = UNSET

    @property
    def cached_input_tokens(self) -> int:
        """The schema's default, 0, when the member is absent."""
        return 0 if self.cached is UNSET else self.cached


class UsageEvent(msgspec.Struct, frozen=True):
    specversion: Literal["1.0"]
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    type: Literal["ai.usage.request.v1"]
    time: dt.datetime
    data: UsageData
    subject: str | UnsetType = UNSET  # not stored
    datacontenttype: Literal["application/json"] | UnsetType = UNSET


def stored(value: str | UnsetType | None) -> str | None:
    """An optional text member as its column value (absent and null are both NULL)."""
    return None if isinstance(value, UnsetType) else value


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


class DuplicateKeys(dict[str, object]):
    """A JSON object in which some keys occurred more than once (the parser keeps the last)."""

    duplicates: tuple[str, ...] = ()


def validate(item: object, window: TimeWindow) -> UsageEvent:
    """A JSON value decoded by the exact parser (``ingest.decode``) as a valid event, or :class:`InvalidEvent`."""
    check_tree(item, "")
    if isinstance(item, dict):
        item = _exact_integers(item)
        if isinstance(when := item.get("time"), str) and not RFC3339.match(when):
            raise InvalidEvent("time: must be an RFC 3339 date-time (e.g. 2026-11-29T12:00:00.123Z)")
    try:
        event = msgspec.convert(item, UsageEvent)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(_describe(str(exc))) from None
    check_rules(event, window)
    check_storable(event)
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


def check_storable(event: UsageEvent) -> None:
    """What the schema allows but PostgreSQL cannot store. The fast path of ``ingest.decode``
    never meets these (msgspec refuses escapes it cannot prove harmless, and out-of-range numbers)."""
    for path in TEXT_FIELDS:
        value: object = event
        for name in path:
            value = getattr(value, name)
        if isinstance(value, str) and "\x00" in value:
            raise InvalidEvent(f"{'.'.join(path)}: must not contain NUL (\\u0000)")
    for name in ("latency_ms", "ttft_ms"):
        number = getattr(event.data, name)
        if isinstance(number, float) and not math.isfinite(number):
            raise InvalidEvent(f"data.{name}: must be a finite number")


def check_tree(value: object, path: str) -> None:
    """Duplicate keys and lone surrogates anywhere in the event (iteratively: depth is the parser's to bound)."""
    stack = [(value, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            _check_text(node, where)
        elif isinstance(node, dict):
            if isinstance(node, DuplicateKeys):
                raise InvalidEvent(f"{where or '(event)'}: duplicate key {node.duplicates[0]!r}")
            for key, child in node.items():
                _check_text(key, where)
                stack.append((child, f"{where}.{key}" if where else key))
        elif isinstance(node, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(node))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEvent(f"{where or '(event)'}: lone UTF-16 surrogate (not encodable as UTF-8)") from None


def _exact_integers(item: dict[str, object]) -> dict[str, object]:
    """JSON Schema's ``integer`` includes numbers with a zero fraction (``1.0``, ``1e2``); msgspec does not."""
    data = item.get("data")
    if not isinstance(data, dict):
        return item
    fixed = {k: int(v) for k in INTEGER_FIELDS if isinstance(v := data.get(k), float) and v.is_integer()}
    return item | {"data": data | fixed} if fixed else item


def _describe(message: str) -> str:
    """msgspec's "problem - at `$.a.b`" as "a.b: problem"."""
    problem, _, where = message.rpartition(" - at `$")
    if not problem:
        return message
    return f"{where.rstrip('`').lstrip('.')}: {problem}"
