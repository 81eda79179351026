from __future__ import annotations

from gateway.logging import redact


def test_redacts_secret_keys_and_url_passwords() -> None:
    event = redact(
        None,
        "info",
        {
            "event": "x",
            "jwt_secret": "abc",
            "Authorization": "Bearer t",
            "url": "amqp://guest:guestpw@127.0.0.1:5672/",
            "plain": "postgresql://postgres@127.0.0.1/db",
        },
    )
    assert event["jwt_secret"] == "[redacted]" and event["Authorization"] == "[redacted]"
    assert event["url"] == "amqp://guest:[redacted]@127.0.0.1:5672/"
    assert event["plain"] == "postgresql://postgres@127.0.0.1/db"
