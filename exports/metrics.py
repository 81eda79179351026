"""Export metrics, exported on ``/metrics`` with the app's other metrics (alert ExportJobsFailing reads the
failed counter). Labels: ``kind`` (cost | incident) and ``outcome``, both bounded sets."""

from __future__ import annotations

from opentelemetry.metrics import Meter


class ExportMetrics:
    def __init__(self, meter: Meter) -> None:
        self.failed = meter.create_counter(
            "analytics_export_jobs_failed",
            unit="1",
            description="Export jobs that failed for good (their retries used up, or a permanent error), by kind.",
        )
        self.attempts = meter.create_counter(
            "analytics_export_attempts",
            unit="1",
            description="Export attempts by kind and outcome (succeeded, retried, failed, lost, stopped).",
        )
        self.rows = meter.create_counter(
            "analytics_export_rows", unit="1", description="Rows written to export files that were stored, by kind."
        )
        self.seconds = meter.create_histogram(
            "analytics_export_attempt_seconds",
            unit="s",
            description="Time of one export attempt, from claim to its outcome, by kind.",
            explicit_bucket_boundaries_advisory=[0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600],
        )

    def attempt(self, kind: str, outcome: str, seconds: float) -> None:
        labels = {"kind": kind.lower(), "outcome": outcome}
        self.attempts.add(1, labels)
        self.seconds.record(seconds, {"kind": kind.lower()})
        if outcome == "failed":
            self.failed.add(1, {"kind": kind.lower()})
