"""Tests of engine.store.fastredis against a real Redis (REDIS_URL or an embedded Valkey).

Everything runs in db 15, flushed before each test. Tests that need a misbehaving server
(refused, silent, unix socket) start their own in-process fakes; those that need a Redis in a
state of its own (out of memory, TLS, a password) start a private redis-server. Timing is
asserted as lower bounds and orderings only: a loaded machine may be slow, never early.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
import pytest_asyncio
import uvloop

from engine.errors import (
    ConfigError,
    PrefetchError,
    RedisRefused,
    RedisReplyError,
    RedisUnavailable,
)
from engine.store.endpoint import RedisAddress, TLSOptions
from engine.store.fastredis import FastRedis, Script
from tests.conftest import eventually
from tests.redis_support import PrivateRedis, private_redis

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


async def test_large_reads_fed_in_pieces_keep_every_reply_whole(client: FastRedis) -> None:
    # Replies of many sizes in one pipeline: large reads (several pieces of FEED_PIECE, with
    # replies straddling the pieces' edges) and small ones mixed, integers and nils among them.
    sizes = [9_000, 53_000, 1, 0, 100_000, 32 * 1024 - 5, 32 * 1024, 32 * 1024 + 7, 17] * 6
    values = {f"big{i}": os.urandom(size) for i, size in enumerate(sizes)}
    await client.pipeline([("SET", key, value) for key, value in values.items()])
    commands: list[tuple[str, ...]] = []
    expected: list[object] = []
    for key, value in values.items():
        commands += [("GET", key), ("STRLEN", key), ("GET", key + ":missing")]
        expected += [value, len(value), None]
    assert await client.pipeline(commands) == expected
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


async def test_connection_refused_raises_without_waiting_for_the_connect_timeout() -> None:
    url = f"redis://127.0.0.1:{_free_port()}"
    # _elapsed gives up after 5 s with TimeoutError: RedisUnavailable means it did not wait.
    error, _ = await _elapsed(FastRedis.connect(url, connect_timeout=30.0))
    assert isinstance(error, RedisUnavailable), error

    lazy = FastRedis(url, connect_timeout=30.0)
    for _ in range(2):  # the first call dials; the second fails at once, backing off
        error, _ = await _elapsed(lazy.execute("PING"))
        assert isinstance(error, RedisUnavailable), error
    assert lazy.reconnecting
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
        # SELECT is never answered: connect gives up after connect_timeout (and not never:
        # _elapsed would have answered TimeoutError after 5 s).
        error, took = await _elapsed(
            FastRedis.connect(f"redis://127.0.0.1:{port}/3", connect_timeout=0.2)
        )
        assert isinstance(error, RedisUnavailable), error
        assert took >= 0.19

        redis = FastRedis(f"redis://127.0.0.1:{port}", timeout=0.2)
        error, took = await _elapsed(asyncio.gather(redis.execute("PING"), redis.get("k")))
        assert isinstance(error, RedisUnavailable), error
        assert took >= 0.19
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

    async def blocking() -> bool:  # BLPOP reached the server; the GETs wait behind it
        listed = await admin.execute("CLIENT", "LIST", "ID", old_id)
        return client.in_flight == 11 and b"cmd=blpop" in listed

    await eventually(blocking)
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
        assert error is None  # both failed, and within _elapsed's 5 s: the timeout fired
        assert took >= 0.19
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


# --- refusals ------------------------------------------------------------------------------


async def test_out_of_memory_replies_are_refusals_and_reads_go_on(tmp_path: Path) -> None:
    with private_redis(tmp_path) as server:
        async with FastRedis(server.url) as redis:
            await redis.set("kept", "v")
            await redis.pipeline([("SET", f"pad:{i}", b"x" * 10_000) for i in range(200)])
            await redis.execute("CONFIG", "SET", "maxmemory-policy", "noeviction")
            await redis.execute("CONFIG", "SET", "maxmemory", "1mb")

            with pytest.raises(RedisRefused) as caught:
                await redis.set("more", "v")
            refused = caught.value
            assert refused.kind == "OOM" and str(refused).startswith("OOM")
            assert isinstance(refused, RedisUnavailable) and isinstance(refused, RedisReplyError)
            assert (refused.status, refused.code) == (503, "REDIS_REFUSED")
            assert refused.public_message == "Redis is refusing commands (OOM)"

            replies = await redis.pipeline([("GET", "kept"), ("INCR", "n"), ("LLEN", "kept")])
            assert replies[0] == b"v"
            assert isinstance(replies[1], RedisRefused)
            assert isinstance(replies[2], RedisReplyError)  # WRONGTYPE is no refusal
            assert not isinstance(replies[2], RedisRefused)
            assert redis.is_connected  # a refusal is an answer: the connection stays


# --- reconnecting --------------------------------------------------------------------------


async def test_a_blackholed_host_costs_one_connect_timeout_not_one_per_command() -> None:
    dials = 0

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal dials
        dials += 1
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # SELECT is never answered: every dial hangs until connect_timeout, like a blackhole.
    redis = FastRedis(f"redis://127.0.0.1:{port}/3", connect_timeout=1.0)
    try:
        error, took = await _elapsed(redis.execute("PING"))
        assert isinstance(error, RedisUnavailable) and took >= 0.95
        assert redis.reconnecting and dials == 1

        started = time.perf_counter()
        results = await asyncio.gather(
            *(redis.execute("PING") for _ in range(50)), return_exceptions=True
        )
        failing_fast = time.perf_counter() - started
        assert all(isinstance(result, RedisUnavailable) for result in results)
        # They did not wait for a dial (a connect timeout each, or one shared): they failed
        # at once. The margin is a thousandfold, not a window.
        assert failing_fast < took / 2
        assert dials <= 2  # at most one background redial began meanwhile

        async def redialled() -> bool:  # after the backoff, in the background
            await asyncio.gather(redis.execute("PING"), return_exceptions=True)
            return dials >= 2

        await eventually(redialled, timeout=10)
    finally:
        await redis.close()
        server.close()
        await server.wait_closed()


async def test_the_client_comes_back_when_redis_does(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)
    redis = FastRedis(server.url)
    try:
        with pytest.raises(RedisUnavailable):
            await redis.execute("PING")
        with pytest.raises(RedisUnavailable):
            await redis.execute("PING")  # at once, while the backoff runs
        server.start()

        async def back() -> bool:
            try:
                return bool(await redis.execute("PING") == b"PONG")
            except RedisUnavailable:
                return False

        await eventually(back, timeout=15, interval=0.1)
        assert not redis.reconnecting
    finally:
        await redis.close()
        server.stop()


# --- passwords and TLS ---------------------------------------------------------------------


async def test_a_password_with_url_delimiters_works_end_to_end(tmp_path: Path) -> None:
    import redis as redis_py

    from engine.settings import load_settings

    password = "p@ss/word:50%#?"
    with private_redis(tmp_path, ["--requirepass", password]) as server:
        settings = load_settings(
            {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(server.port), "REDIS_PASSWORD": password}
        )
        async with FastRedis(settings.redis_url) as redis:
            assert await redis.execute("PING") == b"PONG"
        with redis_py.Redis.from_url(settings.redis_url) as client:  # Dramatiq's client
            assert client.ping() is True


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certificates(where: Path) -> dict[str, Path]:
    """A CA, a server certificate for DNS:localhost only, and a client certificate."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=prefetch-test-ca", cwd=where)  # fmt: skip
    (where / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    for name, extra in (("server", ["-extfile", "san.ext"]), ("client", [])):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=where)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", *extra,
                 cwd=where)  # fmt: skip
    return {name: where / name for name in
            ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}  # fmt: skip


