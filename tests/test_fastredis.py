"""Tests of engine.store.fastredis against a real Redis (REDIS_URL or an embedded Valkey).

Everything runs in db 15, flushed before each test. Tests that need a misbehaving server
(refused, silent, unix socket) start their own in-process fakes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
import pytest_asyncio
import uvloop

from engine.errors import ConfigError, PrefetchError, RedisReplyError, RedisUnavailable
from engine.store.fastredis import FastRedis, RedisAddress, Script

pytestmark = pytest.mark.asyncio

REDIS_URL = ""  # the session's Redis, set by _use_session_redis before every test
TEST_DB = 15


@pytest.fixture(autouse=True)
def _use_session_redis(redis_url: str) -> None:
    global REDIS_URL
    REDIS_URL = redis_url


def _url(db: int = TEST_DB, *, user: str | None = None, password: str | None = None) -> str:
    """REDIS_URL pointed at `db`, with credentials replaced if given."""
    parts = urlsplit(REDIS_URL)
    netloc = parts.netloc
    if password is not None:
        where = netloc.rpartition("@")[2]
        netloc = f"{quote(user or '', safe='')}:{quote(password, safe='')}@{where}"
    if parts.scheme == "unix":
        return urlunsplit(parts._replace(netloc=netloc, query=f"db={db}"))
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{db}", query=""))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _connect(timeout: float | None = 5.0) -> FastRedis:
    return await FastRedis.connect(_url(), timeout=timeout)


@pytest_asyncio.fixture
async def client() -> AsyncIterator[FastRedis]:
    redis = await _connect()
    await redis.execute("FLUSHDB")
    yield redis
    await redis.close()


@pytest_asyncio.fixture
async def admin() -> AsyncIterator[FastRedis]:
    redis = await _connect()
    yield redis
    await redis.close()


async def _elapsed(awaitable: Awaitable[object]) -> tuple[BaseException | None, float]:
    """Await with a hard cap of 5 s; return (exception raised or None, seconds taken)."""
    start = time.perf_counter()
    try:
        await asyncio.wait_for(awaitable, 5.0)
    except (PrefetchError, OSError) as exc:  # OSError covers TimeoutError
        return exc, time.perf_counter() - start
    return None, time.perf_counter() - start


async def test_set_get_round_trip_of_45kb_value(client: FastRedis) -> None:
    value = os.urandom(45 * 1024)
    assert await client.set("timeline:1", value) is True
    assert await client.get("timeline:1") == value
    assert await client.pttl("timeline:1") == -1
    assert await client.set(b"timeline:2", value, px=60_000) is True
    assert 0 < await client.pttl(b"timeline:2") <= 60_000
    assert await client.delete("timeline:1", "timeline:2", "timeline:3") == 2
    assert await client.get("timeline:1") is None
    assert await client.pttl("timeline:1") == -2
    assert await client.delete() == 0


async def test_concurrent_gets_are_pipelined(client: FastRedis) -> None:
    expected = {f"k{i}": b"%d:" % i + os.urandom(64) for i in range(1000)}
    await client.pipeline([("SET", key, value) for key, value in expected.items()])
    writes_before = client.writes
    values = await asyncio.gather(*(client.get(key) for key in expected))
    assert values == list(expected.values())
    writes = client.writes - writes_before
    assert 1 <= writes <= 10, f"{writes} writes for 1000 commands"
    assert client.in_flight == 0


async def test_pipeline_returns_errors_per_command(client: FastRedis) -> None:
    replies = await client.pipeline(
        [("SET", "s", "v"), ("LPUSH", "s", "x"), ("GET", "s"), ("INCRBY", "n", 2)]
    )
    assert replies[0] == b"OK"
    assert isinstance(replies[1], RedisReplyError)
    assert str(replies[1]).startswith("WRONGTYPE")
    assert replies[2:] == [b"v", 2]
    assert await client.pipeline([]) == []
    with pytest.raises(ValueError):
        await client.pipeline([("PING",), ()])


async def test_script_falls_back_to_eval_after_script_flush(client: FastRedis) -> None:
    script = Script("return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}")
    assert await client.execute("SCRIPT", "LOAD", script.source) == script.sha.encode()
    await client.execute("SCRIPT", "FLUSH")
    assert await client.execute("SCRIPT", "EXISTS", script.sha) == [0]
    assert await client.evalsha_or_eval(script, ["counter"], ["a"]) == [b"counter", b"a", 1]
    assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]
    assert await client.evalsha_or_eval(script, ["counter"], [7]) == [b"counter", b"7", 2]

    failing = Script("return redis.call('LPUSH', KEYS[1], 'x')")
    await client.set("plain", "v")
    with pytest.raises(RedisReplyError, match="WRONGTYPE"):
        await client.evalsha_or_eval(failing, ["plain"], [])


async def test_server_error_raises_reply_error(client: FastRedis) -> None:
    await client.set("s", "v")
    with pytest.raises(RedisReplyError, match="WRONGTYPE") as caught:
        await client.execute("LPUSH", "s", "x")
    assert isinstance(caught.value, PrefetchError)
    assert not isinstance(caught.value, RedisUnavailable)
    assert (caught.value.status, caught.value.code) == (500, "INTERNAL_ERROR")
    with pytest.raises(RedisReplyError, match="unknown command"):
        await client.execute("NO-SUCH-COMMAND")
    assert client.is_connected
    assert await client.get("s") == b"v"
    with pytest.raises(ValueError):
        await client.execute()


async def test_connection_refused_raises_promptly() -> None:
    url = f"redis://127.0.0.1:{_free_port()}"
    error, took = await _elapsed(FastRedis.connect(url, connect_timeout=2.0))
    assert isinstance(error, RedisUnavailable), error
    assert took < 1.0

    lazy = FastRedis(url)
    for _ in range(2):  # each call makes its own attempt and fails
        error, took = await _elapsed(lazy.execute("PING"))
        assert isinstance(error, RedisUnavailable), error
        assert took < 1.0
    assert not lazy.is_connected
    assert lazy.in_flight == 0
    await lazy.close()


async def test_silent_server_hits_connect_timeout_and_command_timeout() -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # SELECT is never answered: connect gives up after connect_timeout.
        error, took = await _elapsed(
            FastRedis.connect(f"redis://127.0.0.1:{port}/3", connect_timeout=0.2)
        )
        assert isinstance(error, RedisUnavailable), error
        assert 0.15 < took < 1.5

        redis = FastRedis(f"redis://127.0.0.1:{port}", timeout=0.2)
        error, took = await _elapsed(asyncio.gather(redis.execute("PING"), redis.get("k")))
        assert isinstance(error, RedisUnavailable), error
        assert 0.15 < took < 1.5
        assert redis.in_flight == 0
        await redis.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_server_side_kill_fails_in_flight_and_next_call_reconnects(
    client: FastRedis, admin: FastRedis
) -> None:
    await client.set("marker", "db15")
    old_id = await client.execute("CLIENT", "ID")
    blocked = asyncio.ensure_future(client.execute("BLPOP", "empty-list", 0))
    queued = [asyncio.ensure_future(client.get("marker")) for _ in range(10)]
    await asyncio.sleep(0.1)
    assert client.in_flight == 11
    assert await admin.execute("CLIENT", "KILL", "ID", old_id) == 1

    results = await asyncio.wait_for(asyncio.gather(blocked, *queued, return_exceptions=True), 2.0)
    assert all(isinstance(result, RedisUnavailable) for result in results), results
    assert client.in_flight == 0
    assert not client.is_connected

    pongs = await asyncio.gather(*(client.execute("PING") for _ in range(50)))
    assert pongs == [b"PONG"] * 50
    assert client.is_connected
    assert await client.execute("CLIENT", "ID") != old_id
    assert await client.get("marker") == b"db15"  # SELECT 15 again after reconnecting


async def test_command_timeout_drops_connection_and_client_recovers(client: FastRedis) -> None:
    redis = await _connect(timeout=0.2)
    try:
        await redis.set("k", "v")
        blocked = redis.execute("BLPOP", "empty-list", 0)
        behind = redis.get("k")
        error, took = await _elapsed(asyncio.gather(blocked, behind, return_exceptions=True))
        assert error is None
        assert 0.15 < took < 1.5
        assert redis.in_flight == 0
        assert not redis.is_connected
        assert await redis.get("k") == b"v"
        assert redis.is_connected
    finally:
        await redis.close()


async def test_timeout_result_for_each_command() -> None:
    redis = await _connect(timeout=0.2)
    try:
        results = await asyncio.gather(
            redis.execute("BLPOP", "empty-list", 0),
            redis.execute("PING"),
            return_exceptions=True,
        )
        assert [type(result) for result in results] == [RedisUnavailable] * 2
        assert "0.2" in str(results[0])
    finally:
        await redis.close()


async def test_select_from_url_path_and_query(client: FastRedis) -> None:
    assert b" db=15 " in await client.execute("CLIENT", "INFO")
    await client.set("seen", "yes")
    async with FastRedis(_url(), db=3) as other:  # the URL's db wins over the argument
        assert await other.get("seen") == b"yes"
    if urlsplit(REDIS_URL).scheme != "unix":
        query_url = urlunsplit(urlsplit(_url())._replace(path="", query=f"db={TEST_DB}"))
        async with FastRedis(query_url) as other:
            assert await other.get("seen") == b"yes"


async def test_auth_with_username_and_password_from_url(admin: FastRedis) -> None:
    user, password = f"fastredis-test-{uuid.uuid4().hex[:8]}", "p@ss:w/rd"
    await admin.execute("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    try:
        async with FastRedis(_url(user=user, password=password)) as redis:
            assert await redis.execute("ACL", "WHOAMI") == user.encode()
            assert b" db=15 " in await redis.execute("CLIENT", "INFO")
        with pytest.raises(RedisUnavailable, match="WRONGPASS"):
            await FastRedis.connect(_url(user=user, password="wrong"))
    finally:
        await admin.execute("ACL", "DELUSER", user)


async def test_password_only_form_sends_auth(admin: FastRedis) -> None:
    with pytest.raises(RedisUnavailable, match="AUTH"):
        await FastRedis.connect(_url(password=f"not-the-password-{uuid.uuid4().hex}"))


async def test_unix_socket(tmp_path: Path) -> None:
    async def pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(b"+PONG\r\n" * data.count(b"PING"))
        writer.close()

    path = tmp_path / "redis.sock"
    server = await asyncio.start_unix_server(pong, str(path))
    try:
        async with await FastRedis.connect(f"unix://{path}") as redis:
            assert (
                await asyncio.gather(*(redis.execute("PING") for _ in range(20))) == [b"PONG"] * 20
            )
    finally:
        server.close()
        await server.wait_closed()


async def test_close_and_context_manager() -> None:
    redis = await _connect()
    async with redis:
        assert await redis.execute("PING") == b"PONG"
        assert redis.is_connected
    assert not redis.is_connected
    with pytest.raises(RedisUnavailable, match="closed"):
        await redis.execute("PING")


async def test_works_on_uvloop() -> None:
    async def scenario() -> list[bytes | None]:
        async with FastRedis(_url()) as redis:
            await redis.set("uv", b"x" * 45_000)
            return await asyncio.gather(*(redis.get("uv") for _ in range(200)))

    def runner() -> list[bytes | None]:
        return uvloop.run(scenario())

    values = await asyncio.to_thread(runner)
    assert values == [b"x" * 45_000] * 200


async def test_url_parsing() -> None:
    parse = RedisAddress.parse
    assert parse("redis://h:7000/2") == RedisAddress("h", 7000, None, None, None, 2, False)
    assert parse("redis://h", db=4).db == 4
    assert parse("redis://h/1?db=5", db=4).db == 5
    address = parse("rediss://us%40er:p%3Ass@h.example")
    assert (address.username, address.password, address.port, address.tls) == (
        "us@er",
        "p:ss",
        6379,
        True,
    )
    assert parse("redis://:secret@h").username is None
    assert parse("redis://:secret@h").password == "secret"
    assert parse("unix:///run/redis.sock?db=3").path == "/run/redis.sock"
    assert parse("unix:///run/redis.sock?db=3").db == 3
    for bad in ("http://h", "redis://h/x", "redis://h:99999", "unix://", "redis://h/-1"):
        with pytest.raises(ConfigError):
            parse(bad)
