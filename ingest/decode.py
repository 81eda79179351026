"""From a message body to events: content types, size and batch limits.

One function serves AMQP and HTTP. A body that cannot be read at all raises
:class:`UnreadableMessage`; otherwise each element is validated on its own, so
the valid events of a batch survive its invalid ones.

Two parsers: msgspec straight into typed events (the fast path, taken when it
can prove the body exactly valid), and Python's ``json`` with a hook that sees
duplicate keys and lone surrogates (the exact path, for everything else).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import msgspec

from ingest.events import DuplicateKeys, InvalidEvent, TimeWindow, UsageEvent, check_rules, validate

MAX_BODY_BYTES = 10 * 1024 * 1024
MAX_BATCH_EVENTS = 10_000
SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
PLAIN = "application/json"
SUPPORTED = frozenset({SINGLE, BATCH, PLAIN})


class UnreadableMessage(ValueError):
    """The whole body is unusable (not JSON, too large, too deep, wrong shape)."""


@dataclass(frozen=True)
class Rejected:
    """One invalid event: its index in the body, why, and its JSON."""

    index: int
    error: str
    body: bytes


@dataclass
class Decoded:
    """The valid events with their indexes in the body, and the rejected ones."""

    events: list[UsageEvent] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)


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
        return Decoded(events=valid, indexes=list(range(len(valid))))
    document = _parse_exactly(body)
    return _validate_all(_items(document, kind), window, body if isinstance(document, dict) else None)


_TYPED: dict[str, msgspec.json.Decoder[list[UsageEvent]] | msgspec.json.Decoder[UsageEvent]] = {
    "[": msgspec.json.Decoder(list[UsageEvent]),
    "{": msgspec.json.Decoder(UsageEvent),
}
_ENCODER = msgspec.json.Encoder()


def _all_valid(body: bytes, kind: str, window: TimeWindow) -> list[UsageEvent] | None:
    """The fast path: JSON straight into typed events in one C pass, when every
    event is valid (the common case); None sends the body to the exact path."""
    shape = body.lstrip()[:1].decode("latin-1")
    if shape not in _TYPED or (kind == SINGLE and shape != "{") or (kind == BATCH and shape != "["):
        return None
    if b"\\" in body:  # escapes: NUL, surrogates, quotes inside strings; the exact path sees them
        return None
    try:
        decoded = _TYPED[shape].decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    events = decoded if isinstance(decoded, list) else [decoded]
    if len(events) > MAX_BATCH_EVENTS or not _no_duplicate_keys(body, events):
        return None
    try:
        for event in events:
            check_rules(event, window)
    except InvalidEvent:
        return None
    return events


def _no_duplicate_keys(body: bytes, events: list[UsageEvent]) -> bool:
    """True only when ``body`` provably has no duplicate key (nor any unknown member).

    Without backslashes every ``"`` delimits a string, so the body holds
    ``keys + string values`` strings. Re-encoding the events (absent members are
    UNSET and omitted) gives ``distinct known keys + known string values``, never
    more. Equal counts leave no room for a repeated key; any doubt (an unknown
    member, a duplicate) sends the body to the exact parser.
    msgspec would silently keep the last of duplicate keys.
    """
    canonical = _ENCODER.encode(events)
    # With the strings of body and re-encoding equal but for ``time`` (re-encoded with "T"),
    # equal counts of "T" mean no time used the space msgspec accepts and the schema refuses
    # (a lowercase "t" also takes the exact path).
    return body.count(b'"') == canonical.count(b'"') and body.count(b"T") == canonical.count(b"T")


def _parse_exactly(body: bytes) -> object:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableMessage(f"body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_no_constant)
    except RecursionError:
        raise UnreadableMessage("body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4,300 digits
        raise UnreadableMessage(f"body is not valid JSON: {exc}") from None


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) == len(pairs):
        return result
    marked = DuplicateKeys(result)
    seen: set[str] = set()
    marked.duplicates = tuple(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
    return marked


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _items(document: object, kind: str) -> list[object]:
    if isinstance(document, dict) and kind in (SINGLE, PLAIN):
        return [document]
    if isinstance(document, list) and kind in (BATCH, PLAIN):
        if len(document) > MAX_BATCH_EVENTS:
            raise UnreadableMessage(f"batch has {len(document):,} events; the limit is {MAX_BATCH_EVENTS:,}")
        return document
    expected = {SINGLE: "one JSON object", BATCH: "a JSON array"}.get(kind, "a JSON object or array")
    raise UnreadableMessage(f"{kind} body must be {expected}, got {type(document).__name__}")


def _validate_all(items: list[object], window: TimeWindow, single: bytes | None) -> Decoded:
    decoded = Decoded()
    for index, item in enumerate(items):
        try:
            decoded.events.append(validate(item, window))
            decoded.indexes.append(index)
        except InvalidEvent as exc:
            decoded.rejected.append(Rejected(index, str(exc), single or _reencode(item)))
    return decoded


def _reencode(item: object) -> bytes:
    """The rejected element as compact JSON for the dead-letter queue (``\\u`` escapes keep
    surrogates; a number too large for a double reads ``Infinity``)."""
    try:
        return json.dumps(item, separators=(",", ":")).encode()
    except (RecursionError, ValueError):
        return b'"(element could not be re-encoded)"'
