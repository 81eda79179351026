"""Export job rules with no services: request validation and canonical input, the month-to-date cut, the
retry policy, cursors, totals."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from db.exports import ExportJobRow
from exports.job_events import job_channel
from exports.job_list import InvalidCursor, decode_cursor, encode_cursor
from exports.jobs import RetryPolicy, Totals, cost_job, incident_job, incident_selection
from kernel.errors import BadUserInput

NOW = dt.datetime(2026, 11, 29, 12, 34, 56, 789000, tzinfo=dt.UTC)


def _cost(month: str | None, now: dt.datetime = NOW, org: str | None = "org_a") -> tuple[dt.datetime, dt.datetime]:
    job = cost_job(org_id=org, month=month, requested_by="fin", key=None, now=now)
    return job.range_from, job.range_to


def test_month_to_date_is_cut_at_the_request_to_the_second() -> None:
    assert _cost(None) == (
        dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
        dt.datetime(2026, 11, 29, 12, 34, 56, tzinfo=dt.UTC),
    )
    # In another zone, the same instant: the month is the UTC month.
    assert _cost(None, NOW.astimezone(dt.timezone(dt.timedelta(hours=-11))))[1] == NOW.replace(microsecond=0)


def test_naming_the_current_month_is_the_same_request_as_month_to_date() -> None:
    named = cost_job(org_id="o", month="2026-11", requested_by="f", key="k", now=NOW)
    omitted = cost_job(org_id="o", month=None, requested_by="f", key="k", now=NOW)
    assert named == omitted
    assert named.params == {"month": "2026-11", "month_to_date": True}


def test_a_closed_month_covers_the_whole_month() -> None:
    assert _cost("2026-10") == (dt.datetime(2026, 10, 1, tzinfo=dt.UTC), dt.datetime(2026, 11, 1, tzinfo=dt.UTC))
    assert _cost("2025-12")[1] == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert cost_job(org_id=None, month="2025-12", requested_by="f", key=None, now=NOW).params == {
        "month": "2025-12",
        "month_to_date": False,
    }


@pytest.mark.parametrize(
    ("month", "message"),
    [
        ("2026-13", "is not YYYY-MM"),
        ("2026-1", "is not YYYY-MM"),
        ("26-01", "is not YYYY-MM"),
        ("2026-01\n", "is not YYYY-MM"),
        ("", "is not YYYY-MM"),
        ("1969-12", "is before 1970-01"),
        ("2026-12", "has not started yet"),
    ],
)
def test_bad_months_are_refused_clearly(month: str, message: str) -> None:
    with pytest.raises(BadUserInput, match=message):
        _cost(month)


def test_the_first_second_of_a_month_has_nothing_to_date() -> None:
    with pytest.raises(BadUserInput, match="first second"):
        _cost(None, dt.datetime(2026, 12, 1, 0, 0, 0, 999999, tzinfo=dt.UTC))
    assert _cost(None, dt.datetime(2026, 12, 1, 0, 0, 1, tzinfo=dt.UTC))[1] == dt.datetime(
        2026, 12, 1, 0, 0, 1, tzinfo=dt.UTC
    )


@pytest.mark.parametrize(
    ("key", "message"),
    [("", "must not be empty"), ("k" * 201, "longer than 200"), ("a\x00b", "NUL")],
)
def test_bad_idempotency_keys_are_refused(key: str, message: str) -> None:
    with pytest.raises(BadUserInput, match=message):
        cost_job(org_id="o", month=None, requested_by="f", key=key, now=NOW)


def test_incident_input_is_canonical() -> None:
    plus_two = dt.timezone(dt.timedelta(hours=2))
    start = dt.datetime(2026, 11, 29, 14, 0, tzinfo=plus_two)
    one = incident_job(org_id="o", start=start, end=start + dt.timedelta(hours=1), models=["b", "a", "b"],
                       requested_by="e", key="k")  # fmt: skip
    two = incident_job(org_id="o", start=start.astimezone(dt.UTC), end=start + dt.timedelta(hours=1),
                       models=["a", "b"], requested_by="e", key="k")  # fmt: skip
    assert one == two
    assert one.params == {
        "from": "2026-11-29T12:00:00+00:00",
        "to": "2026-11-29T13:00:00+00:00",
        "models": ["a", "b"],
        "project_ids": None,
        "api_key_ids": None,
        "errors_only": False,
    }
    assert one.range_from.tzinfo is dt.UTC
    # An empty filter matches nothing, which is not the same as no filter.
    empty = incident_job(org_id="o", start=start, end=start + dt.timedelta(hours=1), models=[], requested_by="e",
                         key="k")  # fmt: skip
    assert empty.params["models"] == [] and empty != one


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"start": dt.datetime(2026, 11, 29, 12)}, "range.from must have a time zone"),
        ({"end": dt.datetime(2026, 11, 29, 11, tzinfo=dt.UTC)}, "range.from must be before range.to"),
        ({"start": dt.datetime(1960, 1, 1, tzinfo=dt.UTC)}, "range.from must be between"),
        ({"models": ["m"] * 101}, "more than 100 values"),
        ({"project_ids": [""]}, "filter.projectIds must not be empty"),
        ({"api_key_ids": ["k\x00"]}, "filter.apiKeyIds must not contain NUL"),
        ({"org_id": ""}, "orgId must not be empty"),
    ],
)
def test_bad_incident_input_is_refused_clearly(change: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "org_id": "o",
        "start": dt.datetime(2026, 11, 29, 12, tzinfo=dt.UTC),
        "end": dt.datetime(2026, 11, 29, 13, tzinfo=dt.UTC),
        "requested_by": "e",
        "key": None,
        **change,
    }
    with pytest.raises(BadUserInput, match=message):
        incident_job(**arguments)  # type: ignore[arg-type]


def test_an_incident_selection_comes_back_from_the_stored_input() -> None:
    start = dt.datetime(2026, 11, 29, 12, tzinfo=dt.UTC)
    job = incident_job(org_id="o", start=start, end=start + dt.timedelta(hours=2), project_ids=["p"],
                       errors_only=True, requested_by="e", key=None)  # fmt: skip
    row = ExportJobRow(uuid.uuid4(), "o", "INCIDENT", "QUEUED", "e", job.range_from, job.range_to, NOW, None, None,
                       0, None, None, None, None, None, params=job.params)  # fmt: skip
    selection = incident_selection(row)
    assert selection.args() == ("o", start, start + dt.timedelta(hours=2), None, ["p"], None, True)


def test_backoff_doubles_up_to_the_cap_then_stops() -> None:
    policy = RetryPolicy(max_attempts=6, base=dt.timedelta(seconds=10), cap=dt.timedelta(seconds=60), jitter=0.2)
    assert [policy.retry_after(n, rand=lambda: 0.0) for n in range(1, 7)] == [
        dt.timedelta(seconds=10),
        dt.timedelta(seconds=20),
        dt.timedelta(seconds=40),
        dt.timedelta(seconds=60),
        dt.timedelta(seconds=60),
        None,
    ]
    assert policy.retry_after(1, rand=lambda: 1.0) == dt.timedelta(seconds=8)  # less up to 20 %
    assert RetryPolicy(max_attempts=1).retry_after(1) is None
    assert RetryPolicy(max_attempts=100, cap=dt.timedelta(days=1)).retry_after(99) is not None  # no overflow


def test_a_nonsense_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid retry policy"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="invalid retry policy"):
        RetryPolicy(base=dt.timedelta(minutes=5), cap=dt.timedelta(minutes=1))


def _row(created_at: dt.datetime, job_id: uuid.UUID) -> ExportJobRow:
    return ExportJobRow(job_id, "o", "COST", "QUEUED", "f", NOW, NOW, created_at, None, None, 0, None, None, None,
                        None, None)  # fmt: skip


@given(
    st.datetimes(min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(9998, 1, 1), timezones=st.just(dt.UTC)),
    st.uuids(),
)
def test_a_cursor_round_trips(created_at: dt.datetime, job_id: uuid.UUID) -> None:
    cursor = encode_cursor(_row(created_at, job_id))
    assert decode_cursor(cursor) == (created_at, job_id)
    assert cursor.isascii() and "=" not in cursor


@given(st.text(max_size=300))
def test_any_other_string_is_refused_as_a_cursor_never_an_internal_error(text: str) -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor(text)


def test_totals_keep_decimals_exact_as_strings() -> None:
    totals = Totals(1, 2**63 - 1, 0, 3, decimal.Decimal("0.000000000000000000001"))
    stored = totals.to_json()
    assert stored["spend"] == "0.000000000000000000001" and stored["input_tokens"] == 2**63 - 1
    assert Totals.from_json(stored) == totals
    assert Totals(0, 0, 0, 0, decimal.Decimal("1E+3")).to_json()["spend"] == "1000"
    assert Totals(0, 0, 0, 0, None).to_json()["spend"] is None


def test_each_job_has_its_own_channel() -> None:
    one, two = uuid.uuid4(), uuid.uuid4()
    assert job_channel(one) == f"export_job:{one}" and job_channel(one) != job_channel(two)
