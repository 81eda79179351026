"""From a message body to events: content types, size and batch limits.

One function serves AMQP and HTTP. A body that cannot be read at all raises
:class:`UnreadableMessage`; otherwise each element is validated on its own, so
the valid events of a batch survive its invalid ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from ingest.events import InvalidEvent, TimeWindow, UsageEvent, check_rules, validate

MAX_BODY_BYTES = 10 * 1024 * 1024
MAX_BATCH_EVENTS = 10_000
SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
PLAIN = "application/json"
SUPPORTED = frozenset({SINGLE, BATCH, PLAIN})


class UnreadableMessage(ValueError):
    """The whole body is unusable (not JSON, too large, wrong shape)."""


@dataclass(frozen=True)
class Rejected:
    """One invalid event: its index in the body, why, and its JSON."""

    index: int
    error: str
    body: bytes


@dataclass
class Decoded:
    events: list[UsageEvent] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def media_type(content_type: str | None) -> str:
    """``"application/json; charset=utf-8"`` -> ``"application/json"``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_body(body: bytes, content_type: str | None, window: TimeWindow) -> Decoded:
    """Validate every event of one message or request body."""
    kind = media_type(content_type) or PLAIN
    if kind not in SUPPORTED:
        raise UnreadableMessage(f"content type {kind!r} is not one of {', '.join(sorted(SUPPORTED))}")
    if len(body) > MAX_BODY_BYTES:
        raise UnreadableMessage(f"body is {len(body):,} bytes; the limit is {MAX_BODY_BYTES:,} (10 MiB)")
    valid = _all_valid(body, kind, window)
    if valid is not None:
        return Decoded(events=valid)
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise UnreadableMessage(f"body is not valid JSON: {exc}") from None
    return _validate_all(_items(document, kind), window)


_TYPED: dict[str, msgspec.json.Decoder[list[UsageEvent]] | msgspec.json.Decoder[UsageEvent]] = {
    "[": msgspec.json.Decoder(list[UsageEvent]),
    "{": msgspec.json.Decoder(UsageEvent),
}


def _all_valid(body: bytes, kind: str, window: TimeWindow) -> list[UsageEvent] | None:
    """The fast path: JSON straight into typed events in one C pass, when every
    event is valid (the common case); None sends the body to the per-event path."""
    shape = body.lstrip()[:1].decode("latin-1")
    if shape not in _TYPED or (kind == SINGLE and shape != "{") or (kind == BATCH and shape != "["):
        return None
    try:
        decoded = _TYPED[shape].decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    events = decoded if isinstance(decoded, list) else [decoded]
    if len(events) > MAX_BATCH_EVENTS:
        return None
    try:
        for event in events:
            check_rules(event, window)
    except InvalidEvent:
        return None
    return events


def _items(document: object, kind: str) -> list[object]:
    if isinstance(document, dict) and kind in (SINGLE, PLAIN):
        return [document]
    if isinstance(document, list) and kind in (BATCH, PLAIN):
        if len(document) > MAX_BATCH_EVENTS:
            raise UnreadableMessage(f"batch has {len(document):,} events; the limit is {MAX_BATCH_EVENTS:,}")
        return document
    expected = {SINGLE: "one JSON object", BATCH: "a JSON array"}.get(kind, "a JSON object or array")
    raise UnreadableMessage(f"{kind} body must be {expected}, got {type(document).__name__}")


def _validate_all(items: list[object], window: TimeWindow) -> Decoded:
    decoded = Decoded()
    for index, item in enumerate(items):
        try:
            decoded.events.append(validate(item, window))
        except InvalidEvent as exc:
            decoded.rejected.append(Rejected(index, str(exc), msgspec.json.encode(item)))
    return decoded
