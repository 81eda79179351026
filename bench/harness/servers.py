"""Child processes the benchmarks start (gateways, the API): environment, ports, readiness, stopping, logs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.harness.output import say

ROOT = Path(__file__).resolve().parent.parent.parent
PROBLEM_LEVELS = ("warning", "error", "critical", "exception")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without its ``ANALYTICS_*`` settings, plus ``extra``."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ANALYTICS_")} | extra


@dataclasses.dataclass
class Server:
    name: str
    process: asyncio.subprocess.Process
    port: int
    log_path: Path
    started_at: float  # wall clock
    ready_at: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""


async def launch(name: str, command: list[str], env: dict[str, str], port: int, log_path: Path,
                 cwd: Path = ROOT) -> Server:  # fmt: skip
    """Start ``command`` in a session of its own (Ctrl-C reaches the benchmark, which stops it in order)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(name, process, port, log_path, time.time())


async def wait_ready(server: Server, timeout_s: float) -> None:
    """Poll ``/readyz`` until it answers 200 (sets ``ready_at``); raises when the process exits or time is up."""
    answers: Counter[str] = Counter()
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if server.process.returncode is not None:
                raise RuntimeError(f"{server.name} exited with {server.process.returncode}: {server.log_tail()}")
            try:
                response = await http.get("/readyz", timeout=5)
            except httpx.TransportError as exc:
                answers[type(exc).__name__] += 1
            else:
                if response.status_code == 200:
                    server.ready_at = time.time()
                    return
                answers[f"{response.status_code} {response.text[:200]}"] += 1
            await asyncio.sleep(0.1)  # a process that is starting: there is nothing to await
    raise RuntimeError(f"{server.name} not ready after {timeout_s} s ({dict(answers)}); see {server.log_path}")


async def start_server(name: str, command: list[str], env: dict[str, str], port: int, log_dir: Path,
                       timeout_s: float) -> Server:  # fmt: skip
    """Launch and wait until ready; a server that does not become ready is stopped."""
    server = await launch(name, command, env, port, log_dir / f"{name}.log")
    try:
        await wait_ready(server, timeout_s)
    except BaseException:
        await stop_server(server)
        raise
    say(f"{name} ready on :{port} (pid {server.pid})")
    return server


async def stop_server(server: Server) -> int | None:
    """SIGTERM, then SIGKILL after 60 s; the exit code."""
    if server.process.returncode is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(server.process.wait(), 60)
        except TimeoutError:
            server.process.kill()
            await server.process.wait()
    return server.process.returncode


def log_summary(path: Path) -> dict[str, Any]:
    """Counts of log levels and the distinct warning/error events of a JSON-lines log."""
    levels: Counter[str] = Counter()
    notable: Counter[str] = Counter()
    examples: dict[str, str] = {}
    other_lines = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            other_lines += bool(line.strip())
            if line.strip() and ("Error" in line or "Traceback" in line):
                notable[line.strip()[:120]] += 1
            continue
        level = str(record.get("level", "?"))
        levels[level] += 1
        if level in PROBLEM_LEVELS:
            key = f"{level}: {record.get('event')}"
            notable[key] += 1
            examples.setdefault(key, line[:500])
    return {"levels": dict(levels), "warnings_and_errors": dict(notable), "examples": examples,
            "non_json_lines": other_lines}  # fmt: skip


def log_problems(path: Path) -> dict[str, int]:
    """Warning and error events of a JSON-lines log, counted."""
    return dict(log_summary(path)["warnings_and_errors"])
