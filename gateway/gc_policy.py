"""The garbage collector's policy for a serving process, and its pauses as metrics.

An analytics answer allocates tens of thousands of short-lived containers (rows,
bucket objects, result dicts). With CPython's default thresholds (700, 10, 10)
they trigger a young collection every few hundred allocations, survivors are
promoted while the request still holds them, and a full collection every few
requests then walks every object the process ever imported: the bench measured
8.5 ms of collections per 30-day HOUR answer and full-collection pauses of
60-80 ms (``docs/benchmarks.md``).

``settle_heap`` runs once the app has started: it collects, moves every surviving
object (modules, the schema, clients) to the permanent generation with
``gc.freeze()`` so full collections no longer walk them, and raises the youngest
generation's threshold so a request's objects are usually freed by reference
counting before a collection sees them. Cycles are still collected.

The high threshold is only cheap if requests leave no reference cycles: cyclic
garbage piles up to the threshold and one collection then frees it all at once
(20-80 ms when graphql-core's executor was left in a cycle per request; see
``schema.execution.FastExecutionContext.build_response``). Tests assert that a
finished execution and the per-request loaders leave none.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


def settle_heap(gen0_threshold: int) -> None:
    """Freeze what start-up allocated and set the youngest generation's threshold."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


@dataclass
class GcPauses:
    """Collections and the time they stopped the process, per generation (a ``gc.callbacks`` hook)."""

    collections: list[int] = field(default_factory=lambda: [0, 0, 0])
    seconds: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    longest: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    _started: float = 0.0

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation, took = info["generation"], time.perf_counter() - self._started
        self.collections[generation] += 1
        self.seconds[generation] += took
        self.longest[generation] = max(self.longest[generation], took)


_PAUSES = GcPauses()
gc.callbacks.append(_PAUSES.callback)


class GcPauseCollector(Collector):
    """Exports the process's :class:`GcPauses` (one hook per process, read by every app's registry)."""

    def __init__(self, pauses: GcPauses = _PAUSES) -> None:
        self._pauses = pauses

    def collect(self) -> Iterator[Metric]:
        total = CounterMetricFamily(
            "python_gc_pause_seconds", "Time spent in garbage collections", labels=["generation"]
        )
        longest = GaugeMetricFamily(
            "python_gc_longest_pause_seconds", "Longest garbage collection since start", labels=["generation"]
        )
        for generation in range(3):
            total.add_metric([str(generation)], self._pauses.seconds[generation])
            longest.add_metric([str(generation)], self._pauses.longest[generation])
        yield total
        yield longest


def register_gc_metrics(registry: CollectorRegistry) -> None:
    registry.register(GcPauseCollector())
