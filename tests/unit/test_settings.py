from __future__ import annotations

import pytest

from kernel.errors import ConfigError
from kernel.settings import ALL_ROLES, ProcessRole, Settings, load_settings


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("ANALYTICS_"):
            monkeypatch.delenv(name)


def test_defaults_are_the_embedded_default() -> None:
    settings = load_settings()
    assert settings.database_url is None and settings.amqp_url is None and settings.redis_url is None
    assert (settings.host, settings.port, settings.export_retention_days) == ("127.0.0.1", 8080, 30)


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("ANALYTICS_AMQP_URL", "not-a-url", "amqp://"),
        ("ANALYTICS_DATABASE_URL", "mysql://x", "postgresql://"),
        ("ANALYTICS_PORT", "99999", "65535"),
        ("ANALYTICS_JWT_SECRET", "short", "32 characters"),
        ("ANALYTICS_EXPORT_RETENTION_DAYS", "0", "greater than or equal to 1"),
    ],
)
def test_bad_values_give_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, words: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    message = str(raised.value)
    assert message.startswith(variable + ":") and words in message and "\n" not in message
    assert value not in message or variable != "ANALYTICS_JWT_SECRET"


def test_secrets_never_show_in_repr() -> None:
    settings = Settings(jwt_secret="s" * 40, database_url="postgresql://u:hunter2hunter2@h/db")
    assert "hunter2" not in repr(settings) and "s" * 40 not in repr(settings)
    assert "hunter2" not in str(settings.model_dump())


def test_api_role_with_a_database_needs_jwt_config() -> None:
    settings = Settings(database_url="postgresql://h/db")
    with pytest.raises(ConfigError, match="ANALYTICS_JWT_SECRET"):
        settings.require_for(ALL_ROLES)
    settings.require_for(frozenset({ProcessRole.INGEST}))
    Settings(database_url="postgresql://h/db", jwt_secret="k" * 32).require_for(ALL_ROLES)


def test_s3_endpoint_needs_a_bucket() -> None:
    with pytest.raises(ConfigError, match="ANALYTICS_S3_BUCKET"):
        Settings(s3_endpoint_url="http://127.0.0.1:9000").require_for(ALL_ROLES)
