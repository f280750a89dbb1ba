"""Structured logging: one JSON object (or one text line) per record, with the request id.

The request id lives in a context variable set by the gRPC interceptor and the HTTP
middleware, so every log line written while serving a call carries it without passing it
around. ``extra={...}`` fields are emitted as fields.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import aiohttp.log
import orjson
from aiohttp.http_exceptions import HttpProcessingError

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
# A caller's request id is written into every log line of its request: nothing that could
# end the line's field early or pass for another line (spaces, brackets, quotes, newlines).
_CALLER_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def is_request_id(value: str) -> bool:
    """Whether a caller's request id (``x-request-id``) may be used as given."""
    return _CALLER_REQUEST_ID.fullmatch(value) is not None


# Attributes every LogRecord has; anything else came through ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            data["request_id"] = request_id
        data.update(_extras(record))
        exc = _exception_text(self, record)
        if exc:
            data["exc"] = exc
        return orjson.dumps(data, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S.%f")[:-3]
        request_id = request_id_var.get()
        parts = [ts, f"{record.levelname:<7}", record.name, record.getMessage()]
        if request_id:
            parts.insert(3, f"[{request_id}]")
        extras = _extras(record)
        if extras:
            parts.append(" ".join(f"{k}={v}" for k, v in extras.items()))
        line = " ".join(parts)
        exc = _exception_text(self, record)
        if exc:
            line += "\n" + exc
        return line


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    # exc_text first: RedactRequestTargets leaves the redacted traceback there.
    if record.exc_text:
        return record.exc_text
    return formatter.formatException(record.exc_info) if record.exc_info else ""


# From a "?" to the next whitespace or quote: a query string, in a URL or a quoted request
# line ("bytearray(b'/oauth/instagram/callback?code=...')").
_QUERY_STRING = re.compile(r"\?[^\s'\"]+")


def redact_query_strings(text: str) -> str:
    return _QUERY_STRING.sub("?<redacted>", text)


class RedactRequestTargets(logging.Filter):
    """Keeps query strings (OAuth codes and states) and request lines out of aiohttp's lines.

    aiohttp's server logs a request it cannot parse at ERROR with the parser's exception,
    whose message quotes the start of the offending line: the request target of an
    over-long URL, or a header (a bearer token) of an over-long or invalid one. Those
    exceptions lose their traceback here and keep their type (``error``); the client's
    address stays in the message. Any other exception text, and the message itself, lose
    their query strings.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_query_strings(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.exc_info, record.exc_text = None, None
            record.__dict__["error"] = type(exc).__name__
        elif record.exc_info:
            record.exc_text = redact_query_strings(_PLAIN.formatException(record.exc_info))
        return True


_PLAIN = logging.Formatter()
_REDACT = RedactRequestTargets()


def _aiohttp_loggers() -> list[logging.Logger]:
    """Every logger aiohttp writes to (all of them are declared in ``aiohttp.log``)."""
    return [v for v in vars(aiohttp.log).values() if isinstance(v, logging.Logger)]


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter at info level would drown the gateway's own lines.
    for noisy in ("aiohttp.access", "asyncio", "grpc._cython"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # The SQL drivers' debug lines carry each statement with its parameters (aiosqlite logs
    # every call with its arguments): customers' message texts, which are personal data.
    # SWITCHBOARD_LOG_LEVEL=debug is for the gateway's own lines, so these stay quiet
    # whatever it says. psycopg sets WARNING on import; set it here as well so
    # that the order of imports does not matter.
    for sql, floor in (("aiosqlite", logging.INFO), ("psycopg", logging.WARNING)):
        logging.getLogger(sql).setLevel(max(floor, root.level))
    # README: query strings are never logged. Filters on the loggers themselves, so that
    # every handler (and either format) gets the redacted record.
    for library in _aiohttp_loggers():
        library.addFilter(_REDACT)
