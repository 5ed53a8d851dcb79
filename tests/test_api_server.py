"""api.server: the aiohttp internals it relies on, connection limits and slow clients.

api.server subclasses aiohttp's connection protocol and server, which aiohttp does not
document as extension points. The first tests pin down every assumption it makes, so that
an aiohttp upgrade fails here, loudly, rather than quietly losing the envelope or a limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import resource
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from api.server import FD_RESERVE, EnvelopeHandler, EnvelopeServer, connection_cap, make_runner
from engine.settings import Settings
from tests.conftest import eventually, new_user, serve_api
from tests.contract import check_raw_answer
from tests.redis_support import free_port

pytestmark = pytest.mark.timeout(90)

PINNED_MINOR = "3.14"


def test_aiohttp_is_the_minor_version_api_server_was_written_for() -> None:
    assert aiohttp.__version__.rsplit(".", 1)[0] == PINNED_MINOR, (
        f"aiohttp {aiohttp.__version__}: re-check api/server.py against its web_protocol.py "
        "and web_runner.py, then move the pin in pyproject.toml and here"
    )
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert f'"aiohttp>={PINNED_MINOR},<' in pyproject


def test_the_request_handler_internals_api_server_uses() -> None:
    slots = set(RequestHandler.__slots__)
    for name in ("_waiter", "_request_in_progress", "_request_count", "_keepalive"):
        assert name in slots, name
    assert list(inspect.signature(RequestHandler.handle_error).parameters) == [
        "self",
        "request",
        "status",
        "exc",
        "message",
    ]
    assert list(inspect.signature(RequestHandler.log_access).parameters) == [
        "self",
        "request",
        "response",
        "time",
    ]
    # log_access is where a written response's body is let go: aiohttp must call it after
    # the write, on the normal path and when the client went away.
    finish = inspect.getsource(RequestHandler.finish_response)
    assert finish.index("await resp.write_eof()") < finish.rindex("self.log_access(")
    init = inspect.signature(RequestHandler.__init__).parameters
    assert {"manager", "loop", "keepalive_timeout", "auto_decompress"} <= set(init)
    assert "_read_bytes" in BaseRequest.__slots__ or hasattr(BaseRequest, "_read_bytes")
    # The parser's errors reach handle_error through _make_error_handler.
    assert "handle_error" in inspect.getsource(RequestHandler._make_error_handler)


async def test_the_server_and_runner_internals_api_server_uses(settings: Settings) -> None:
    assert inspect.iscoroutinefunction(web.AppRunner._make_server)
    server = web.Server(lambda request: None, keepalive_timeout=5)  # type: ignore[arg-type,return-value]
    for name in ("request_handler", "request_factory", "handler_cancellation", "_loop"):
        assert hasattr(server, name), name
    assert server._kwargs == {"keepalive_timeout": 5}
    app = web.Application()
    runner = make_runner(app, settings)
    await runner.setup()
    try:
        made = runner.server
        assert isinstance(made, EnvelopeServer)
        assert isinstance(made(), EnvelopeHandler)
        assert made._kwargs["auto_decompress"] is False
    finally:
        await runner.cleanup()


async def test_a_response_body_is_let_go_once_written(settings: Settings) -> None:
    sent: list[web.Response] = []

    async def handler(request: web.Request) -> web.Response:
        response = web.Response(body=b"x" * 50_000)
        sent.append(response)
        return response

    app = web.Application()
    app.router.add_get("/big", handler)
    runner = make_runner(app, settings)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:  # keeps the connection alive
            async with session.get(f"http://127.0.0.1:{port}/big") as response:
                assert len(await response.read()) == 50_000

            async def released() -> bool:
                return sent[0].body is None

            await eventually(released)
    finally:
        await runner.cleanup()


def test_the_connection_cap_leaves_room_for_everything_else() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert connection_cap(4096) == 1024 - FD_RESERVE
        assert connection_cap(100) == 100
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_RESERVE + 4, hard))
        assert connection_cap(4096) == 16  # never below a handful
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.asynccontextmanager
async def slow_clients(url: str, count: int) -> AsyncIterator[list[asyncio.StreamReader]]:
    """`count` connections that each send part of a request head, then one byte at a time;
    yields their readers (at EOF once the server closed the connection)."""
    parts = urlsplit(url)
    readers: list[asyncio.StreamReader] = []
    writers: list[asyncio.StreamWriter] = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        readers.append(reader)
        writers.append(writer)

    async def trickle() -> None:
        while True:
            for writer in writers:
                if not writer.is_closing():
                    writer.write(b"a")
            await asyncio.sleep(0.5)

    task = asyncio.create_task(trickle())
    try:
        yield readers
    finally:
        task.cancel()
        for writer in writers:
            writer.close()


async def probe_live(url: str) -> bytes:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    request = b"GET /health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
    check_raw_answer(request, answer)  # 200 alive or 503 SERVICE_UNAVAILABLE, as documented
    return answer


async def test_at_the_limit_the_oldest_idle_connection_makes_room(settings: Settings) -> None:
    limited = settings.with_overrides(api_max_connections=16, api_header_timeout_ms=60_000)
    async with serve_api(limited) as api, slow_clients(api.url, 40) as readers:
        answer = await probe_live(api.url)
        assert answer.startswith(b"HTTP/1.1 200 ") and b'"alive"' in answer

        async def evicted() -> bool:
            # 40 slow ones and the probe through a limit of 16: the oldest were closed,
            # without an answer (they never finished a request).
            return sum(reader.at_eof() for reader in readers) >= 40 + 1 - 16

        await eventually(evicted, timeout=10)
        assert not any(reader.at_eof() for reader in readers[-15:])  # the newest stay


async def test_at_the_limit_with_every_connection_busy_a_newcomer_gets_503(
    settings: Settings,
) -> None:
    limited = settings.with_overrides(api_max_connections=16, api_body_timeout_ms=30_000)
    async with serve_api(limited) as api:
        parts = urlsplit(api.url)
        busy: list[asyncio.StreamWriter] = []
        try:
            for _ in range(16):  # each a request whose body never finishes: in progress
                _, writer = await asyncio.open_connection(parts.hostname, parts.port)
                writer.write(
                    f"POST /api/prefetch/schedule/{new_user()} HTTP/1.1\r\nHost: t\r\n".encode()
                    + b"Authorization: Bearer sandbox-service\r\nContent-Length: 10\r\n\r\n{"
                )
                busy.append(writer)

            async def refused() -> bool:
                answer = await probe_live(api.url)
                return answer.startswith(b"HTTP/1.1 503 ")

            await eventually(refused, timeout=20)
            answer = await probe_live(api.url)
            assert b'"error":"SERVICE_UNAVAILABLE"' in answer and b"X-Request-Id: " in answer
        finally:
            for writer in busy:
                writer.close()


def _spawn_api(
    tmp_path: Path, redis_url: str, settings: Settings, nofile: int
) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "REDIS_URL": redis_url,
        "PREFETCH_SERVICE_PORT": str(port),
        "PREFETCH_SERVICE_HOST": "127.0.0.1",
        "PREFETCH_METRICS_DIR": str(tmp_path / "metrics"),
        "CA_URL": settings.ca_url,
        "TIMELINE_SERVICE_URL": settings.timeline_url,
        "API_HEADER_TIMEOUT": "60000",  # the deadline is not what saves the probe here
        "LOG_LEVEL": "info",
    }

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    log = (tmp_path / "api.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefetch.cli", "api"],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=limit_files,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}", tmp_path / "api.log"


async def test_live_stays_reachable_while_slow_clients_outnumber_the_file_limit(
    tmp_path: Path, redis_url: str, settings: Settings
) -> None:
    nofile, slow = 512, 800  # 1,024 and 2,000 in the field; the ratio is what matters
    proc, url, log_path = _spawn_api(tmp_path, redis_url, settings, nofile)
    try:

        async def up() -> bool:
            try:
                return (await probe_live(url)).startswith(b"HTTP/1.1 200 ")
            except OSError:
                return False

        await eventually(up, timeout=30, interval=0.1)
        async with slow_clients(url, slow) as readers:
            for _ in range(3):
                answer = await probe_live(url)
                assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            assert sum(not reader.at_eof() for reader in readers) >= 200  # still holding on
    finally:
        proc.terminate()
        proc.wait(30)
    log = log_path.read_text(errors="replace")
    assert "at most 256 connections" in log, log[-2000:]
    limit_lines = [line for line in log.splitlines() if "connection limit (256)" in line]
    assert 1 <= len(limit_lines) <= 3, limit_lines  # logged, and rate-limited
    assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]
