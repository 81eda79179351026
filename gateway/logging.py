"""Structured JSON logs (structlog), with secrets redacted as a safety net."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_SECRET_KEY = re.compile(r"pass(word)?|secret|token|authorization|api[_-]?key|credential", re.I)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):[^@/\s]+@", re.I)
# A secret-looking query parameter, e.g. a token a client put in the WebSocket URL (uvicorn logs the path with
# its query string when it accepts a WebSocket): its value goes, its name stays so the log still says what came.
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;](?:[a-z0-9_.-]*(?:token|secret|password|authorization|api[_-]?key|jwt|signature|sig)[a-z0-9_.-]*)=)"
    r"[^&;#\s\"']*",
    re.I,
)
# A JWT wherever it appears (a path, a message, an exception's text): three base64url parts, the first two JSON
# objects ("eyJ" is base64 of '{"').
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?P<scheme>\bbearer\s+)[^\s\"',]+", re.I)


def redact_text(text: str) -> str:
    """``text`` without passwords in URLs, secret query parameters, bearer tokens or JWTs."""
    text = _URL_PASSWORD.sub(r"\g<scheme>\g<user>:[redacted]@", text)
    text = _SECRET_PARAM.sub(r"\g<name>[redacted]", text)
    text = _BEARER.sub(r"\g<scheme>[redacted]", text)
    return _JWT.sub("[redacted-jwt]", text)


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Blank values under secret-looking keys, and secrets inside any text (:func:`redact_text`)."""
    for key, value in list(event.items()):
        if _SECRET_KEY.search(key):
            event[key] = "[redacted]"
        elif isinstance(value, str):
            event[key] = redact_text(value)
    return event


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def json_handler(stream: TextIO) -> logging.Handler:
    """A handler writing the standard library's records (uvicorn's, alembic's, ours via logging) as JSON lines.

    ``format_exc_info`` renders a record's ``exc_info`` as its traceback text (without it the JSON held the
    repr of the exception tuple, so unhandled exceptions were logged with no traceback); ``redact`` runs last,
    so the traceback text is redacted too."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=[*_shared_processors(), structlog.stdlib.add_logger_name],
        )
    )
    return handler


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for our logs and the libraries' (uvicorn, alembic)."""
    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.processors.format_exc_info,
            redact,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers[:] = [json_handler(sys.stderr)]
    root.setLevel(level.upper())
    # uvicorn's own access log is replaced by the request-id middleware's line.
    logging.getLogger("uvicorn.access").disabled = True
