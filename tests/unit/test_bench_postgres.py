"""The benchmarks' choice of PostgreSQL transport (bench/postgres.py)."""

from pathlib import Path

import pytest

from bench import postgres


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://postgres@%2Fvar%2Frun%2Fpostgresql/postgres", "unix socket"),
        ("postgresql://postgres@/postgres?host=/var/run/postgresql", "unix socket"),
        ("postgresql://postgres@127.0.0.1:5432/postgres", "tcp"),
        ("postgresql://user:p%2Fss@db.example:5432/postgres", "tcp"),
    ],
)
def test_transport(url: str, expected: str) -> None:
    assert postgres.transport(url) == expected


def test_environment_variable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANALYTICS_BENCH_POSTGRES_URL", postgres.TCP_URL)
    assert postgres.admin_url() == postgres.TCP_URL


def test_socket_when_the_server_has_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ANALYTICS_BENCH_POSTGRES_URL", raising=False)
    monkeypatch.setattr(postgres, "SOCKET_DIR", tmp_path)
    assert postgres.admin_url() == postgres.TCP_URL
    (tmp_path / ".s.PGSQL.5432").touch()
    assert postgres.admin_url() == postgres.SOCKET_URL


def test_connection_facts_name_the_congestion_control() -> None:
    facts = postgres.connection_facts(postgres.TCP_URL)
    assert facts["transport"] == "tcp"
    assert set(facts) == {"postgres_url", "transport", "tcp_congestion_control", "default_qdisc"}
