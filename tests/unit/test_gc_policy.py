"""The serving process's garbage-collector policy (gateway/gc_policy.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.gc_policy import GcPauses, settle_heap


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restore_gc")
def test_settle_heap_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    survivor = [object() for _ in range(10)]  # a container that start-up leaves behind
    _, gen1, gen2 = gc.get_threshold()
    settle_heap(12_345)
    assert gc.get_threshold() == (12_345, gen1, gen2)
    assert gc.get_freeze_count() > 0
    assert not any(o is survivor for o in gc.get_objects())  # in the permanent generation: never walked


def test_pauses_are_counted_and_timed_per_generation() -> None:
    pauses = GcPauses()
    gc.callbacks.append(pauses.callback)
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        gc.callbacks.remove(pauses.callback)
    assert pauses.collections[0] >= 1 and pauses.collections[2] >= 1
    assert pauses.seconds[2] > 0 and pauses.longest[2] > 0
