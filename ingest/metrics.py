"""Ingestion metrics, exported on ``/metrics`` with the app's other metrics."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

# A consumer failing to flush for this long makes /readyz answer 503 (alert IngestFlushFailing: 2 min).
NOT_READY_AFTER_S = 60.0


class IngestMetrics:
    """Counters by outcome and channel, batch size and flush latency, queue depths, and
    how long the AMQP consumer has been failing to flush (for the gauge and ``/readyz``)."""

    def __init__(self, meter: Meter, *, not_ready_after_s: float = NOT_READY_AFTER_S) -> None:
        self.not_ready_after_s = not_ready_after_s
        self.failing_since: float | None = None  # time.monotonic() of the first failure in a row
        self.consecutive_failures = 0
        self.events = meter.create_counter(
            "analytics_ingest_events", unit="1", description="Events by outcome (accepted, duplicate, rejected)."
        )
        self.batch_size = meter.create_histogram(
            "analytics_ingest_batch_events",
            unit="1",
            description="Events per committed batch.",
            explicit_bucket_boundaries_advisory=[1, 10, 100, 500, 1000, 2000, 5000, 10000, 20000],
        )
        self.flush_seconds = meter.create_histogram(
            "analytics_ingest_flush_seconds",
            unit="s",
            description="Time to write and commit one batch.",
            explicit_bucket_boundaries_advisory=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
        )
        self.depths: dict[str, int] = {}
        meter.create_observable_gauge(
            "analytics_ingest_queue_messages",
            callbacks=[self._observe_depths],
            unit="1",
            description="Messages waiting in the ingest queue and in the dead-letter queue (queue label).",
        )

        meter.create_observable_gauge(
            "analytics_ingest_flush_failing_seconds",
            callbacks=[self._observe_failing],
            unit="s",
            description="How long the AMQP consumer has been failing to commit a batch (0 while it succeeds).",
        )

    def flush_failed(self) -> None:
        """A batch could not be committed (it is kept and retried)."""
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        self.consecutive_failures += 1

    def flush_succeeded(self) -> None:
        self.failing_since = None
        self.consecutive_failures = 0

    def failing_for_s(self) -> float:
        return 0.0 if self.failing_since is None else time.monotonic() - self.failing_since

    def flush_state(self) -> dict[str, Any]:
        """For ``/readyz``: not ok once flushing has failed for longer than ``not_ready_after_s``."""
        failing_for = self.failing_for_s()
        state: dict[str, Any] = {"ok": failing_for <= self.not_ready_after_s or self.failing_since is None}
        if self.failing_since is not None:
            state |= {"failing_for_s": round(failing_for, 1), "consecutive_failures": self.consecutive_failures}
        return state

    def count(self, channel: str, *, accepted: int, duplicates: int, rejected: int) -> None:
        for outcome, value in (("accepted", accepted), ("duplicate", duplicates), ("rejected", rejected)):
            if value:
                self.events.add(value, {"channel": channel, "outcome": outcome})

    def _observe_depths(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(depth, {"queue": name}) for name, depth in self.depths.items()]

    def _observe_failing(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.failing_for_s())]
