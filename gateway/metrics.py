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

from dataclasses import dataclass

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.view import View
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest

from gateway.gc_policy import register_gc_metrics

# Attribute keys the HTTP server instruments may keep: old and new (``OTEL_SEMCONV_STABILITY_OPT_IN``) names.
HTTP_SERVER_LABELS = frozenset({
    "http.method", "http.scheme", "http.flavor", "http.status_code", "http.target",
    "http.request.method", "url.scheme", "network.protocol.version", "http.response.status_code", "http.route",
    "error.type",
})  # fmt: skip
HTTP_SERVER_VIEWS = (View(instrument_name="http.server.*", attribute_keys=set(HTTP_SERVER_LABELS)),)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    meter_provider: MeterProvider

    @classmethod
    def create(cls) -> Metrics:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        register_gc_metrics(registry)
        reader = PrometheusMetricReader(registry=registry)
        return cls(registry=registry, meter_provider=MeterProvider(metric_readers=[reader], views=HTTP_SERVER_VIEWS))

    def meter(self, name: str) -> Meter:
        return self.meter_provider.get_meter(name)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
