"""Ingestion metrics, exported on ``/metrics`` with the app's other metrics."""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation


class IngestMetrics:
    """Counters by outcome and channel, batch size and flush latency, queue depths."""

    def __init__(self, meter: Meter) -> None:
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

    def count(self, channel: str, *, accepted: int, duplicates: int, rejected: int) -> None:
        for outcome, value in (("accepted", accepted), ("duplicate", duplicates), ("rejected", rejected)):
            if value:
                self.events.add(value, {"channel": channel, "outcome": outcome})

    def _observe_depths(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(depth, {"queue": name}) for name, depth in self.depths.items()]
