"""Ingestion metrics, exported on ``/metrics`` with the app's other metrics."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

# A consumer failing to flush for this long makes /readyz answer 503 (alert IngestFlushFailing: 2 min).
NOT_READY_AFTER_S = 60.0

# The platform SLO counter's model label: the first MAX_MODEL_LABELS distinct models a process counts keep their
# name, every later one is counted as OTHER_MODEL (a producer can send any number of model names; a label must come
# from a bounded set). OTHER_MODEL cannot be a model name: parentheses are outside ingest.events.MODEL_PATTERN.
MAX_MODEL_LABELS = 200
OTHER_MODEL = "(other)"
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")  # status_code // 100 - 1; status codes are 100..599
# Series created at 0 when a model is first counted, so that the first errors show in rate() and the SLO ratios.
SLO_CLASSES = ("2xx", "5xx")


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

        self.platform = PlatformRequests(meter)
        self.caught_up_through: float | None = None  # epoch seconds, set by the AMQP consumer at each heartbeat
        meter.create_observable_gauge(
            "analytics_ingest_lag_seconds",
            callbacks=[self._observe_lag],
            unit="s",
            description="Now minus the instant up to which this AMQP consumer has committed what the broker holds.",
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

    def _observe_lag(self, options: CallbackOptions) -> Iterable[Observation]:
        if self.caught_up_through is None:
            return []
        return [Observation(max(0.0, time.time() - self.caught_up_through))]


class PlatformRequests:
    """``analytics_platform_requests_total{model, status_class}``: the served platform's requests, counted once per
    newly stored event (never for a duplicate), for the SLO burn-rate alerts (dashboards/rules/slo.rules.yml).
    No org label; the model label is bounded (``MAX_MODEL_LABELS``, then ``OTHER_MODEL``)."""

    def __init__(self, meter: Meter, *, max_models: int = MAX_MODEL_LABELS) -> None:
        self._counter = meter.create_counter(
            "analytics_platform_requests",
            unit="1",
            description="Requests the platform served, by model and status class, from newly stored usage events.",
        )
        self._max_models = max_models
        self._labels: dict[str, str] = {}  # at most max_models entries, plus OTHER_MODEL once it is in use

    def add(self, counts: Mapping[tuple[str, int], int]) -> None:
        """Count new events: ``counts`` maps (model, status_code // 100) to a number of events."""
        for (model, status_class), value in counts.items():
            self._counter.add(value, {"model": self.label(model), "status_class": STATUS_CLASSES[status_class - 1]})

    def label(self, model: str) -> str:
        """The model's label value: its name while the bound allows, else ``OTHER_MODEL``."""
        found = self._labels.get(model)
        if found is None:
            found = model if len(self._labels) < self._max_models else OTHER_MODEL
            if found not in self._labels:
                self._labels[found] = found
                for status_class in SLO_CLASSES:
                    self._counter.add(0, {"model": found, "status_class": status_class})
        return found
