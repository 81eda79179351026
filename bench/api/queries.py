"""The GraphQL documents the benchmark sends, the usage query's shapes, and its tokens."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from kernel.auth import issue_token
from kernel.hours import floor_hour

USAGE_QUERY = """
query Usage($orgId: ID!, $range: TimeRange!, $granularity: Granularity!) {
  usage(orgId: $orgId, range: $range, granularity: $granularity, groupBy: [MODEL]) {
    totals { requests inputTokens cachedInputTokens outputTokens totalTokens spend }
    series { start end group { model } requests inputTokens cachedInputTokens outputTokens totalTokens spend }
    unpricedModels
  }
}
""".strip()
VIEWER_QUERY = "{ viewer { subject } }"
PROBE_QUERY = (
    "query Probe($orgId: ID!, $range: TimeRange!) "
    "{ usage(orgId: $orgId, range: $range, granularity: MINUTE) { totals { requests } } }"
)


def iso(moment: dt.datetime) -> str:
    """``2026-11-29T12:00:00Z``."""
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def token_for(secret: str, org_id: str) -> str:
    """An ``org_admin`` token of ``org_id`` that lasts the run."""
    return issue_token(secret, ["org_admin"], subject="bench", org_id=org_id, ttl_seconds=6 * 3600)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A usage query of the benchmark."""

    key: str
    granularity: str
    start: dt.datetime
    end: dt.datetime

    def variables(self, org_id: str) -> dict[str, Any]:
        return {
            "orgId": org_id,
            "granularity": self.granularity,
            "range": {"from": iso(self.start), "to": iso(self.end)},
        }


def shapes(now: dt.datetime) -> list[Shape]:
    """The "last 30 days" as a frontend asks: whole hours for HOUR (720 buckets), whole UTC days for DAY."""
    next_hour = floor_hour(now) + dt.timedelta(hours=1)
    tomorrow = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    return [
        Shape("hour_30d", "HOUR", next_hour - dt.timedelta(days=30), next_hour),
        Shape("day_30d", "DAY", tomorrow - dt.timedelta(days=30), tomorrow),
        Shape("day_365d", "DAY", tomorrow - dt.timedelta(days=365), tomorrow),
    ]
