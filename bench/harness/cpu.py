"""CPU seconds per process group, read from /proc, and waiting for an idle machine.

Groups: pids the benchmark names (the gateways it started), ``bench`` (this process), ``kernel`` (kernel
threads), ``postgres`` (the server's processes and the backends of the benchmark's databases),
``postgres_other_db`` (backends of other databases: other people's work), ``rabbitmq``, ``redis``, ``wrk``,
``py_spy``; what no group holds is ``other`` (machine busy time minus the groups).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness.output import say

CLK_TCK = os.sysconf("SC_CLK_TCK")
FOREIGN = ("other", "postgres_other_db")  # work that is not the benchmark's
_BY_COMM = {"wrk": "wrk", "redis-server": "redis", "py-spy": "py_spy"}
# client backends: "postgres: 15/main: <user> <database> <client address> <state>"
_BACKEND = re.compile(r"postgres: [^:]+: (\S+) (\S+) (\S+)")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()  # fields from 3 (state) on


def process_cpu_s(pid: int) -> float | None:
    """utime + stime of a process, in seconds."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / CLK_TCK


def _start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def _uptime_ticks() -> float:
    return float(Path("/proc/uptime").read_text().split()[0]) * CLK_TCK


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclasses.dataclass(frozen=True)
class MachineCpu:
    """The whole machine's CPU seconds since boot: busy, total (busy + idle + iowait), interrupts."""

    busy: float
    total: float
    irq: float

    @classmethod
    def read(cls) -> MachineCpu:
        parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = (parts + [0] * 8)[:8]
        busy = user + nice + system + irq + softirq + steal
        return cls(busy / CLK_TCK, (busy + idle + iowait) / CLK_TCK, (irq + softirq) / CLK_TCK)


@dataclasses.dataclass(frozen=True)
class ProcessGroups:
    """Which group a process belongs to ("" for none)."""

    named: dict[int, str]
    own_databases: Sequence[str]  # backends of these databases are the benchmark's "postgres"

    def classify(self, pid: int) -> str:
        if pid in self.named:
            return self.named[pid]
        if pid == os.getpid():
            return "bench"
        fields = _stat_fields(pid)
        if fields is not None and (pid == 2 or fields[1] == "2"):  # kthreadd and its children
            return "kernel"
        if fields is not None and int(fields[1]) in self.named:  # a named process's helper (kernel/offload.py)
            return self.named[int(fields[1])]
        comm = _comm(pid)
        if comm == "postgres":
            return self._postgres(pid)
        if comm == "beam.smp":  # the broker, not a rabbitmqctl run (also a beam.smp)
            return "" if "rabbitmqctl" in _cmdline(pid) else "rabbitmq"
        return _BY_COMM.get(comm, "")

    def _postgres(self, pid: int) -> str:
        match = _BACKEND.match(_cmdline(pid))
        client = match is not None and (match.group(3).startswith(("127.", "[", "::")) or "(" in match.group(3))
        if client and match is not None and match.group(2) not in self.own_databases:
            return "postgres_other_db"
        return "postgres"


class CpuCounters:
    """Cumulative CPU seconds per group since construction. A process that exits keeps its last value; one that
    started later counts from zero."""

    def __init__(self, groups: ProcessGroups) -> None:
        self.groups = groups
        self._group: dict[int, str] = {}
        self._base: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._since = _uptime_ticks()
        self._lock = threading.Lock()  # a scan in a worker thread may still run when the window stops
        self.scan(first=True)

    def scan(self, first: bool = False) -> None:
        with self._lock:
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    self._read(int(entry.name), first)

    def _read(self, pid: int, first: bool) -> None:
        known = pid in self._group
        if not known:
            self._group[pid] = self.groups.classify(pid)
        if not self._group[pid] or (cpu := process_cpu_s(pid)) is None:
            return
        if not known:
            started_before = (_start_ticks(pid) or 0) < self._since
            self._base[pid] = cpu if (first or started_before) else 0.0
        self._last[pid] = cpu

    def totals(self) -> dict[str, float]:
        seconds: dict[str, float] = defaultdict(float)
        with self._lock:
            for pid, last in self._last.items():
                seconds[self._group[pid]] += last - self._base.get(pid, 0.0)
        return dict(seconds)


