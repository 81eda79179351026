"""What a results file records about its run: the commit, the machine, tool versions."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.harness.services import ADMIN_URL
from bench.profiles import py_spy

ROOT = Path(__file__).resolve().parent.parent.parent


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty_files": git("status", "--porcelain").splitlines()}


def tool_version(command: list[str], timeout_s: float = 30) -> str:
    """The first line a command prints (stdout, else stderr); ``?`` when it cannot run."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return "?"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "?"


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory, kernel and Python of this machine."""
    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), "?")  # fmt: skip
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def postgres_version() -> str:
    return tool_version(["psql", ADMIN_URL, "-Atc", "SELECT version()"], 60).split(" on ")[0]


def py_spy_version() -> str:
    return tool_version([py_spy() or "py-spy", "--version"])


def shown(path: Path) -> str:
    """A path as the results record it: relative to the repository when it is inside."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
