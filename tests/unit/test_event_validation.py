"""The event validator against the reference JSON Schema validator (issue 10, finding 2).

A hypothesis property: for generated events, valid ones and mutated ones, our
validator (``ingest.decode.decode_body``, both its fast and its exact path)
accepts exactly what ``jsonschema`` (Draft 2020-12, formats checked) accepts
under the contract's schema, except the documented extra rules, which we must
refuse: cached <= input, the time window, duplicate keys, and what PostgreSQL
cannot store (NUL in a stored text, lone surrogates, numbers beyond a double).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.decode import BATCH, SINGLE, decode_body
from ingest.events import TimeWindow

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "shared" / "contracts" / "usage-event.schema.json"
EXAMPLES = int(os.environ.get("ANALYTICS_FUZZ_EXAMPLES", "300"))
NOW = dt.datetime.now(dt.UTC)
WINDOW = TimeWindow.around(NOW, 90)


def _ecma_patterns(node: Any) -> Any:
    """jsonschema runs ``pattern`` with Python's ``re.search``, where ``$`` also matches before a
    trailing newline; in ECMA-262, which JSON Schema specifies, it does not: ``\\Z`` is that ``$``."""
    if isinstance(node, dict):
        return {
            k: (v[:-1] + r"\Z" if k == "pattern" and v.endswith("$") else _ecma_patterns(v)) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_ecma_patterns(v) for v in node]
    return node


SCHEMA = _ecma_patterns(json.loads(SCHEMA_PATH.read_text()))
REFERENCE = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


# --- JSON text with what json.dumps cannot write: duplicate keys and raw number literals ---------


@dataclass
class Pairs:
    """A JSON object as written, duplicates included."""

    items: list[tuple[str, Any]]


@dataclass
class Raw:
    """A number literal written as is (``1e999``, ``1e2``)."""

    text: str


def dump(value: Any, spaced: bool, ascii_only: bool) -> str:
    comma, colon = (", ", ": ") if spaced else (",", ":")
    if isinstance(value, Pairs):
        members = (f"{dump(k, spaced, ascii_only)}{colon}{dump(v, spaced, ascii_only)}" for k, v in value.items)
        return "{" + comma.join(members) + "}"
    if isinstance(value, list):
        return "[" + comma.join(dump(v, spaced, ascii_only) for v in value) + "]"
    if isinstance(value, Raw):
        return value.text
    # A lone surrogate written raw is not UTF-8 (the body is unreadable as a whole): escape it.
    return json.dumps(value, ensure_ascii=ascii_only or not (isinstance(value, str) and _surrogate_free(value)))


def to_pairs(value: Any) -> Any:
    if isinstance(value, dict):
        return Pairs([(k, to_pairs(v)) for k, v in value.items()])
    return value


# --- generated events ---------------------------------------------------------------------------

IDENT = st.from_regex(r"\A[A-Za-z0-9._:-]{1,12}\Z")
MODEL = st.from_regex(r"\A[A-Za-z0-9._:/@+-]{1,12}\Z")
TEXT = st.text(max_size=8)


@st.composite
def times(draw: st.DrawFn) -> str:
    at = NOW - dt.timedelta(seconds=draw(st.integers(60, 80 * 86400)))
    offset = draw(st.sampled_from(["Z", "z", "+00:00", "+05:30", "-08:00", "-00:00"]))
    if offset not in ("Z", "z"):
        sign, hours, minutes = offset[0], int(offset[1:3]), int(offset[4:6])
        delta = dt.timedelta(hours=hours, minutes=minutes) * (1 if sign == "+" else -1)
        at = at.astimezone(dt.timezone(delta))
    digits = draw(st.integers(0, 9))
    fraction = (
        "." + "".join(draw(st.lists(st.sampled_from("0123456789"), min_size=digits, max_size=digits))) if digits else ""
    )
    separator = draw(st.sampled_from("Tt"))
    return at.strftime(f"%Y-%m-%d{separator}%H:%M:%S") + fraction + offset


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    input_tokens = draw(st.integers(0, 100_000_000))
    data: dict[str, Any] = {
        "org_id": draw(IDENT),
        "model": draw(MODEL),
        "input_tokens": input_tokens,
        "output_tokens": draw(st.integers(0, 100_000_000)),
        "latency_ms": draw(st.one_of(st.integers(0, 86_400_000), st.floats(0, 86_400_000))),
        "status_code": draw(st.integers(100, 599)),
    }
    optional: dict[str, Any] = {
        "project_id": st.one_of(st.none(), IDENT),
        "api_key_id": st.one_of(st.none(), IDENT),
        "cached_input_tokens": st.integers(0, input_tokens),
        "ttft_ms": st.one_of(st.none(), st.floats(0, 1e300)),
        "error_type": st.one_of(st.none(), st.text(max_size=64)),
        "region": st.one_of(st.none(), st.text(max_size=64)),
        "extra": st.one_of(st.integers(), TEXT, st.lists(st.integers(), max_size=3)),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            data[name] = draw(strategy)
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": draw(st.text(min_size=1, max_size=128)),
        "source": draw(st.text(min_size=1, max_size=256)),
        "type": "ai.usage.request.v1",
        "time": draw(times()),
        "data": data,
    }
    if draw(st.booleans()):
        event["subject"] = draw(TEXT)
    if draw(st.booleans()):
        event["datacontenttype"] = "application/json"
    return event


DATA_FIELDS = (
    "org_id", "model", "input_tokens", "output_tokens", "latency_ms", "status_code", "project_id", "api_key_id",
    "cached_input_tokens", "ttft_ms", "error_type", "region",
)  # fmt: skip
ENVELOPE_FIELDS = ("specversion", "id", "source", "type", "time", "subject", "datacontenttype", "data")
ODD_VALUES = (
    None, True, 0, -1, 1.0, 1.5, 1e2, 99, 100, 599, 600, 100_000_000, 100_000_001, 2**63, 10**30, 86_400_000.5,
    Raw("1e999"), Raw("-1e999"), Raw("1" + "0" * 400), Raw("100.0"), Raw("1E2"), "", "x", "12", "a" * 64, "a" * 65,
    "a" * 128, "a" * 129, "a" * 257, "org\n", "org\u0000", "x\u0000", "\ud800", "a\udfff", "\U0001f600", "café",
    "gpt 4", "gpt/4@x+y", [], {}, "1.0", "ai.usage.request.v1", "application/json", "application/xml",
    "2026-11-29 12:00:00Z", "2026-11-29T12:00:00", "2026-11-29T12:00:00+24:00", "2026-02-30T00:00:00Z",
)  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    """An event with zero to three mutations, as ``Pairs`` (so duplicates can be written)."""
    event = draw(valid_events())
    pairs = to_pairs(event)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["set", "set", "drop", "duplicate", "time", "newline", "nul"]))
        target = pairs if draw(st.booleans()) else dict(pairs.items).get("data")  # an earlier step may drop it
        if not isinstance(target, Pairs):
            continue
        names = ENVELOPE_FIELDS if target is pairs else DATA_FIELDS
        name = draw(st.sampled_from(names))
        present = [i for i, (k, _) in enumerate(target.items) if k == name]
        if kind == "set":
            value = draw(st.sampled_from(ODD_VALUES))
            _put(target, name, copy.deepcopy(value), present)
        elif kind == "drop" and present:
            del target.items[present[0]]
        elif kind == "duplicate" and present:
            position = draw(st.integers(0, len(target.items)))
            target.items.insert(position, (name, copy.deepcopy(target.items[present[0]][1])))
        elif kind == "time":
            _put(
                pairs,
                "time",
                draw(st.sampled_from(_odd_times())),
                [i for i, (k, _) in enumerate(pairs.items) if k == "time"],
            )
        elif kind in ("newline", "nul"):
            texts = [i for i, (_, v) in enumerate(target.items) if isinstance(v, str)]
            if texts:
                index = draw(st.sampled_from(texts))
                key, text = target.items[index]
                target.items[index] = (key, text + ("\n" if kind == "newline" else "\u0000"))
    return (
        draw(st.sampled_from([pairs, [pairs], draw(st.sampled_from(ODD_VALUES))]))
        if draw(st.integers(0, 30)) == 0
        else pairs
    )


def _odd_times() -> list[str]:
    future, old = NOW + dt.timedelta(days=1), NOW - dt.timedelta(days=100)
    recent = NOW - dt.timedelta(hours=1)
    return [
        future.strftime("%Y-%m-%dT%H:%M:%SZ"), old.strftime("%Y-%m-%dT%H:%M:%SZ"),
        recent.strftime("%Y-%m-%d %H:%M:%SZ"), recent.strftime("%Y-%m-%dT%H:%M:%S"),
        recent.strftime("%Y-%m-%dT%H:%M:%S.Z"), recent.strftime("%Y-%m-%dT%H:%M:%S+24:00"),
        recent.strftime("%Y-%m-%dT%H:%M:%S.123456789Z"), recent.strftime("%Y-%m-%dT%H:%M:%S+23:59"),
    ]  # fmt: skip


def _put(target: Pairs, name: str, value: Any, present: list[int]) -> None:
    if present:
        target.items[present[0]] = (name, value)
    else:
        target.items.append((name, value))


# --- the reference ------------------------------------------------------------------------------


class _Duplicate(ValueError):
    pass


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise _Duplicate
    return dict(pairs)


def _walk_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_walk_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _walk_strings(v)]
    return []


def _finite(number: Any) -> bool:
    try:
        return math.isfinite(float(number))
    except OverflowError:
        return False


def reference_accepts(text: str) -> bool:
    """jsonschema on the contract's schema, then the documented extra rules."""
    try:
        event = json.loads(text, object_pairs_hook=_strict_object)
    except _Duplicate:
        return False  # extra rule: duplicate keys are refused
    if not REFERENCE.is_valid(event):
        return False
    data = event["data"]
    if any(not _surrogate_free(s) for s in _walk_strings(event)):
        return False  # extra rule: not encodable as UTF-8
    if any(
        isinstance(v, str) and "\x00" in v
        for v in (event["id"], event["source"], data.get("error_type"), data.get("region"))
    ):
        return False  # extra rule: PostgreSQL text holds no NUL
    if not all(_finite(data[k]) for k in ("latency_ms", "ttft_ms") if data.get(k) is not None):
        return False  # extra rule: beyond a double precision
    if data.get("cached_input_tokens", 0) > data["input_tokens"]:
        return False
    if event["time"] != event["time"].strip():
        return False  # jsonschema's date-time check uses Python's `$`, which lets a trailing newline through
    when = _parse_time(event["time"])
    return WINDOW.oldest <= when <= WINDOW.newest


