"""How the benchmarks reach PostgreSQL, and the kernel settings that shape a loopback TCP connection to it.

By default both benchmarks connect over PostgreSQL's Unix socket when this machine's server has one
(``/var/run/postgresql``), and over TCP to 127.0.0.1:5432 otherwise; ``ANALYTICS_BENCH_POSTGRES_URL`` chooses
(``postgresql://postgres@127.0.0.1:5432/postgres`` for TCP). The gateway under test and the floor's client use
the same URL, so their ratios compare like with like.

Why the socket by default: over loopback TCP, with the machine's congestion control set to BBR (as it is on
the benchmark machines), the kernel paces PostgreSQL's replies and now and then holds the rest of a ~480 kB
answer back for 60-100 ms while both processes sleep (seen with ``perf`` as an HRTIMER softirq that releases
the next segment). A few such requests in 30 s set the p99s. With ``cubic`` or over the socket there are
none. A gateway on the same host as its database should use the socket, or loopback TCP with a congestion
control other than BBR (docs/configuration.md); results record the transport and the TCP settings, and
docs/benchmarks.md shows TCP runs beside the main one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SOCKET_DIR = Path("/var/run/postgresql")
SOCKET_URL = "postgresql://postgres@%2Fvar%2Frun%2Fpostgresql/postgres"
TCP_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def admin_url() -> str:
    """The maintenance database's URL: ``ANALYTICS_BENCH_POSTGRES_URL``, else the socket if there is one."""
    chosen = os.environ.get("ANALYTICS_BENCH_POSTGRES_URL")
    if chosen:
        return chosen
    return SOCKET_URL if (SOCKET_DIR / ".s.PGSQL.5432").exists() else TCP_URL


def transport(url: str) -> str:
    """``unix socket`` for a libpq-style percent-encoded socket folder in place of the host, else ``tcp``."""
    host = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    return "unix socket" if host.startswith("%2F") or "host=/" in url else "tcp"


def _sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return None


def connection_facts(url: str) -> dict[str, Any]:
    """What the results record about the database connection."""
    return {
        "postgres_url": url,
        "transport": transport(url),
        "tcp_congestion_control": _sysctl("net.ipv4.tcp_congestion_control"),
        "default_qdisc": _sysctl("net.core.default_qdisc"),
    }
