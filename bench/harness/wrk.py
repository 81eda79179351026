"""HTTP load with wrk (HTTP/1.1 keep-alive, a Lua script for the request, its latency histogram)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
from pathlib import Path
from typing import Any

import orjson

WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "errors": {"connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d}, "latency_us": {"min": %d, "max": %d, "mean": %.1f, ' ..
    '"stdev": %.1f, "p50": %d, "p75": %d, "p90": %d, "p99": %d, "p999": %d}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev, latency:percentile(50), latency:percentile(75),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
"""


@dataclasses.dataclass(frozen=True)
class HttpTarget:
    """One request that wrk repeats."""

    path: str
    method: str = "GET"
    body: bytes | None = None
    token: str | None = None

    def lua(self) -> str:
        lines = [f'wrk.method = "{self.method}"']
        if self.body is not None:
            assert b"]==]" not in self.body
            lines += [f"wrk.body = [==[{self.body.decode()}]==]", 'wrk.headers["Content-Type"] = "application/json"']
        if self.token is not None:
            lines.append(f'wrk.headers["Authorization"] = "Bearer {self.token}"')
        return "\n".join(lines) + "\n" + WRK_DONE


def graphql_target(query: str, variables: dict[str, Any] | None, token: str) -> HttpTarget:
    body = orjson.dumps({"query": query, "variables": variables or {}})
    return HttpTarget("/graphql", "POST", body, token)


async def run_wrk(base_url: str, target: HttpTarget, *, connections: int, seconds: float, work: Path) -> dict[str, Any]:
    """wrk -t1 for ``seconds`` (whole seconds, at least one); its figures as the results record them."""
    script = work / f"wrk_{secrets.token_hex(4)}.lua"
    script.write_text(target.lua())
    command = [
        "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "60s", "--latency",
        "-s", str(script), base_url + target.path,
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    text = out.decode(errors="replace")
    line = next((x for x in text.splitlines() if x.startswith("WRK_JSON ")), None)
    if process.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({process.returncode}): {text[-1000:]} {err.decode()[-1000:]}")
    return _figures(json.loads(line.removeprefix("WRK_JSON ")), connections, text)


def _figures(raw: dict[str, Any], connections: int, text: str) -> dict[str, Any]:
    seconds_run = raw["duration_us"] / 1e6
    lat = raw["latency_us"]
    return {
        "tool": f"wrk -t1 -c{connections} (Lua script, keep-alive)",
        "connections": connections,
        "requests": raw["requests"],
        "seconds": round(seconds_run, 2),
        "rps": round(raw["requests"] / seconds_run, 1),
        "errors": raw["errors"],
        "error_count": sum(raw["errors"].values()),
        "bytes_per_response": round(raw["bytes"] / max(raw["requests"], 1)),
        "latency_ms": {k: round(lat[k] / 1000, 2) for k in ("p50", "p90", "p99", "p999", "max", "mean")},
        "wrk_latency_distribution": _distribution(text),
    }


def _distribution(text: str) -> str:
    lines = text.splitlines()
    start = next((i for i, x in enumerate(lines) if "Latency Distribution" in x), None)
    return "\n".join(x.strip() for x in lines[start : start + 5]) if start is not None else ""
