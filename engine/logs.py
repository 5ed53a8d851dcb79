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

The access line (one per API request) skips the logging machinery altogether: `emit_fields`
hands its fields to the service's own handler (`LineHandler`), which formats the same line
(same keys, same order, same text) without a LogRecord, the handler lock, the filter or a
write per line, and buffers it: the buffer is written in one call at most FLUSH_S later (by
the event loop), when it holds BUFFER_LINES lines, before any line logged the ordinary way
(so lines keep their order), and when logging shuts down. Any other handler on the way
(pytest's, a library's) gets an ordinary record. The figures are in tuning.md, "Cached
reads".
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import sys
import time
from collections.abc import Iterable
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

# A buffered line waits at most this long for its write, and the buffer at most this many.
FLUSH_S: Final = 0.05
BUFFER_LINES: Final = 256

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
        # python-json-logger's merge visits every attribute of the record to find the
        # extras; here they are named. Same keys, same order.
        return json_line(
            record.created,
            record.levelname,
            getattr(record, "role", _role),
            record.process,
            record.name,
            record.getMessage(),
            ((name, getattr(record, name, None)) for name in fields),
        )

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


def json_line(
    created: float,
    level: str,
    role_name: str,
    pid: int | None,
    logger: str,
    message: str,
    fields: Iterable[tuple[str, Any]],
) -> str:
    """A JSON line of named fields: the fixed ones, then `fields` in their order."""
    data: dict[str, Any] = {
        "timestamp": datetime.fromtimestamp(created, tz=UTC),
        "level": level,
        "role": role_name,
        "pid": pid,
        "logger": logger,
        "message": message,
    }
    for name, value in fields:
        data[name] = value
    return orjson.dumps(data, default=str).decode()


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


class _Stamp:
    """What TextFormatter.formatTime reads of a record (its `created` and `msecs`)."""

    __slots__ = ("created", "msecs")

    def __init__(self, created: float) -> None:
        self.created = created
        self.msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes it


class LineHandler(logging.StreamHandler[TextIO]):
    """The service's handler: ordinary records as a StreamHandler writes them, and lines of
    named fields (`write_fields`) formatted without a record and written in batches."""

    def __init__(self, fmt: str, stream: TextIO | None = None) -> None:
        super().__init__(stream or sys.stderr)
        self.json = fmt == "json"
        self.setFormatter(JsonFormatter() if self.json else TextFormatter())
        self.addFilter(ContextFilter())
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    @property
    def fast(self) -> bool:
        """Whether `write_fields` writes what `handle` would: only the service's own filter."""
        return len(self.filters) == 1 and isinstance(self.filters[0], ContextFilter)

    def write_fields(
        self,
        level: int,
        logger: str,
        message: str,
        fields: dict[str, Any],
        created: float | None = None,
    ) -> None:
        """Buffer the line a record of `message` with `fields` as extras would make.

        For the event loop's thread (the API's); `created` defaults to now.
        """
        if created is None:
            created = time.time()
        level_name = logging.getLevelName(level)
        if self.json:
            line = json_line(created, level_name, _role, _pid, logger, message, fields.items())
        else:
            assert self.formatter is not None
            head = (
                f"{self.formatter.formatTime(_Stamp(created))} {level_name} {_role}[{_pid}] "  # type: ignore[arg-type]
                f"{logger}: {message}"
            )
            extras = []
            for name, var in _CONTEXT:  # what ContextFilter and TextFormatter would add
                value = fields[name] if name in fields else var.get()
                if name in fields or value is not None:
                    extras.append(f"{name}={value}")
            line = f"{head} [{' '.join(extras)}]" if extras else head
        pending = self._pending
        pending.append(line)
        if len(pending) >= BUFFER_LINES:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop to flush later: now
            self.flush()
            return
        # (A timer of a loop that has since stopped would never fire: one per loop.)
        if self._timer is None or self._timer_loop is not loop:
            self._timer = loop.call_later(FLUSH_S, self._flush_due)
            self._timer_loop = loop

    def _flush_due(self) -> None:
        self._timer = None
        self.flush()

    def _write_pending(self) -> None:
        lines, self._pending = self._pending, []
        if lines:
            lines.append("")
            self.stream.write(self.terminator.join(lines))

    def emit(self, record: logging.LogRecord) -> None:
        """A record's line, after the buffered ones (lines stay in order)."""
        if self._pending:
            self._write_pending()  # under the handler's lock: Handler.handle holds it
        super().emit(record)

    def close(self) -> None:
        """Write what is buffered, then close as a StreamHandler does."""
        self.flush()
        super().close()

    def flush(self) -> None:
        """Write the buffered lines, then flush the stream."""
        with self.lock:  # type: ignore[union-attr]
            timer, loop = self._timer, self._timer_loop
            if timer is not None and loop is not None and not loop.is_closed():
                timer.cancel()
            self._timer = self._timer_loop = None
            try:
                self._write_pending()
            except Exception:  # as emit does: a broken stream must not break the caller
                self.handleError(logging.makeLogRecord({"msg": "buffered lines"}))
            super().flush()


_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def emit_fields(logger: logging.Logger, level: int, message: str, fields: dict[str, Any]) -> None:
    """Log `message` with `fields` as its extras (in their order) on `logger`, as
    `logger.log(level, message, extra=...)` would, with a fast way through LineHandlers.

    The caller has checked `logger.isEnabledFor(level)`. Each handler on the logger's way up
    gets the line: a LineHandler without a record, any other through an ordinary record.
    """
    if logger.filters:  # a logger filter sees records: let logging do it all
        logger.log(level, message, extra={"fields": tuple(fields), **fields})
        return
    record: logging.LogRecord | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if level < handler.level:
                continue
            if isinstance(handler, LineHandler) and handler.fast:
                handler.write_fields(level, logger.name, message, fields)
                continue
            if record is None:
                extra = {"fields": tuple(fields), **fields}
                record = logger.makeRecord(
                    logger.name, level, "", 0, message, (), None, extra=extra
                )
            handler.handle(record)
        current = current.parent if current.propagate else None


def make_handler(fmt: str, stream: TextIO | None = None) -> LineHandler:
    """A handler writing lines in `fmt` (json|text), with the context, to stderr or `stream`."""
    return LineHandler(fmt, stream)


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
