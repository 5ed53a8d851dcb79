"""Log lines a pipeline can use: JSON fields, the request and job context, the access log."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import logs
from engine.errors import ConfigError
from engine.settings import Settings, load_settings, retired_warnings
from tests.conftest import ApiClient, new_user, serve_api
from tests.engine_support import Engine, clean_env, log_records, spawn, user, wait_for

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Captured:
    """The JSON lines the process's root handler would write, as dicts."""

    def __init__(self, stream: io.StringIO, handler: logging.Handler) -> None:
        self._stream = stream
        self._handler = handler

    def records(self) -> list[dict[str, Any]]:
        self._handler.flush()  # access lines are buffered for up to logs.FLUSH_S
        return [json.loads(line) for line in self._stream.getvalue().splitlines()]

    def access(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["logger"] == "access"]


@pytest.fixture
def captured() -> Iterator[Captured]:
    """The service's JSON handler on the root logger, beside pytest's own, for one test."""
    stream = io.StringIO()
    handler = logs.make_handler("json", stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logs.set_role("api")
    try:
        yield Captured(stream, handler)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        logs.set_role("prefetch")


# --- the formatter -------------------------------------------------------------------------


def test_a_json_line_has_the_fixed_fields_first_then_the_context() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("tests.logs.json")
    logger.addHandler(logs.make_handler("json", stream))
    logger.propagate = False
    logs.set_role("worker")
    request, job = logs.REQUEST_ID.set("req-1"), logs.JOB_ID.set("prefetch:u:1")
    try:
        logger.warning("stored %d of %s", 3, "them", extra={"tier": "hot"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logs.REQUEST_ID.reset(request)
        logs.JOB_ID.reset(job)
        logs.set_role("prefetch")
        logger.handlers.clear()
        logger.propagate = True
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert list(first)[:6] == ["timestamp", "level", "role", "pid", "logger", "message"]
    assert first["level"] == "WARNING" and first["role"] == "worker"
    assert first["logger"] == "tests.logs.json" and first["message"] == "stored 3 of them"
    assert first["tier"] == "hot"
    assert first["request_id"] == "req-1" and first["job_id"] == "prefetch:u:1"
    assert "user_id" not in first  # not set: not invented
    assert first["timestamp"].endswith("+00:00")
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc_info"]


def test_the_text_format_keeps_the_context_on_the_first_line() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("tests.logs.text")
    logger.addHandler(logs.make_handler("text", stream))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    token = logs.USER_ID.set("u-1")
    try:
        logger.info("hello")
    finally:
        logs.USER_ID.reset(token)
        logger.handlers.clear()
        logger.propagate = True
    line = stream.getvalue().strip()
    assert " INFO " in line and "tests.logs.text: hello [user_id=u-1]" in line


ACCESS_FIELDS = {
    "method": "GET",
    "route": "/api/cache/{userId}",
    "path": "/api/cache/550e8400-e29b-41d4-a716-446655440000",
    "status": 200,
    "duration_ms": 0.412,
    "bytes": 9304,
    "remote": "127.0.0.1",
    "request_id": "5f0c2a9e1b3d4c7a",
}


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_an_access_line_written_without_a_record_is_the_records_line(fmt: str) -> None:
    """The fast path (LineHandler.write_fields) writes, byte for byte, the line that the
    logging module would make of a record with the same fields as extras."""
    stream = io.StringIO()
    handler = logs.make_handler(fmt, stream)
    logger = logging.getLogger("access")
    message = "GET /api/cache/550e8400-e29b-41d4-a716-446655440000 200"
    extra = {"fields": tuple(ACCESS_FIELDS), **ACCESS_FIELDS}
    record = logger.makeRecord("access", logging.INFO, "", 0, message, (), None, extra=extra)
    logs.set_role("api")
    try:
        handler.handle(record)  # the ordinary way: filter, format, write
        handler.write_fields(logging.INFO, "access", message, ACCESS_FIELDS, record.created)
        handler.flush()
    finally:
        logs.set_role("prefetch")
    ordinary, fast = stream.getvalue().splitlines()
    assert fast == ordinary
    if fmt == "json":
        line = json.loads(fast)
        assert list(line) == [
            "timestamp",
            "level",
            "role",
            "pid",
            "logger",
            "message",
            *ACCESS_FIELDS,
        ]
        assert line["role"] == "api" and line["pid"] == os.getpid()
    else:
        assert fast.endswith(f"access: {message} [request_id=5f0c2a9e1b3d4c7a]")


async def test_access_lines_are_batched_in_order_and_flushed_soon() -> None:
    """Fast lines wait for one write at most FLUSH_S; an ordinary record (or a flush) writes
    them first, so the stream keeps the order in which lines were logged."""
    stream = io.StringIO()
    handler = logs.make_handler("json", stream)
    logger = logging.getLogger("tests.logs.batched")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        for n in range(3):
            logs.emit_fields(logger, logging.INFO, f"line {n}", {"n": n})
        assert stream.getvalue() == ""  # buffered
        logger.warning("ordinary")
        logs.emit_fields(logger, logging.INFO, "line 3", {"n": 3})
        await wait_for(lambda: "line 3" in stream.getvalue(), 5, "the buffered line written")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == [
        "line 0",
        "line 1",
        "line 2",
        "ordinary",
        "line 3",
    ]
    assert lines[0]["n"] == 0 and lines[0]["logger"] == "tests.logs.batched"


def test_a_handler_that_outlives_its_event_loop_still_writes_its_lines() -> None:
    """A line buffered when a loop stops is written with the next loop's first flush."""
    stream = io.StringIO()
    handler = logs.make_handler("json", stream)
    logger = logging.getLogger("tests.logs.loops")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    async def log_in_a_loop(n: int, wait: bool) -> None:
        logs.emit_fields(logger, logging.INFO, f"line {n}", {"n": n})
        if wait:
            await wait_for(lambda: f"line {n}" in stream.getvalue(), 5, "the line written")

    try:
        asyncio.run(log_in_a_loop(0, wait=False))  # its flush timer dies with the loop
        asyncio.run(log_in_a_loop(1, wait=True))
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    assert [json.loads(line)["n"] for line in stream.getvalue().splitlines()] == [0, 1]


def test_other_handlers_get_an_ordinary_record_and_levels_hold(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = io.StringIO()
    handler = logs.make_handler("json", stream)
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("tests.logs.mixed")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with caplog.at_level(logging.INFO, logger="tests.logs.mixed"):
            logs.emit_fields(logger, logging.INFO, "GET / 200", {"status": 200})
        handler.flush()
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == ""  # below the handler's level
    (record,) = [r for r in caplog.records if r.name == "tests.logs.mixed"]
    assert record.getMessage() == "GET / 200" and record.status == 200  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://app:p%40ss@cache:6379/2", "redis://app:***@cache:6379/2"),
        ("rediss://:secret@[::1]:6380?ssl=1", "rediss://:***@[::1]:6380?ssl=1"),
        ("redis://cache:6379", "redis://cache:6379"),
        ("unix:///run/redis.sock?db=3", "unix:///run/redis.sock?db=3"),
    ],
)
def test_a_redis_url_is_logged_without_its_password(url: str, shown: str) -> None:
    assert logs.redact_url(url) == shown


# --- the settings ------------------------------------------------------------------------------


def test_log_format_and_access_log_settings() -> None:
    assert load_settings({}).log_format == ""  # the role decides: json, text for dev
    assert load_settings({"LOG_FORMAT": "Text"}).log_format == "text"
    assert load_settings({}).access_log_sample == 1.0
    assert load_settings({"ACCESS_LOG": "off"}).access_log_sample == 0.0
    assert load_settings({"ACCESS_LOG": "sample:0.05"}).access_log_sample == 0.05
    for name, bad in [
        ("LOG_FORMAT", "xml"),
        ("ACCESS_LOG", "sample:0"),
        ("ACCESS_LOG", "sample:1.5"),
        ("ACCESS_LOG", "sample:nan"),
        ("ACCESS_LOG", "sometimes"),
        ("OTEL_TRACES_EXPORTER", "jaeger"),
    ]:
        with pytest.raises(ConfigError, match=name):
            load_settings({name: bad})


def test_log_dir_is_retired_with_a_warning_not_an_error() -> None:
    assert not hasattr(Settings(), "log_dir")
    load_settings({"LOG_DIR": "./logs"})  # still starts
    (warning,) = retired_warnings({"LOG_DIR": "./logs"})
    assert "LOG_DIR is ignored" in warning and "stderr" in warning
    assert retired_warnings({}) == []


# --- the API: request ids and the access log ------------------------------------------------------


async def test_every_line_of_a_request_carries_its_id(
    settings: Settings, captured: Captured
) -> None:
    async with serve_api(settings) as api:
        # The timeline answers 503: a read-through fails with 502, logged as a warning.
        failing = new_user("0000fa11-")
        reply = await api.call("GET", f"/api/cache/{failing}", headers={"X-Request-Id": "rid-7"})
    assert reply.status == 502
    lines = [r for r in captured.records() if r.get("request_id") == "rid-7"]
    warning = next(r for r in lines if r["level"] == "WARNING")
    assert "PREFETCH_FAILED" in warning["message"] and warning["role"] == "api"
    (access,) = [r for r in lines if r["logger"] == "access"]
    assert access["status"] == 502
    # No line outside a request carries one.
    assert all(r.get("request_id") in (None, "rid-7") for r in captured.records())


async def test_an_access_line_per_request_with_route_status_duration_and_bytes(
    api: ApiClient, captured: Captured
) -> None:
    reader = new_user()
    first = await api.call("GET", f"/api/cache/{reader}")  # read-through
    second = await api.call("GET", f"/api/cache/{reader}")  # a warm hit
    missing = await api.call("GET", "/nowhere")
    assert (first.status, second.status, missing.status) == (200, 200, 404)
    lines = captured.access()
    assert len(lines) == 3
    read, hit, unmatched = lines
    for line, reply in zip(lines, (first, second, missing), strict=True):
        assert line["request_id"] == reply.headers["X-Request-Id"]
        assert line["method"] == "GET" and line["level"] == "INFO"
        assert line["bytes"] == int(reply.headers["Content-Length"])  # gzip on the wire
        assert line["duration_ms"] > 0
        assert line["remote"] == "127.0.0.1"
    assert list(read)[:6] == ["timestamp", "level", "role", "pid", "logger", "message"]
    assert read["role"] == "api" and read["timestamp"].endswith("+00:00")
    assert read["route"] == hit["route"] == "/api/cache/{userId}"
    assert read["path"] == f"/api/cache/{reader}" and read["status"] == 200
    assert read["message"] == f"GET /api/cache/{reader} 200"
    assert unmatched["route"] == "unmatched" and unmatched["status"] == 404


async def test_malformed_http_gets_an_access_line_too(api: ApiClient, captured: Captured) -> None:
    from tests.test_api_hostile import MALFORMED, send_raw

    reply = await send_raw(api.url, MALFORMED["unknown-method"])
    assert reply.status == 400
    (line,) = captured.access()
    assert line["status"] == 400 and line["route"] == "-"
    assert line["request_id"] == reply.headers["x-request-id"]


async def test_access_log_off_keeps_the_metrics(settings: Settings, captured: Captured) -> None:
    async with serve_api(settings.with_overrides(access_log_sample=0.0)) as api:
        for _ in range(3):
            assert (await api.call("GET", "/health/live")).status == 200
        text = (await api.call("GET", "/metrics")).raw.decode()
    assert captured.access() == []
    assert 'prefetch_http_requests_total{method="GET",route="/health/live",status="200"}' in text


async def test_a_sampled_access_log_keeps_a_share_and_every_5xx(
    settings: Settings, captured: Captured
) -> None:
    async with serve_api(settings.with_overrides(access_log_sample=0.25)) as api:
        for _ in range(200):
            assert (await api.call("GET", "/health/live")).status == 200
        failing = new_user("0000fa11-")
        for _ in range(5):
            assert (await api.call("GET", f"/api/cache/{failing}")).status == 502
    lines = captured.access()
    kept = [line for line in lines if line["route"] == "/health/live"]
    # 200 draws at 0.25: 50 expected; outside 15..90 by chance with p < 1e-9.
    assert 15 <= len(kept) <= 90
    assert len([line for line in lines if line["status"] == 502]) == 5


# --- processes: the role, the start line, the job context ---------------------------------


async def test_workers_log_json_with_their_role_and_the_job_context(
    tmp_path: Path, redis_url: str
) -> None:
    async with Engine.open(tmp_path, redis_url) as engine:
        supervisor = await engine.start_worker(PREFETCH_WORKER_COUNT="1")
        missing = user("0000dead-")  # the timeline has no such user: the job fails at once
        scheduled = await engine.jobs.schedule(missing, "high")

        def failure_line() -> dict[str, Any] | None:
            for record in log_records(supervisor.log()):
                if "Failed to process message" in record["message"]:
                    return record
            return None

        record = await wait_for(failure_line, 20, "the job's failure to be logged")
        assert record["role"] == "worker" and record["level"] == "INFO"
        assert record["job_id"] == scheduled.jobId and record["user_id"] == missing
        records = log_records(supervisor.log())
        start = next(r for r in records if r["message"].startswith("starting worker"))
        assert start["role"] == "supervisor"
        assert start["config"]["redis"] == redis_url and start["config"]["workers"] == 1
        assert {r["role"] for r in records} >= {"supervisor", "worker"}
        # The supervisor runs no job: none of its lines has a job's context.
        assert not [r for r in records if r["role"] == "supervisor" and "job_id" in r]


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_a_role_starts_with_one_line_saying_what_it_uses(tmp_path: Path, fmt: str) -> None:
    env = clean_env(
        TIMELINE_SERVICE_URL=f"http://127.0.0.1:{free_port()}",
        CA_URL=f"http://127.0.0.1:{free_port()}",
        LOG_FORMAT=fmt,
        LOG_DIR="./logs",  # retired: a warning, not a failure
        PREFETCH_METRICS_DIR=str(tmp_path / "metrics"),
    )
    sandbox = spawn("sandbox", env, tmp_path / "sandbox.log")

    def started() -> str | None:
        text = sandbox.log()
        return text if "starting sandbox" in text else None

    try:
        text = await wait_for(started, 20, "the sandbox's start line")
    finally:
        sandbox.kill()
    lines = text.splitlines()
    if fmt == "json":
        warning, start = (json.loads(line) for line in lines[:2])
        assert warning["level"] == "WARNING" and "LOG_DIR is ignored" in warning["message"]
        assert start["role"] == "sandbox" and start["logger"] == "prefetch"
        assert start["config"]["timeline"] == env["TIMELINE_SERVICE_URL"]
    else:
        assert " WARNING sandbox[" in lines[0] and "LOG_DIR is ignored" in lines[0]
        assert " INFO sandbox[" in lines[1] and "prefetch: starting sandbox" in lines[1]
