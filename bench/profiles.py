"""py-spy profiles shared by the benchmarks: finding and starting py-spy, counting its collapsed ("raw")
stacks, and the text summary written next to them."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


async def start_py_spy(pid: int, seconds: int | str, fmt: str, output: Path) -> asyncio.subprocess.Process:
    """``py-spy record`` of ``pid`` at 100 Hz for ``seconds`` into ``output`` (``fmt``: raw, flamegraph...). With
    ``PYSPY_NATIVE=1`` in the environment, C frames too (``--native``: which codec decodes a row, where numpy
    spends; the process runs slower under it, so its rates are not the benchmark's)."""
    binary = py_spy()
    assert binary is not None
    return await asyncio.create_subprocess_exec(
        binary, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100", "--format", fmt,
        *(["--native"] if os.environ.get("PYSPY_NATIVE") == "1" else []),
        "--output", str(output), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


def short_file(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


@dataclass
class StackCounts:
    """Samples per function (self and inclusive) and per area (self, and inclusive outside ``not_areas``)."""

    samples: int = 0
    self_samples: Counter[str] = field(default_factory=Counter)
    total_samples: Counter[str] = field(default_factory=Counter)
    area_self: Counter[str] = field(default_factory=Counter)
    area_total: Counter[str] = field(default_factory=Counter)

    def top(self, counter: Counter[str], n: int) -> list[dict[str, Any]]:
        return [
            {"function": k, "samples": v, "share": round(v / max(self.samples, 1), 3)}
            for k, v in counter.most_common(n)
        ]

    def busy_share(self, duration_s: float, rate_hz: int) -> float:
        return round(self.samples / max(duration_s * rate_hz, 1), 3)


def count_stacks(collapsed: Path, area: Callable[[str, str], str], not_areas: tuple[str, ...] = ()) -> StackCounts:
    """Counts py-spy's collapsed output; ``area(file, func)`` names the part of the program a frame is in."""
    counts = StackCounts()
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        counts.samples += count
        frames = []
        for raw in stack.split(";"):
            match = _FRAME.match(raw.strip())
            func, file = (match["func"], short_file(match["file"])) if match else (raw.strip(), "?")
            frames.append((f"{func} ({file})", file, func))
        if not frames:
            continue
        name, file, func = frames[-1]
        counts.self_samples[name] += count
        counts.area_self[area(file, func)] += count
        for seen in {f[0] for f in frames}:
            counts.total_samples[seen] += count
        for part in {area(f[1], f[2]) for f in frames if not f[1].startswith(not_areas)}:
            counts.area_total[part] += count
    return counts


def profile_text(summary: dict[str, Any], sections: Sequence[tuple[str, str]], title: str | None = None) -> str:
    """The ``sections`` (heading, key of ``summary``) of a profile summary as text, after ``title``."""
    lines = [] if title is None else [title]
    lines += [f"py-spy samples: {summary['samples']} (busy share of one core: {summary['busy_share_of_one_core']})", ""]
    for heading, key in sections:
        lines.append(f"== {heading}")
        lines += [f"{row['share'] * 100:5.1f}%  {row['samples']:6d}  {row['function']}" for row in summary[key]]
        lines.append("")
    return "\n".join(lines)