def _surrogate_free(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_time(text: str) -> dt.datetime:
    text = text.upper().replace("Z", "+00:00")
    head, _, tail = text.partition(".")
    if tail:  # fromisoformat takes at most 6 fractional digits
        digits = len(tail) - len(tail.lstrip("0123456789"))
        text = f"{head}.{tail[: min(digits, 6)]}{tail[digits:]}"
    return dt.datetime.fromisoformat(text)


def ours_accepts(body: bytes, content_type: str) -> list[bool] | None:
    """Per element: accepted? None when the whole body is unreadable."""
    from ingest.decode import UnreadableMessage

    try:
        decoded = decode_body(body, content_type, WINDOW)
    except UnreadableMessage:
        return None
    rejected = {r.index for r in decoded.rejected}
    assert not rejected & set(decoded.indexes)
    return [i not in rejected for i in range(len(decoded.indexes) + len(rejected))]


PROPERTY = settings(
    max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip


@PROPERTY
@given(st.lists(mutated(), min_size=1, max_size=4), st.booleans(), st.booleans())
def test_validator_matches_the_reference(items: list[Any], spaced: bool, ascii_only: bool) -> None:
    texts = [dump(item, spaced, ascii_only) for item in items]
    expected = [isinstance(item, Pairs) and reference_accepts(text) for item, text in zip(items, texts, strict=True)]
    single = ours_accepts(texts[0].encode("utf-8", "surrogatepass"), SINGLE)
    assert single in ([expected[0]], None), texts[0]
    if single is None:  # unreadable as a whole: only acceptable when the reference refuses it too
        assert not expected[0], texts[0]
    batch = ours_accepts(("[" + ",".join(texts) + "]").encode("utf-8", "surrogatepass"), BATCH)
    assert batch == expected, texts


# --- the findings, one by one -------------------------------------------------------------------


def _event(**data: Any) -> dict[str, Any]:
    base = {
        "specversion": "1.0", "id": "e1", "source": "//test", "type": "ai.usage.request.v1",
        "time": (NOW - dt.timedelta(minutes=1)).isoformat(),
        "data": {"org_id": "org_a", "model": "m", "input_tokens": 10, "output_tokens": 1, "latency_ms": 1.5,
                 "status_code": 200},
    }  # fmt: skip
    base["data"] |= data
    return base


def _single(text: str) -> list[bool] | None:
    return ours_accepts(text.encode("utf-8", "surrogatepass"), SINGLE)


@pytest.mark.parametrize("field", ["org_id", "project_id", "api_key_id", "model"])
def test_a_trailing_newline_is_refused(field: str) -> None:
    assert _single(json.dumps(_event(**{field: "abc\n"}))) == [False]


@pytest.mark.parametrize("where", ["id", "source", "error_type", "region"])
def test_nul_in_a_stored_text_is_refused_with_the_field(where: str) -> None:
    event = _event(**({where: "x\u0000"} if where in ("error_type", "region") else {}))
    if where in ("id", "source"):
        event[where] = "x\u0000"
    decoded = decode_body(json.dumps([_event(), event]).encode(), BATCH, WINDOW)
    assert len(decoded.events) == 1
    [rejected] = decoded.rejected
    assert rejected.index == 1 and where in rejected.error and "NUL" in rejected.error


def test_a_lone_surrogate_rejects_only_its_event() -> None:
    bad = _event(error_type="\ud800")
    decoded = decode_body(("[" + json.dumps(_event()) + "," + json.dumps(bad) + "]").encode(), BATCH, WINDOW)
    assert len(decoded.events) == 1 and "surrogate" in decoded.rejected[0].error


def test_duplicate_keys_are_refused_with_the_key() -> None:
    text = json.dumps(_event()).replace('"input_tokens": 10', '"input_tokens": 10, "input_tokens": 1000')
    decoded = decode_body(text.encode(), SINGLE, WINDOW)
    assert decoded.events == [] and "duplicate key 'input_tokens'" in decoded.rejected[0].error


@pytest.mark.parametrize("literal", ["1e999", "1" + "0" * 400])
def test_numbers_beyond_a_double_are_refused(literal: str) -> None:
    text = json.dumps(_event(ttft_ms=1.0)).replace('"ttft_ms": 1.0', f'"ttft_ms": {literal}')
    assert _single(text) == [False]


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000, b'[{"x":' + b"[" * 100_000 + b"]}]"])
def test_deep_nesting_is_unreadable_not_a_crash(body: bytes) -> None:
    from ingest.decode import UnreadableMessage

    with pytest.raises(UnreadableMessage, match=r"nested too deeply|not valid JSON"):
        decode_body(body, "application/json", WINDOW)


def test_integral_floats_are_integers_as_in_the_schema() -> None:
    text = json.dumps(_event()).replace('"input_tokens": 10', '"input_tokens": 1e1')
    decoded = decode_body(text.encode(), SINGLE, WINDOW)
    assert decoded.events[0].data.input_tokens == 10


def test_the_fast_path_still_takes_plain_batches() -> None:
    """Valid compact and spaced batches without escapes take msgspec's path (no Python parse)."""
    from ingest import decode

    body = json.dumps([_event(error_type=None, cached_input_tokens=0), _event()]).encode()
    assert decode._all_valid(body, BATCH, WINDOW) is not None
    assert decode._all_valid(body.replace(b'"id"', b'"id": "x", "id"', 1), BATCH, WINDOW) is None
