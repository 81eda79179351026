"""Prometheus metrics: OpenTelemetry instruments exported to a registry per app.

The HTTP histogram comes from the OpenTelemetry ASGI middleware; process and
garbage-collector metrics from prometheus_client's collectors and ``gc_policy``. Each app has its own registry, so
several apps in one process (tests) never collide.

Labels come from bounded sets only (issue 10, finding 5): the ASGI middleware also labels its instruments with
the client's Host header (``http_host``, ``http_server_name``, ``net_host_name``, ``net_host_port``), so every
distinct Host made new series without end. A view keeps the method (unknown methods are ``_OTHER``), scheme,
protocol version, status code and route template (``http_target`` is set from the matched route only, never from
the raw path).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.view import View
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest

from db.rollup import CycleResult
from gateway.gc_policy import register_gc_metrics
from kernel.offload import Offload

# Attribute keys the HTTP server instruments may keep: old and new (``OTEL_SEMCONV_STABILITY_OPT_IN``) names.
HTTP_SERVER_LABELS = frozenset({
    "http.method", "http.scheme", "http.flavor", "http.status_code", "http.target",
    "http.request.method", "url.scheme", "network.protocol.version", "http.response.status_code", "http.route",
    "error.type",
})  # fmt: skip
HTTP_SERVER_VIEWS = (View(instrument_name="http.server.*", attribute_keys=set(HTTP_SERVER_LABELS)),)


class RollupMetrics:
    """``analytics_rollup_watermark_timestamp_seconds``: where the hourly rollups end (``materialized_through``),
    as of this process's last rollup cycle, for the alert RollupWatermarkBehind. Absent until the process has run a
    cycle (another process may hold the rollup lock; Prometheus takes the newest over instances)."""

    def __init__(self, meter: Meter) -> None:
        self.materialized_through: float | None = None
        meter.create_observable_gauge(
            "analytics_rollup_watermark_timestamp_seconds",
            callbacks=[self._observe],
            unit="s",
            description="Rollups are complete before this instant (Unix seconds), after this process's last cycle.",
        )

    def observe(self, result: CycleResult) -> CycleResult:
        """Record a cycle's outcome (the rollup worker passes every result through)."""
        if result.ran and result.rolled_until is not None:
            self.materialized_through = result.rolled_until.timestamp()
        return result

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        return [] if self.materialized_through is None else [Observation(self.materialized_through)]


class OffloadMetrics:
    """``analytics_offload_steps_total{where}``: the CPU-bound steps of answers (spike detection) run in a helper
    process (``where="helper"``) or in the serving process (``"here"``: every helper busy, starting or gone;
    kernel/offload.py). A rising share of ``here`` on a machine with helpers means they keep failing (the log says
    why: ``offload.helper_failed``) or the load needs more of them (ANALYTICS_OFFLOAD_WORKERS)."""

    def __init__(self, meter: Meter, offload: Offload) -> None:
        self.offload = offload
        meter.create_observable_counter(
            "analytics_offload_steps", callbacks=[self._observe], unit="1",
            description="CPU-bound steps of answers, by where they ran (helper process or serving process).",
        )  # fmt: skip

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, {"where": where}) for where, count in self.offload.steps.items()]


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    meter_provider: MeterProvider
    rollup: RollupMetrics

    @classmethod
    def create(cls) -> Metrics:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        register_gc_metrics(registry)
        reader = PrometheusMetricReader(registry=registry)
        provider = MeterProvider(metric_readers=[reader], views=HTTP_SERVER_VIEWS)
        return cls(
            registry=registry, meter_provider=provider, rollup=RollupMetrics(provider.get_meter("analytics.rollup"))
        )

    def meter(self, name: str) -> Meter:
        return self.meter_provider.get_meter(name)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
