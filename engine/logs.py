"""Log lines a pipeline can use: one JSON object per line, with who logged it and for what.

Every line carries `timestamp`, `level`, `role` (api, supervisor, worker, scheduler, sandbox,
dev), `pid`, `logger` and `message`; a line logged while the API serves a request carries its
`request_id`, and one logged inside a job its `job_id` and `user_id`. Those come from context
variables that the API middleware and the job actors set: asyncio copies them into every task
a request or a job starts, so a read-through started by a request logs with its id.
`LOG_FORMAT=text` gives the same fields as one readable line (the default of `prefetch dev`).

The formatter is python-json-logger's (with orjson, already a dependency); everything else is
the standard logging module, so every `logging.getLogger(__name__)` of the code base and of
its libraries goes through it unchanged. One shortcut: a record that names its own extra
fields (`fields`, as the access line does, once per request) is formatted from those, in the
same shape, without the formatter's search through every attribute of the record.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final, TextIO
from urllib.parse import urlsplit, urlunsplit

import orjson
from pythonjsonlogger.orjson import OrjsonFormatter

REQUEST_ID: Final = contextvars.ContextVar[str | None]("request_id", default=None)
JOB_ID: Final = contextvars.ContextVar[str | None]("job_id", default=None)
USER_ID: Final = contextvars.ContextVar[str | None]("user_id", default=None)

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(role)s[%(process)d] %(name)s: %(message)s"
_CONTEXT: Final = (("request_id", REQUEST_ID), ("job_id", JOB_ID), ("user_id", USER_ID))

_role = "prefetch"


def set_role(role: str) -> None:
    """Name the role this process logs as (a forked child calls it with its own)."""
    global _role
    _role = role


def role() -> str:
    """The role this process logs as."""
    return _role


class ContextFilter(logging.Filter):
    """Puts the role and the request or job context on every record the handler emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        for name, var in _CONTEXT:
            value = var.get()
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True


class JsonFormatter(OrjsonFormatter):
    """One JSON object per line: timestamp, level, role, pid, logger, message, then extras."""

    def __init__(self) -> None:
        super().__init__([], timestamp=True)

    def format(self, record: logging.LogRecord) -> str:
        """The line; an access line (fields known in advance) without the generic walk."""
        fields: tuple[str, ...] | None = getattr(record, "fields", None)
        if fields is None or record.exc_info:
            return super().format(record)
        # One per API request: python-json-logger's merge visits every attribute of the
        # record to find the extras; here they are named. Same keys, same order.
        data: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, tz=UTC),
            "level": record.levelname,
            "role": getattr(record, "role", _role),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in fields:
            data[name] = getattr(record, name, None)
        return orjson.dumps(data, default=str).decode()

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        """The fixed fields first, in a fixed order, then the record's extras."""
        log_data["timestamp"] = None  # keeps the first place; the base class fills it in
        log_data["level"] = record.levelname
        log_data["role"] = getattr(record, "role", _role)
        log_data["pid"] = record.process
        log_data["logger"] = record.name
        log_data["message"] = record.message
        super().add_fields(log_data, record, message_dict)


class TextFormatter(logging.Formatter):
    """The readable form: the fixed fields, then the context as `key=value`."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{name}={getattr(record, name)}" for name, _ in _CONTEXT if hasattr(record, name)
        ]
        if not extras:
            return line
        head, sep, rest = line.partition("\n")  # a traceback stays below the first line
        return f"{head} [{' '.join(extras)}]{sep}{rest}"


def make_handler(fmt: str, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing lines in `fmt` (json|text), with the context, to stderr or `stream`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    return handler


def configure(level: str, fmt: str, role_name: str, stream: TextIO | None = None) -> None:
    """Send every logger's lines to stderr (or `stream`) in `fmt` (json|text) at `level`."""
    set_role(role_name)
    handler = make_handler(fmt, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)


def redact_url(url: str) -> str:
    """`url` with its password replaced by `***` (the user name stays: it says which ACL user)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
