"""The benchmark's data set loader notices a producer process that dies instead of waiting for it forever."""

from __future__ import annotations

import multiprocessing
import sys

import pytest

from bench.api import dataset


async def test_a_dead_producer_is_an_error_naming_its_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataset, "PRODUCER_CHECK_S", 0.05)
    context = multiprocessing.get_context("spawn")
    handoff = context.Queue()
    producer = context.Process(target=sys.exit, args=(3,), daemon=True)  # dies before its first batch
    producer.start()
    producer.join(10)
    with pytest.raises(ExceptionGroup) as raised:
        await dataset._drain(handoff, writer=None, writers=2, total=10, producer=producer)  # type: ignore[arg-type]
    assert raised.group_contains(RuntimeError, match=r"the event producer died \(exit code 3\)")
