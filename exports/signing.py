"""Signed download links for exports kept in a local folder (no S3): HMAC-SHA256 over the key and the expiry.

A link is ``/exports/download/{key}?expires={unix seconds}&sig={signature}``; the gateway serves the file only
when :func:`verify` accepts the three against its secret and the current time. The signature covers the exact
key and expiry, so changing either (another file, a later expiry) invalidates it; comparison is constant-time.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac

MIN_SECRET_BYTES = 32
_MAX_EXPIRES_DIGITS = 12  # unix seconds until the year 33658: refuse longer input before int() parses it


def check_secret(secret: str | bytes) -> bytes:
    """The secret as bytes; :class:`ValueError` if it is shorter than 32 bytes."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    if len(raw) < MIN_SECRET_BYTES:
        raise ValueError(f"the export link secret must have at least {MIN_SECRET_BYTES} bytes")
    return raw


def _mac(key: str, expires: int, secret: str | bytes) -> str:
    message = f"export-download\n{key}\n{expires}".encode("utf-8", "surrogatepass")
    digest = hmac.new(check_secret(secret), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def expires_param(expires_at: dt.datetime) -> int:
    """The ``expires`` query value: whole unix seconds, rounded up so a link never ends early."""
    if expires_at.tzinfo is None:
        raise ValueError("expires_at must be timezone-aware")
    seconds = expires_at.timestamp()
    return int(seconds) + (0 if seconds == int(seconds) else 1)


def sign(key: str, expires_at: dt.datetime, secret: str | bytes) -> str:
    """The signature of a link to ``key`` valid until ``expires_at`` (43 URL-safe characters)."""
    return _mac(key, expires_param(expires_at), secret)


def verify(key: str, expires: str | int, sig: str, secret: str | bytes, now: dt.datetime) -> bool:
    """True only for an unexpired link whose signature matches ``key`` and ``expires`` exactly.

    ``expires`` and ``sig`` come from the query string as they are: anything malformed is simply refused.
    """
    if isinstance(expires, str):
        if not (expires.isascii() and expires.isdigit() and len(expires) <= _MAX_EXPIRES_DIGITS):
            return False
        expires = int(expires)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if now.timestamp() >= expires or not sig.isascii():
        return False
    return hmac.compare_digest(_mac(key, expires, secret).encode("ascii"), sig.encode("ascii"))
