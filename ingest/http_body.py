"""The CloudEvents HTTP binding's three content modes for ``POST /v1/events``: which one a request uses, and its
events through the same validation as every other body (:func:`ingest.decode.decode_body`).

- structured: ``Content-Type: application/cloudevents+json``, one event as the body;
- batch: ``application/cloudevents-batch+json``, a JSON array of events;
- binary: the attributes as ``ce-*`` headers (``ce-specversion``, ``ce-id``, ``ce-source``, ``ce-type``,
  ``ce-time``, optionally ``ce-subject``), the event's ``data`` as the body, its media type as ``Content-Type``
  (``application/json``, or none: the data is JSON either way), as the CloudEvents SDK's ``to_binary`` sends it.

The mode follows the binding: a ``application/cloudevents…`` media type is structured or batch whatever
``ce-*`` headers come with it; otherwise a ``ce-specversion`` header means binary. A plain ``application/json``
body without ``ce-*`` headers is still read by its shape (object or array), as over AMQP.

A binary-mode event is rebuilt as the structured event it stands for (header values percent-decoded as the
binding says, the body embedded as ``data`` unchanged) and decoded as one, so both modes share every rule and
every message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

import msgspec

from ingest.decode import BATCH, PLAIN, SINGLE, Decoded, UnreadableMessage, decode_body, media_type
from ingest.events import TimeWindow

HEADER_PREFIX = "ce-"
MODES = (
    "supported: structured mode (Content-Type: application/cloudevents+json, one event), "
    "batch mode (application/cloudevents-batch+json, an array of events), "
    "binary mode (ce-specversion, ce-id, ce-source, ce-type and ce-time headers with the event's data as an "
    "application/json body); a plain application/json body without ce-* headers is read by its shape"
)
_ATTRIBUTE_NAME = re.compile(r"^[a-z0-9]{1,20}$")
# Not attributes a ce-* header may set: the body is the data, and Content-Type its media type.
_NOT_FROM_HEADERS = frozenset({"data", "data_base64", "datacontenttype"})


class UnsupportedMode(ValueError):
    """A request in no mode the endpoint reads (HTTP 415); the message names the supported ones."""


@dataclass(frozen=True)
class Binary:
    """A binary-mode request: the event's attributes from its ``ce-*`` headers (names without the prefix)."""

    attributes: dict[str, str]
    # Content-Type: application/json was sent (datacontenttype); the SDK's to_binary sends none for JSON data
    # unless the event names its datacontenttype, and the data is then read as JSON all the same.
    declared: bool = True


Mode = str | Binary


def request_mode(content_type: str | None, headers: Iterable[tuple[str, str]]) -> Mode:
    """The request's mode from its headers (names lower case, as ASGI gives them): a media type of
    :mod:`ingest.decode` for structured, batch and shape-read bodies, or :class:`Binary`.

    Raises :class:`UnsupportedMode` for a media type no mode reads, :class:`UnreadableMessage` for ``ce-*``
    headers that do not make a binary-mode request (no ``ce-specversion``, a name twice, a bad name)."""
    kind = media_type(content_type)
    if kind in (SINGLE, BATCH):
        return kind
    ce = [(name.lower()[len(HEADER_PREFIX) :], value) for name, value in headers if name.lower().startswith("ce-")]
    if not ce:
        if kind == PLAIN:
            return PLAIN
        raise UnsupportedMode(f"content type {kind or '(none)'!r} is not read here; {MODES}")
    names = [name for name, _ in ce]
    if "specversion" not in names:
        raise UnreadableMessage(f"ce-* headers without ce-specversion: binary mode needs it; {MODES}")
    if kind not in (PLAIN, ""):
        raise UnsupportedMode(f"binary mode: the data must be application/json, not {kind!r}; {MODES}")
    return Binary(_attributes(ce), declared=kind == PLAIN)


def decode_binary(body: bytes, mode: Binary, window: TimeWindow) -> Decoded:
    """The one event of a binary-mode request, validated as its structured twin (rejected: index 0).
    Bodies of the other modes go to :func:`ingest.decode.decode_body` with the media type as they are."""
    return decode_body(_structured(body, mode), SINGLE, window)


def _attributes(headers: list[tuple[str, str]]) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for name, value in headers:
        header = HEADER_PREFIX + name
        if not _ATTRIBUTE_NAME.match(name):
            raise UnreadableMessage(f"header {header[:40]!r}: attribute names are 1-20 lower-case letters and digits")
        if name in _NOT_FROM_HEADERS:
            raise UnreadableMessage(f"header {header}: in binary mode the body is the data and Content-Type its type")
        if name in attributes:
            raise UnreadableMessage(f"header {header} is given more than once")
        try:
            # The binding percent-encodes what a header cannot carry (non-ASCII as UTF-8, space, '"', '%').
            attributes[name] = unquote(value, encoding="utf-8", errors="strict")
        except UnicodeDecodeError:
            raise UnreadableMessage(f"header {header}: percent-encoded bytes are not UTF-8") from None
    return attributes


def _structured(data: bytes, binary: Binary) -> bytes:
    """The structured-mode event of a binary-mode request: its attributes and ``data``, the body as it came."""
    if not data.strip():
        raise UnreadableMessage("binary mode: the body (the event's data) is empty")
    try:
        msgspec.json.decode(data)  # one JSON value and nothing after it, or the embedding below would not be
    except (msgspec.DecodeError, RecursionError) as exc:
        raise UnreadableMessage(f"binary mode: the body (the event's data) is not valid JSON: {exc}") from None
    members = [json.dumps(name) + ":" + json.dumps(value) for name, value in binary.attributes.items()]
    if binary.declared:
        members.append('"datacontenttype":"application/json"')
    return ("{" + ",".join(members) + ',"data":').encode() + data + b"}"
