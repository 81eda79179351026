"""Running a benchmark's main coroutine so that SIGTERM stops it in order, like Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

from bench.harness.output import say


def run_cancellable(main: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run(main)``; SIGTERM cancels it, so servers are stopped, databases dropped, queues deleted and
    results written on the way out (exit code 130)."""
    return asyncio.run(_cancellable(main))


async def _cancellable(main: Coroutine[Any, Any, int]) -> int:
    task = asyncio.ensure_future(main)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return int(await task)
    except asyncio.CancelledError:
        say("cancelled")
        return 130
