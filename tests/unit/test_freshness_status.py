"""Freshness status from heartbeats."""

from __future__ import annotations

import datetime as dt

from db.freshness import FreshnessRow
from kernel.settings import Settings
from resolvers.freshness import to_freshness

NOW = dt.datetime(2026, 11, 29, 12, tzinfo=dt.UTC)


def _row(caught_up: dt.timedelta | None, last_beat: dt.timedelta | None) -> FreshnessRow:
    return FreshnessRow(
        org_id="o", last_event_at=None, last_ingested_at=None, materialized_through=None,
        caught_up_through=NOW - caught_up if caught_up is not None else None,
        last_beat_at=NOW - last_beat if last_beat is not None else None,
    )  # fmt: skip


def test_status_follows_the_live_ingesters() -> None:
    settings = Settings(freshness_fresh_s=60, freshness_stale_s=300)
    cases = [
        (_row(None, None), "FRESH", 0.0),  # no AMQP ingester ever: HTTP answers after commit
        (_row(dt.timedelta(seconds=2), dt.timedelta(seconds=1)), "FRESH", 2.0),
        (_row(dt.timedelta(seconds=90), dt.timedelta(seconds=1)), "DELAYED", 90.0),  # a backlog
        (_row(dt.timedelta(seconds=400), dt.timedelta(seconds=1)), "STALE", 400.0),
        (_row(None, dt.timedelta(seconds=900)), "STALE", 900.0),  # ingesters stopped reporting
        (_row(dt.timedelta(seconds=-3), dt.timedelta(seconds=1)), "FRESH", 0.0),  # clock skew
    ]
    for row, status, lag in cases:
        freshness = to_freshness(row, settings, NOW)
        assert (freshness.status.value, freshness.lag_seconds) == (status, lag)