async def test_tls_honours_the_url_options_redis_py_honours(tmp_path: Path) -> None:
    import redis as redis_py

    files = _certificates(tmp_path)
    args = [
        "--tls-cert-file", str(files["server.crt"]),
        "--tls-key-file", str(files["server.key"]),
        "--tls-ca-cert-file", str(files["ca.crt"]),
        "--tls-auth-clients", "yes",
    ]  # fmt: skip
    ours = f"ssl_certfile={files['client.crt']}&ssl_keyfile={files['client.key']}"
    trusted = f"ssl_ca_certs={files['ca.crt']}&{ours}"
    with private_redis(tmp_path, args, tls=True) as server:
        good = f"rediss://localhost:{server.port}/?{trusted}"
        async with FastRedis(good) as redis:
            assert await redis.execute("PING") == b"PONG"
        with redis_py.Redis.from_url(good) as client:  # the same URL means the same to both
            assert client.ping() is True

        # No client certificate: the server (tls-auth-clients yes) hangs up, at the latest
        # on the first command (TLS 1.3 checks the client's certificate after the handshake).
        anonymous = FastRedis(f"rediss://localhost:{server.port}/?ssl_ca_certs={files['ca.crt']}")
        with pytest.raises(RedisUnavailable):
            await anonymous.execute("PING")
        await anonymous.close()
        # Our CA not given: the server's certificate is not trusted.
        with pytest.raises(RedisUnavailable):
            await FastRedis.connect(f"rediss://localhost:{server.port}/?{ours}")
        # 127.0.0.1 is not a name on the certificate, unless hostnames go unchecked.
        with pytest.raises(RedisUnavailable):
            await FastRedis.connect(f"rediss://127.0.0.1:{server.port}/?{trusted}")
        unchecked = f"rediss://127.0.0.1:{server.port}/?{trusted}&ssl_check_hostname=false"
        async with FastRedis(unchecked) as redis:
            assert await redis.execute("PING") == b"PONG"
        unverified = f"rediss://127.0.0.1:{server.port}/?{ours}&ssl_cert_reqs=none"
        async with FastRedis(unverified) as redis:
            assert await redis.execute("PING") == b"PONG"


async def test_tls_options_are_checked_when_the_url_is_parsed(tmp_path: Path) -> None:
    address = RedisAddress.parse("rediss://h/?ssl_cert_reqs=optional&ssl_check_hostname=no")
    assert address.tls_options == TLSOptions(cert_reqs="optional", check_hostname=False)
    for bad in (
        "redis://h/?ssl_cert_reqs=required",  # a TLS option without TLS is a mistake
        "rediss://h/?ssl_cert_reqs=bogus",
        "rediss://h/?ssl_check_hostname=maybe",
        f"rediss://h/?ssl_ca_certs={tmp_path / 'missing.crt'}",
    ):
        with pytest.raises(ConfigError):
            RedisAddress.parse(bad)