class CpuWindow:
    """CPU per group between ``start()`` and ``stop()``, sampled every ``every_s`` (processes that come and go
    in between are seen)."""

    def __init__(self, named: dict[int, str], database: str, every_s: float = 0.2) -> None:
        self.groups = ProcessGroups(named, (database, "postgres"))
        self.every_s = every_s
        self._counters: CpuCounters | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0
        self._machine0 = MachineCpu(0.0, 0.0, 0.0)

    def start(self) -> None:
        self._counters = CpuCounters(self.groups)
        self._started = time.monotonic()
        self._machine0 = MachineCpu.read()
        self._task = asyncio.create_task(_every(self.every_s, self._counters.scan))

    async def stop(self) -> dict[str, Any]:
        await _cancel(self._task)
        assert self._counters is not None
        self._counters.scan()
        wall = max(time.monotonic() - self._started, 1e-6)
        machine = MachineCpu.read()
        seconds = self._counters.totals()
        busy = machine.busy - self._machine0.busy
        seconds["other"] = max(busy - sum(seconds.values()), 0.0)
        cores = {k: round(v / wall, 3) for k, v in sorted(seconds.items())}
        return {
            "wall_s": round(wall, 2),
            "cores_used": cores,
            "machine_busy_cores": round(busy / wall, 3),
            "machine_cores": round((machine.total - self._machine0.total) / wall, 2),
            "foreign_cores": round(sum(cores.get(k, 0.0) for k in FOREIGN), 3),
        }


@dataclasses.dataclass
class CpuSample:
    at: float  # wall clock (unix seconds), comparable with the database's timestamps
    groups: dict[str, float]  # cumulative CPU seconds since the sampler started
    machine: MachineCpu  # the machine's CPU seconds since the sampler started


class CpuSampler:
    """A timeline of CPU samples every ``every_s``, from which any window can be cut afterwards."""

    GROUPS = ("gateway", "postgres", "rabbitmq", "redis", "bench", "kernel", "postgres_other_db")

    def __init__(self, gateway_pid: int | None, database: str, every_s: float = 0.25) -> None:
        named = {gateway_pid: "gateway"} if gateway_pid else {}
        self._counters = CpuCounters(ProcessGroups(named, (database,)))
        self._machine0 = MachineCpu.read()
        self.every_s = every_s
        self.samples: list[CpuSample] = []
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> CpuSample:
        self._counters.scan()
        machine = MachineCpu.read()
        since = MachineCpu(*(a - b for a, b in zip(dataclasses.astuple(machine), dataclasses.astuple(self._machine0),
                                                      strict=True)))  # fmt: skip
        sample = CpuSample(time.time(), self._counters.totals(), since)
        self.samples.append(sample)
        return sample

    def start(self) -> None:
        self.sample()
        self._task = asyncio.create_task(_every(self.every_s, self.sample))

    async def stop(self) -> None:
        await _cancel(self._task)
        self.sample()

    def window(self, start: float, end: float) -> dict[str, Any]:
        """CPU seconds per group, and cores (CPU s / wall s), between the samples nearest ``start`` and ``end``."""
        if len(self.samples) < 2:
            return {}
        before = max((s for s in self.samples if s.at <= start), key=lambda s: s.at, default=self.samples[0])
        after = min((s for s in self.samples if s.at >= end), key=lambda s: s.at, default=self.samples[-1])
        wall = max(after.at - before.at, 1e-6)
        seconds = {n: after.groups.get(n, 0.0) - before.groups.get(n, 0.0) for n in self.GROUPS}
        seconds["interrupts"] = after.machine.irq - before.machine.irq
        busy = after.machine.busy - before.machine.busy
        seconds["other"] = max(busy - sum(seconds.values()), 0.0)
        return {
            "wall_s": round(wall, 3),
            "cpu_s": {k: round(v, 2) for k, v in seconds.items()},
            "cores_used": {k: round(v / wall, 3) for k, v in seconds.items()},
            "machine_busy_cores": round(busy / wall, 3),
            "machine_cores": round((after.machine.total - before.machine.total) / wall, 2),
        }


async def _every(interval_s: float, scan: Any) -> None:
    """Call ``scan`` every ``interval_s``, off the event loop (which may be timing queries)."""
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(scan)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_quiet(max_wait_s: float, threshold_cores: float, hint: str = "") -> dict[str, float]:
    """Wait until the machine's busy CPU (all processes) stays under ``threshold_cores`` for 2 s (at most
    ``max_wait_s``); ``hint`` ends the progress line."""
    started = reported = time.monotonic()
    calm, busy_cores = 0, 0.0
    while time.monotonic() - started < max_wait_s:
        b0 = MachineCpu.read().busy
        await asyncio.sleep(1.0)
        busy_cores = MachineCpu.read().busy - b0
        calm = calm + 1 if busy_cores < threshold_cores else 0
        if calm >= 2:
            break
        if time.monotonic() - reported >= 10:
            reported = time.monotonic()
            say(f"waiting for a quiet machine: {busy_cores:.2f} cores busy{hint}")
    return {"waited_s": round(time.monotonic() - started, 1), "busy_cores_at_start": round(busy_cores, 2)}
