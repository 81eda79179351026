"""kernel/offload.py: steps in a real helper process, and every way a helper can fail the caller's step (it never
does: the step then runs here, with the function's own answer)."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from gateway.metrics import Metrics, OffloadMetrics
from kernel.offload import Offload
from reliability.spikes import Columns, detect_all


def where(tag: str) -> tuple[str, int]:
    return tag, os.getpid()


def fail(message: str) -> None:
    raise ValueError(message)


def slow_in_helper(parent: int, seconds: float) -> int:
    """Sleeps in a helper (a stuck step), answers at once here."""
    if os.getpid() != parent:
        time.sleep(seconds)
    return os.getpid()


async def ready(offload: Offload, count: int = 1) -> None:
    async with asyncio.timeout(30):
        while offload.ready < count:
            await asyncio.sleep(0.01)


@pytest.fixture
async def offload() -> AsyncIterator[Offload]:
    pool = Offload(1, preload=("reliability.spikes",), timeout_s=2.0)
    await pool.start()
    await ready(pool)
    yield pool
    await pool.close()


async def test_a_step_runs_in_the_helper_and_answers_the_functions_own_result(offload: Offload) -> None:
    tag, pid = await offload.run(where, "x")
    assert tag == "x" and pid != os.getpid()
    assert offload.steps == {"helper": 1, "here": 0}
    rng = np.random.default_rng(7)
    series = [Columns(rng.integers(50, 3000, 400), rng.integers(0, 30, 400), rng.uniform(50, 900, 400),
                      rng.uniform(900, 4000, 400)) for _ in range(3)]  # fmt: skip
    assert await offload.run(detect_all, series, 168, 24) == detect_all(series, 168, 24)


async def test_the_functions_exception_reaches_the_caller(offload: Offload) -> None:
    with pytest.raises(ValueError, match="no such thing"):
        await offload.run(fail, "no such thing")
    assert offload.steps["helper"] == 1
    assert (await offload.run(where, "after"))[1] != os.getpid()  # the helper goes on


async def test_a_step_never_waits_for_a_busy_helper(offload: Offload) -> None:
    first = offload.run(slow_in_helper, os.getpid(), 0.5)
    second = offload.run(where, "now")
    assert second.done() and second.result() == ("now", os.getpid())  # here, at once
    assert await first != os.getpid()
    assert offload.steps == {"helper": 1, "here": 1}


async def test_a_helper_killed_mid_step_is_replaced_and_its_step_answered_here(offload: Offload) -> None:
    step = offload.run(slow_in_helper, os.getpid(), 5.0)
    await asyncio.sleep(0.2)
    helper = offload._helpers[0].process
    assert helper is not None
    helper.kill()
    assert await step == os.getpid()  # the step ran here
    await ready(offload)
    assert offload._helpers[0].process is not None and offload._helpers[0].process.pid != helper.pid
    assert (await offload.run(where, "new"))[1] == offload._helpers[0].process.pid


async def test_a_stuck_helper_is_killed_after_the_timeout(offload: Offload) -> None:
    started = time.monotonic()
    assert await offload.run(slow_in_helper, os.getpid(), 30.0) == os.getpid()
    assert time.monotonic() - started < 10
    await ready(offload)
    assert (await offload.run(where, "again"))[1] != os.getpid()


async def test_a_cancelled_step_does_not_leave_its_answer_to_the_next(offload: Offload) -> None:
    step = offload.run(slow_in_helper, os.getpid(), 0.5)
    await asyncio.sleep(0.05)
    step.cancel()
    with pytest.raises(asyncio.CancelledError):
        await step
    await ready(offload)
    assert await offload.run(where, "next") == ("next", offload._helpers[0].process.pid)  # type: ignore[union-attr]


async def test_steps_the_helper_cannot_take_run_here(offload: Offload, tmp_path: Path) -> None:
    (tmp_path / "only_here.py").write_text("import os\ndef pid():\n    return os.getpid()\n")
    sys.path.insert(0, str(tmp_path))  # this process can import it; the helper cannot
    try:
        import only_here  # type: ignore[import-not-found]

        assert await offload.run(only_here.pid) == os.getpid()
    finally:
        sys.path.remove(str(tmp_path))
    assert await offload.run(lambda: os.getpid()) == os.getpid()  # not picklable at all
    assert offload.steps == {"helper": 0, "here": 2}
    assert (await offload.run(where, "still"))[1] != os.getpid()


async def test_helpers_start_on_the_first_step_which_runs_here_meanwhile() -> None:
    pool = Offload(1, preload=("reliability.spikes",))
    try:
        assert pool.ready == 0 and pool._helpers[0].process is None  # nothing started before a step
        first = pool.run(where, "first")
        assert first.done() and first.result()[1] == os.getpid()
        await ready(pool)
        assert (await pool.run(where, "second"))[1] != os.getpid()
    finally:
        await pool.close()


async def test_without_helpers_every_step_runs_here() -> None:
    pool = Offload(0)
    await pool.start()
    answer = pool.run(math.sqrt, 9.0)
    assert answer.done() and answer.result() == 3.0
    with pytest.raises(ValueError):
        pool.run(fail, "x").result()
    await pool.close()
    with pytest.raises(ValueError, match="workers"):
        Offload(-1)


async def test_close_ends_the_helpers(offload: Offload) -> None:
    process = offload._helpers[0].process
    assert process is not None
    await offload.close()
    assert process.returncode is not None
    assert offload.ready == 0 and offload.run(where, "closed").result()[1] == os.getpid()


async def test_helpers_end_when_their_server_is_killed(tmp_path: Path) -> None:
    """A serving process killed outright (SIGKILL: no lifespan, no close) leaves no helper behind: its helpers' input
    ends, and they exit. A Ctrl-C (SIGINT to the process group) is the server's to handle: the helper ignores it."""
    script = tmp_path / "server.py"
    script.write_text(
        "import asyncio, sys\n"
        "from kernel.offload import Offload\n"
        "async def main():\n"
        "    pool = Offload(1)\n"
        "    await pool.start()\n"
        "    while not pool.ready:\n"
        "        await asyncio.sleep(0.01)\n"
        "    print('helper', pool._helpers[0].process.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    server = await asyncio.create_subprocess_exec(sys.executable, str(script), stdout=asyncio.subprocess.PIPE,
                                                  env={**os.environ, "PYTHONPATH": root})  # fmt: skip
    assert server.stdout is not None
    async with asyncio.timeout(30):
        while not (line := await server.stdout.readline()).startswith(b"helper "):
            assert line, "the server ended"
    helper = int(line.split()[1])
    os.kill(helper, signal.SIGINT)
    await asyncio.sleep(0.2)
    assert _alive(helper)  # (SIGINT ignored)
    server.kill()
    await server.wait()
    async with asyncio.timeout(10):
        while _alive(helper):
            await asyncio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # (a zombie has exited: its parent, killed, has not reaped it yet)


async def test_where_steps_ran_is_on_the_metrics_page(offload: Offload) -> None:
    metrics = Metrics.create()
    OffloadMetrics(metrics.meter("test"), offload)
    assert (await offload.run(where, "helper"))[1] != os.getpid()
    busy = offload.run(slow_in_helper, os.getpid(), 0.3)
    assert offload.run(where, "here").done()
    await busy
    samples = {
        line.split('where="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.exposition().decode().splitlines()
        if line.startswith("analytics_offload_steps_total{")
    }
    assert samples == {"helper": 2.0, "here": 1.0}
