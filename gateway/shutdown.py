"""A bounded stop for ``serve``: every role's shutdown fits in ``ANALYTICS_SHUTDOWN_GRACE_S``.

The first SIGTERM or SIGINT starts the clock (and uvicorn's graceful shutdown); the workers drain within
what is left of it (:meth:`ShutdownClock.left`). A watchdog ends the process when the grace period is over
whatever is still running, and a second SIGTERM or SIGINT ends it at once. Either way nothing is acknowledged
without a commit: what the process still holds is redelivered by the broker once its connection drops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import structlog

log = structlog.get_logger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Of the grace period, what the workers leave for closing the clients after them (pools, broker, Redis).
CLOSE_RESERVE_S = 1.5
Handler = Callable[[int, FrameType | None], object] | int | None


class ShutdownClock:
    """When the stop began and how long it may take. Without signals (an app in a test) the clock starts when
    the lifespan's shutdown does, and nothing is forced."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.began: float | None = None  # time.monotonic()
        self.stage = "stopping the server"  # what the stop is doing (for the watchdog's line)
        self._previous: dict[int, Handler] = {}
        self._watchdog: threading.Timer | None = None

    def begin(self) -> None:
        if self.began is None:
            self.began = time.monotonic()

    def left(self, stage: str) -> float:
        """Seconds the workers may still use (the rest of the grace period, less what closing takes), as the
        stop enters ``stage`` (named by the watchdog if it has to end the process)."""
        self.stage = stage
        self.begin()
        assert self.began is not None
        reserve = min(CLOSE_RESERVE_S, self.grace_s / 4)
        return max(0.0, self.began + self.grace_s - reserve - time.monotonic())

    def watch_signals(self) -> None:
        """From now on a first SIGINT/SIGTERM starts the clock and the watchdog (then goes to the handler it
        replaces, uvicorn's), a second one exits at once. Main thread only, as signal handlers are."""
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.began is not None and self._watchdog is not None:
            _exit_now(128 + signum, "shutdown.forced", signal=signal.Signals(signum).name)
        self.begin()
        self._watchdog = threading.Timer(self.grace_s, self._expired)
        self._watchdog.daemon = True
        self._watchdog.start()
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)

    def _expired(self) -> None:
        _exit_now(
            1,
            "shutdown.grace_exceeded",
            grace_s=self.grace_s,
            stage=self.stage,
            left="what that stage had not finished; unacknowledged messages are redelivered by the broker",
        )


def _exit_now(code: int, event: str, **fields: object) -> None:
    """Log ``event`` and end the process without running anything else (a handler or a watchdog thread)."""
    log.warning(event, exit_code=code, **fields)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: exiting matters more
            stream.flush()
    os._exit(code)
