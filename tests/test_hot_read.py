"""api/hot_read.py and api/server/hot_path.py: cached reads answered off aiohttp's loop.

The hot path must answer exactly as the app would (the same status, headers and bytes, the
same counts), hand everything else to the app with the same message, and keep a connection's
answers in the order of its requests. Every read below goes over real connections to an API
over the sandbox and the test Redis; the app's answer comes from a server without the front
door (`front_door=False`), which routes every request through the app.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web

from api import create_app
from api.appkeys import RUNTIME
from api.server import make_runner
from engine.settings import Settings
from engine.store import keys
from engine.store.fastredis import FastRedis
from engine.store.local_cache import LocalCache
from tests.conftest import SERVICE_TOKEN, ApiClient, Reply, eventually, new_user, serve_api

pytestmark = pytest.mark.timeout(60)

# Headers that differ between two answers by design: the clock, and a random request id.
VARYING = {"date", "x-request-id", "cache-control"}


def _shape(reply: Reply) -> tuple[object, ...]:
    headers = {k.lower(): v for k, v in reply.headers.items() if k.lower() not in VARYING}
    return reply.status, sorted(headers.items()), reply.raw, "X-Request-Id" in reply.headers


@pytest_asyncio.fixture
async def door_and_router(settings: Settings) -> AsyncIterator[tuple[ApiClient, ApiClient]]:
    async with serve_api(settings) as door, serve_api(settings, front_door=False) as router:
        assert door.hot_reads is not None and router.hot_reads is None
        yield door, router


async def test_hot_reads_answer_as_the_app_does(
    door_and_router: tuple[ApiClient, ApiClient], redis_roles: dict[str, FastRedis]
) -> None:
    door, router = door_and_router
    user, warm_only = new_user(), new_user()
    for someone in (user, warm_only):
        assert (await door.call("GET", f"/api/cache/{someone}")).status == 200  # read through
    # A read-through stores in warm; `user` gets a hot entry too, `warm_only` does not: the
    # hot path asks hot, then warm.
    stored = await redis_roles["warm"].get(keys.timeline("warm", user))
    assert stored is not None
    await redis_roles["hot"].set(keys.timeline("hot", user), stored, px=60_000)
    assert await redis_roles["hot"].get(keys.timeline("hot", warm_only)) is None

    variants: list[dict[str, str]] = [
        {"Accept-Encoding": "gzip"},
        {"Accept-Encoding": "gzip, deflate, br"},
        {"Accept-Encoding": "identity"},
        {},
        {"Accept-Encoding": "gzip", "X-Request-Id": "client-chosen-1"},
    ]
    hits_before = door.hot_reads.answered
    for someone in (user, warm_only, user.upper()):
        for headers in variants:
            hot = await door.call("GET", f"/api/cache/{someone}", headers=headers)
            app = await router.call("GET", f"/api/cache/{someone}", headers=headers)
            assert hot.status == 200
            assert _shape(hot) == _shape(app), (someone, headers)
            if "X-Request-Id" in headers:
                assert hot.headers["X-Request-Id"] == headers["X-Request-Id"]
    assert door.hot_reads.answered - hits_before == 15


async def test_reads_the_local_copy_holds_are_answered_on_the_hot_path(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    copying = settings.with_overrides(api_local_cache_mb=8)
    async with serve_api(copying) as door, serve_api(copying, front_door=False) as router:
        assert door.hot_reads is not None
        local = door.app[RUNTIME].cache._local
        assert isinstance(local, LocalCache)

        async def live() -> bool:
            return local.live

        await eventually(live)
        user = new_user()
        assert (await door.call("GET", f"/api/cache/{user}")).status == 200  # read through
        stored = await redis_roles["warm"].get(keys.timeline("warm", user))
        assert stored is not None
        # The first hit is the app's (a copy is made only by a tracked read); the next ones
        # come from the copy, on the hot path, with the answer the app gives from Redis.
        assert (await door.call("GET", f"/api/cache/{user}")).status == 200
        assert local.get(user) == ("warm", stored)
        hits, answered = local.hits, door.hot_reads.answered
        for headers in ({"Accept-Encoding": "gzip"}, {}, {"X-Request-Id": "client-chosen-2"}):
            hot = await door.call("GET", f"/api/cache/{user}", headers=headers)
            app = await router.call("GET", f"/api/cache/{user}", headers=headers)
            assert hot.status == 200
            assert _shape(hot) == _shape(app), headers
        assert door.hot_reads.answered == answered + 3
        assert local.hits == hits + 3
        # A write by another client drops the copy once Redis says so: then Redis answers.
        other = new_user()
        assert (await router.call("GET", f"/api/cache/{other}")).status == 200
        replacement = await redis_roles["warm"].get(keys.timeline("warm", other))
        assert replacement is not None and replacement != stored
        await redis_roles["warm"].set(keys.timeline("warm", user), replacement, px=60_000)

        async def dropped() -> bool:
            return local.get(user) is None

        await eventually(dropped)
        again = await door.call("GET", f"/api/cache/{user}")
        assert again.status == 200 and again.headers["ETag"] != hot.headers["ETag"]
        assert _shape(again) == _shape(await router.call("GET", f"/api/cache/{user}"))


async def test_what_the_hot_path_declines_the_app_answers(
    door_and_router: tuple[ApiClient, ApiClient],
) -> None:
    door, router = door_and_router
    cached, uncached = new_user(), new_user()
    assert (await door.call("GET", f"/api/cache/{cached}")).status == 200
    etag = (await door.call("GET", f"/api/cache/{cached}")).headers["ETag"]
    requests: list[tuple[str, dict[str, str], str | None]] = [
        (f"/api/cache/{uncached}?cacheOnly=true", {}, SERVICE_TOKEN),  # a query: declined
        (f"/api/cache/{cached}", {"If-None-Match": etag}, SERVICE_TOKEN),  # conditional: 304
        (f"/api/cache/{cached}", {}, None),  # no token: 401
        (f"/api/cache/{cached}", {}, "unknown-token"),  # no remembered verdict: the app asks
        (f"/api/cache/{new_user()[:-1]}x", {}, SERVICE_TOKEN),  # not a UUID: 400
        (f"/api/cache/{uncached}", {}, SERVICE_TOKEN),  # a miss: the app reads through
    ]
    for path, headers, token in requests:
        answered = door.hot_reads.answered
        hot = await door.call("GET", path, token=token, headers=headers)
        app = await router.call("GET", path, token=token, headers=headers)
        code = hot.body.get("error") if isinstance(hot.body, dict) else None
        assert (hot.status, code) == (app.status, app.body.get("error") if app.body else None)
        assert door.hot_reads.answered == answered, path
    # The miss was read through and stored: the next read is a hit, answered off the loop.
    answered = door.hot_reads.answered
    assert (await door.call("GET", f"/api/cache/{uncached}")).status == 200
    assert door.hot_reads.answered == answered + 1


async def _more(now: int, before: int) -> bool:
    return now > before


async def _answers(reader: asyncio.StreamReader, count: int) -> list[tuple[int, bytes]]:
    """`count` HTTP/1.1 answers off one connection: (status, body)."""
    out = []
    for _ in range(count):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(v) for k, _, v in (x.partition(": ") for x in lines) if k == "Content-Length"
        )
        out.append((status, await reader.readexactly(length)))
    return out


async def test_requests_behind_a_taken_read_are_answered_after_it(
    door_and_router: tuple[ApiClient, ApiClient], redis_url: str, settings: Settings
) -> None:
    door, _ = door_and_router
    first, second = new_user(), new_user()
    for someone in (first, second):
        assert (await door.call("GET", f"/api/cache/{someone}")).status == 200
    host, port = door.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    auth = f"Authorization: Bearer {SERVICE_TOKEN}\r\nAccept-Encoding: gzip\r\n"

    def read(user: str, query: str = "") -> bytes:
        return f"GET /api/cache/{user}{query} HTTP/1.1\r\nHost: t\r\n{auth}\r\n".encode()

    admin = FastRedis(redis_url, settings.db_hot)
    try:
        answered, taken = door.hot_reads.answered, door.hot_reads.taken
        # Redis holds every client's commands for a second: the first read stays in flight
        # while the next two arrive: a read without a token, which the app answers without
        # Redis (401), and a cacheOnly read, which the hot path leaves to the app.
        await admin.execute("CLIENT", "PAUSE", "1000", "ALL")
        writer.write(read(first))
        await writer.drain()
        await eventually(lambda: _more(door.hot_reads.taken, taken))
        tokenless = f"GET /api/cache/{second} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
        writer.write(tokenless + read(second, "?cacheOnly=true"))
        await writer.drain()
        answers = await asyncio.wait_for(_answers(reader, 3), 10)
    finally:
        writer.close()
        await admin.close()
    assert [code for code, _ in answers] == [200, 401, 200]
    assert answers[0][1] != answers[2][1]  # two users' timelines, in the order asked
    assert door.hot_reads.answered == answered + 1  # the first, which the others waited for


async def test_an_entry_the_hot_path_cannot_answer_gets_the_apps_answer(
    door_and_router: tuple[ApiClient, ApiClient], redis_roles: dict[str, FastRedis]
) -> None:
    door, router = door_and_router
    user = new_user()
    assert (await door.call("GET", f"/api/cache/{user}")).status == 200  # the token remembered
    # A gzip member that does not decompress, for a client that needs it decompressed.
    corrupt = b"\x1f\x8b\x08\x00" + b"\x00" * 6 + b"not deflate at all" + b"\x00" * 8
    await redis_roles["hot"].set(keys.timeline("hot", user), corrupt, px=60_000)
    answered = door.hot_reads.answered
    plain = {"Accept-Encoding": "identity"}
    hot = await door.call("GET", f"/api/cache/{user}", headers=plain)
    app = await router.call("GET", f"/api/cache/{user}", headers=plain)
    assert (hot.status, hot.body) == (app.status, app.body)
    assert hot.status == 500 and hot.body["error"] == "INTERNAL_ERROR"
    assert door.hot_reads.answered == answered
    # The connection still serves: the next read (a good entry again) is answered off the loop.
    await redis_roles["hot"].delete(keys.timeline("hot", user))
    assert (await door.call("GET", f"/api/cache/{user}", headers=plain)).status == 200
    assert door.hot_reads.answered == answered + 1


async def test_a_shutdown_waits_for_a_taken_read(redis_url: str, settings: Settings) -> None:
    user = new_user()
    app = create_app(settings)
    runner = make_runner(app, settings)
    await runner.setup()
    cleaned = False
    admin = FastRedis(redis_url, settings.db_hot)
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"GET /api/cache/{user} HTTP/1.1\r\nHost: t\r\n"
        head += f"Authorization: Bearer {SERVICE_TOKEN}\r\nAccept-Encoding: gzip\r\n\r\n"
        writer.write(head.encode())  # read through: the token's verdict is remembered
        await writer.drain()
        assert (await _answers(reader, 1))[0][0] == 200
        hot_reads = getattr(runner.server, "hot_reads", None)
        assert hot_reads is not None
        answered = hot_reads.answered
        # The next read is taken and held in Redis while the server shuts down.
        taken = hot_reads.taken
        await admin.execute("CLIENT", "PAUSE", "1000", "ALL")
        writer.write(head.encode())
        await writer.drain()
        await eventually(lambda: _more(hot_reads.taken, taken))
        cleaned = True
        shutdown = asyncio.create_task(runner.cleanup())
        answers = await asyncio.wait_for(_answers(reader, 1), 10)
        await shutdown
        writer.close()
    finally:
        if not cleaned:
            await runner.cleanup()
        await admin.close()
    assert answers[0][0] == 200
    assert hot_reads.answered == answered + 1
