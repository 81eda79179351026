"""CPU-bound steps of a request in helper processes, so that a second core works while this one goes on.

Some steps of an answer are pure CPU: spike detection over a report's series is a few milliseconds of numpy,
after PostgreSQL has answered, while this process also has the answer's JSON to write and the machine's other
cores idle. :class:`Offload` runs such a step (a module-level function of picklable arguments, a pure function:
the same answer wherever it runs) in a helper process and hands back a future of its result; the caller does its
own work meanwhile and awaits the result when it needs it.

A step never waits for a helper: when every helper is busy, when none runs (``workers=0``, still starting, or
gone), it runs in this process at once. A helper that exits, or answers late (``timeout_s``: stuck), is killed and
replaced in the background, and its step is run here, so a caller always gets the function's own answer (or its
own exception). Helpers start in the background on the first step (or :meth:`Offload.start`), and take steps once
they have imported what they need (``preload``).

The pipes carry frames (an 8-byte big-endian length, then a pickle): a step ``(function, arguments)`` in, its
result ``(True, value)`` or ``(False, exception)`` out, or ``(None, reason)`` when the helper could not take it
(a function it cannot import: the step is then run here). Only this process writes to a helper, over its own pipes.
A helper is ``python -m kernel.offload <modules to import>``; it exits when its input closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib
import os
import pickle
import signal
import struct
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import IO, Any, TypeVar

import structlog

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

FRAME = struct.Struct(">Q")
READY = b"ready"
PIPE_BYTES = 1 << 20  # a step's arguments go into the pipe at once (a 30-day report's series: about 70 KB)
_F_SETPIPE_SZ = 1031  # Linux's fcntl (elsewhere pipes keep their size: a larger step is written as the helper reads)
RESTART_DELAY_S = 1.0  # at most one restart a second for a helper that keeps dying
_ROOT = str(Path(__file__).resolve().parent.parent)  # so that ``python -m kernel.offload`` finds the packages


class Offload:
    """``workers`` helper processes that run steps (see the module); ``run`` answers every step either way."""

    def __init__(self, workers: int, *, preload: tuple[str, ...] = (), timeout_s: float = 10.0) -> None:
        if workers < 0:
            raise ValueError(f"workers is {workers}: give 0 (no helper) or more")
        self.preload, self.timeout_s = preload, timeout_s
        self._helpers = [_Helper(self) for _ in range(workers)]
        self.steps = {"helper": 0, "here": 0}  # where steps ran (tests, and the operations docs' metric)

    async def start(self) -> None:
        """Start the helpers now, in the background (else the first step starts them: a process that never offloads
        a step starts none)."""
        for helper in self._helpers:
            helper.launch()

    async def close(self) -> None:
        for helper in self._helpers:
            await helper.close()

    @property
    def ready(self) -> int:
        """Helpers that can take a step now."""
        return sum(h.ready and not h.busy for h in self._helpers)

    def run(self, function: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """``function(*args)``: in a free helper, or here at once (the future is then done)."""
        helper = next((h for h in self._helpers if h.ready and not h.busy), None)
        if helper is None:
            for idle in self._helpers:
                idle.launch()  # (those not started yet, or being replaced; the step runs here meanwhile)
        else:
            try:
                data = pickle.dumps((function, args), protocol=pickle.HIGHEST_PROTOCOL)
            except (pickle.PicklingError, TypeError, AttributeError):  # a bug of ours: say so, and run it here
                log.exception("offload.unpicklable_step", function=getattr(function, "__qualname__", "?"))
            else:
                return asyncio.ensure_future(helper.step(data, function, args))  # (the helper is held from now)
        self.steps["here"] += 1
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(function(*args))
        except Exception as exc:  # noqa: BLE001 - the function's own failure is its answer
            future.set_exception(exc)
        return future


class _Helper:
    """One helper process: started, fed one step at a time, replaced when it fails."""

    def __init__(self, pool: Offload) -> None:
        self.pool = pool
        self.process: asyncio.subprocess.Process | None = None
        self.ready = self.busy = self.closing = False
        self._starting: asyncio.Task[None] | None = None
        self._last_start = 0.0

    def launch(self) -> None:
        """Start the helper in the background unless it runs, is starting or the pool is closing."""
        if not self.closing and self.process is None and (self._starting is None or self._starting.done()):
            self._starting = asyncio.ensure_future(self._start())

    async def _start(self) -> None:
        wait = self._last_start + RESTART_DELAY_S - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._last_start = time.monotonic()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kernel.offload", *self.pool.preload,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
            )  # fmt: skip
            self.process = process
            _widen(process.stdin)  # (the answers are small)
            assert process.stdout is not None
            if await _read_frame(process.stdout) != READY:
                raise RuntimeError("the helper did not say it was ready")
        except Exception:
            log.exception("offload.start_failed")
            await self._discard()
            return
        if not self.closing:
            self.ready = True
            log.info("offload.helper_started", pid=process.pid)

    def step(self, data: bytes, function: Callable[..., _T], args: tuple[Any, ...]) -> Coroutine[Any, Any, _T]:
        """Send the step (pickled: ``data``) now, holding the helper; the coroutine answers it (here, if the helper
        fails)."""
        process = self.process
        assert process is not None and process.stdin is not None and process.stdout is not None
        self.busy = True
        with contextlib.suppress(OSError, RuntimeError):  # the helper is gone: the answer reports it
            process.stdin.write(FRAME.pack(len(data)) + data)
        return self._answer(process.stdout, process.pid, function, args)

    async def _answer(
        self, stdout: asyncio.StreamReader, pid: int, function: Callable[..., _T], args: tuple[Any, ...]
    ) -> _T:
        try:
            frame = await asyncio.wait_for(_read_frame(stdout), self.pool.timeout_s)
            ok, value = pickle.loads(frame)  # noqa: S301 - from our own helper, over its own pipe
        except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError, pickle.UnpicklingError) as exc:
            log.warning("offload.helper_failed", pid=pid, error=type(exc).__name__)
            await self._replace()
            self.pool.steps["here"] += 1
            return function(*args)
        except BaseException:  # cancelled mid-step: the helper's answer would be read by the next step
            await self._replace()
            raise
        finally:
            self.busy = False
        if ok is None:  # the helper could not take this step (see serve): a bug of ours, run here
            log.error("offload.step_refused", reason=value)
            self.pool.steps["here"] += 1
            return function(*args)
        self.pool.steps["helper"] += 1
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    async def _replace(self) -> None:
        await self._discard()
        if not self.closing:
            self.launch()

    async def _discard(self) -> None:
        self.ready = False
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def close(self) -> None:
        self.closing, self.ready = True, False
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._starting
        process, self.process = self.process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()  # the helper exits at the end of its input
        try:
            await asyncio.wait_for(process.wait(), 2.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _widen(pipe: Any) -> None:
    """Make a pipe hold PIPE_BYTES (Linux; elsewhere, or where the loop does not expose the pipe, it keeps its size:
    a larger step is then written as the helper reads)."""
    transport = getattr(pipe, "transport", None) or getattr(pipe, "_transport", None)
    end = transport.get_extra_info("pipe") if transport is not None else None
    if end is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fcntl.fcntl(end.fileno(), _F_SETPIPE_SZ, PIPE_BYTES)


async def _read_frame(stream: asyncio.StreamReader) -> bytes:
    (size,) = FRAME.unpack(await stream.readexactly(FRAME.size))
    return await stream.readexactly(size)


# --- the helper process ------------------------------------------------------------------------------------------


def serve(source: IO[bytes], sink: IO[bytes]) -> None:
    """Answer steps from ``source`` on ``sink`` until ``source`` ends."""

    def write(data: bytes) -> None:
        sink.write(FRAME.pack(len(data)) + data)
        sink.flush()

    write(READY)
    while head := source.read(FRAME.size):
        if len(head) < FRAME.size:
            return
        (size,) = FRAME.unpack(head)
        try:
            function, args = pickle.loads(source.read(size))  # noqa: S301 - from the process that started us
        except Exception as exc:  # noqa: BLE001 - e.g. a function this process cannot import: the caller runs the step
            write(pickle.dumps((None, f"{type(exc).__name__}: {exc}")))
            continue
        try:
            answer: tuple[bool | None, Any] = (True, function(*args))
        except Exception as exc:  # noqa: BLE001 - the function's own failure is its answer
            answer = (False, exc)
        try:
            data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - an answer or exception that does not pickle: say so
            data = pickle.dumps((False, RuntimeError(f"unpicklable answer: {type(exc).__name__}: {exc}")))
        write(data)


if __name__ == "__main__":
    # Ctrl-C in a terminal reaches the whole process group: the serving process stops its helpers (their input
    # closes; a helper whose server died sees its input end the same way).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for module in sys.argv[1:]:
        importlib.import_module(module)
    # The pipes are this process's stdin and stdout; whatever else writes to stdout would corrupt the frames.
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, protocol_out)
