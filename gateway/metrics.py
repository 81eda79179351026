"""Prometheus metrics: OpenTelemetry instruments exported to a registry per app.

The HTTP histogram comes from the OpenTelemetry ASGI middleware; process and
garbage-collector metrics from prometheus_client's collectors and ``gc_policy``. Each app has its own registry, so
several apps in one process (tests) never collide.
"""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest

from gateway.gc_policy import register_gc_metrics


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
        return cls(registry=registry, meter_provider=MeterProvider(metric_readers=[reader]))

    def meter(self, name: str) -> Meter:
        return self.meter_provider.get_meter(name)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
