"""GET /api/cache/{userId}, its status and invalidation, through real HTTP."""

from __future__ import annotations

import asyncio
import gzip
import time

import aiohttp
import orjson
import pytest

from engine.settings import Settings
from engine.store import keys
from engine.store.fastredis import FastRedis
from sandbox.config import SandboxSettings
from sandbox.server import SandboxServer
from tests.conftest import ApiClient, closed_port, eventually, new_user, serve_api

pytestmark = pytest.mark.timeout(30)


async def test_concurrent_reads_of_a_new_user_share_one_upstream_fetch(api: ApiClient) -> None:
    user = new_user()
    replies = await asyncio.gather(*(api.call("GET", f"/api/cache/{user}") for _ in range(50)))
    assert [reply.status for reply in replies] == [200] * 50
    assert (await api.timeline_stats())["byUser"] == {user: 1}
    first = [reply.body for reply in replies if reply.body["meta"]["cached"] is False]
    assert first, "the read-through answer says meta.cached false"
    data = first[0]["data"]
    assert data["postsCount"] == len(data["posts"]) == 100
    assert first[0]["meta"]["tier"] == data["tier"] == "warm"
    assert first[0]["meta"]["fetchedAt"] == data["fetchedAt"]

    later = await api.call("GET", f"/api/cache/{user}")
    assert later.status == 200
    assert later.body["success"] is True
    assert later.body["meta"] == {"cached": True, "tier": "warm", "fetchedAt": data["fetchedAt"]}
    assert later.body["data"]["posts"] == data["posts"]
    assert (await api.timeline_stats())["byUser"] == {user: 1}


async def test_hot_entry_is_served_before_warm(api: ApiClient) -> None:
    user = new_user()
    assert (await api.call("POST", f"/api/prefetch/immediate/{user}")).status == 200
    assert (
        await api.call("POST", f"/api/prefetch/immediate/{user}", json={"priority": "high"})
    ).status == 200
    reply = await api.call("GET", f"/api/cache/{user}")
    assert reply.status == 200
    assert reply.body["meta"]["tier"] == reply.body["data"]["tier"] == "hot"
    assert reply.body["meta"]["cached"] is True


async def test_uppercase_user_id_reads_the_same_entry(api: ApiClient) -> None:
    user = new_user()
    assert (await api.call("GET", f"/api/cache/{user.upper()}")).status == 200
    reply = await api.call("GET", f"/api/cache/{user}")
    assert reply.body["meta"]["cached"] is True
    assert (await api.timeline_stats())["byUser"] == {user: 1}


async def test_gzip_entry_goes_out_as_is_to_gzip_clients(api: ApiClient) -> None:
    user = new_user()
    assert (await api.call("GET", f"/api/cache/{user}")).status == 200
    url = f"{api.url}/api/cache/{user}"
    auth = {"Authorization": "Bearer sandbox-service"}
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(url, headers={**auth, "Accept-Encoding": "gzip"}) as rsp:
            assert rsp.status == 200
            assert rsp.headers["Content-Encoding"] == "gzip"
            assert rsp.headers["Vary"] == "Accept-Encoding"
            assert rsp.content_type == "application/json"
            body = await rsp.read()
        assert body[:2] == b"\x1f\x8b"
        assert orjson.loads(gzip.decompress(body))["meta"]["cached"] is True

        for refusal in ("identity", "gzip;q=0, identity"):
            async with raw.get(url, headers={**auth, "Accept-Encoding": refusal}) as rsp:
                assert rsp.status == 200
                assert "Content-Encoding" not in rsp.headers
                assert rsp.headers["Vary"] == "Accept-Encoding"
                plain = await rsp.read()
            assert orjson.loads(plain)["data"]["postsCount"] == 100


async def test_uncompressed_entries_are_served_plain(settings: Settings) -> None:
    async with serve_api(settings.with_overrides(cache_compression="none")) as api:
        user = new_user()
        assert (await api.call("GET", f"/api/cache/{user}")).status == 200
        async with aiohttp.ClientSession(auto_decompress=False) as raw:
            headers = {"Authorization": "Bearer sandbox-service", "Accept-Encoding": "gzip"}
            async with raw.get(f"{api.url}/api/cache/{user}", headers=headers) as rsp:
                assert rsp.status == 200
                assert "Content-Encoding" not in rsp.headers
                assert orjson.loads(await rsp.read())["meta"]["cached"] is True


async def test_cache_only_miss_is_404_without_upstream_fetch(api: ApiClient) -> None:
    user = new_user()
    reply = await api.call("GET", f"/api/cache/{user}?cacheOnly=true")
    assert reply.status == 404
    assert reply.body == {"success": False, "error": "NOT_FOUND", "message": "Timeline not cached"}
    assert (await api.timeline_stats())["timelineFetches"] == 0


@pytest.mark.parametrize(
    ("prefix", "status", "code"),
    [
        ("0000dead-", 404, "NOT_FOUND"),
        ("0000fa11-", 502, "PREFETCH_FAILED"),
        ("0000bad0-", 502, "PREFETCH_FAILED"),
        ("0000510e-", 504, "UPSTREAM_TIMEOUT"),
    ],
)
async def test_read_through_failures_map_to_status_codes(
    api: ApiClient, prefix: str, status: int, code: str
) -> None:
    user = new_user(prefix)
    reply = await api.call("GET", f"/api/cache/{user}")
    assert reply.status == status
    assert reply.body["success"] is False
    assert reply.body["error"] == code
    status_reply = await api.call("GET", f"/api/cache/status/{user}")
    assert status_reply.body["data"]["cached"] is False


async def test_status_reports_tier_ttl_and_expiry(api: ApiClient) -> None:
    user = new_user()
    reply = await api.call("GET", f"/api/cache/status/{user}")
    assert reply.status == 200
    assert reply.body == {
        "success": True,
        "data": {"cached": False, "tier": None, "ttl": None, "expiresIn": None},
    }

    await api.call("GET", f"/api/cache/{user}")  # read-through: warm
    warm = (await api.call("GET", f"/api/cache/status/{user}")).body["data"]
    assert warm["cached"] is True and warm["tier"] == "warm"
    assert 890 <= warm["ttl"] <= 900 and 890_000 <= warm["expiresIn"] <= 900_000

    await api.call("POST", f"/api/prefetch/immediate/{user}", json={"priority": "high"})
    hot = (await api.call("GET", f"/api/cache/status/{user}")).body["data"]
    assert hot["cached"] is True and hot["tier"] == "hot"
    assert isinstance(hot["ttl"], int) and isinstance(hot["expiresIn"], int)
    assert 290 <= hot["ttl"] <= 300 and 290_000 <= hot["expiresIn"] <= 300_000


async def test_invalidation_drops_both_tiers(api: ApiClient) -> None:
    user = new_user()
    await api.call("POST", f"/api/prefetch/immediate/{user}", json={"priority": "medium"})
    await api.call("POST", f"/api/prefetch/immediate/{user}", json={"priority": "high"})
    reply = await api.call("DELETE", f"/api/cache/{user.upper()}/timeline")
    assert reply.status == 200
    assert reply.body == {"success": True, "message": "Cache invalidated", "data": {"userId": user}}
    status = (await api.call("GET", f"/api/cache/status/{user}")).body["data"]
    assert status["cached"] is False
    assert (await api.call("GET", f"/api/cache/{user}?cacheOnly=true")).status == 404


async def _slow_upstream_api(base_settings: Settings) -> tuple[SandboxServer, Settings]:
    server = SandboxServer(base_settings, SandboxSettings(latency_ms=500))
    await server.start()
    return server, server.settings_for_clients()


@pytest.mark.parametrize(
    ("method", "route"),
    [("POST", "/api/prefetch/immediate/{user}"), ("GET", "/api/cache/{user}")],
)
async def test_invalidation_wins_over_a_fetch_in_flight(
    base_settings: Settings, method: str, route: str
) -> None:
    server, settings = await _slow_upstream_api(base_settings)
    try:
        async with serve_api(settings) as api:
            user = new_user()
            in_flight = asyncio.ensure_future(api.call(method, route.format(user=user)))

            async def fetch_started() -> bool:
                return user in (await api.timeline_stats())["byUser"]

            await eventually(fetch_started)
            assert (await api.call("DELETE", f"/api/cache/{user}/timeline")).status == 200
            assert (await in_flight).status == 200
            status = (await api.call("GET", f"/api/cache/status/{user}")).body["data"]
            assert status["cached"] is False, "the fetch that lost the race wrote data back"
    finally:
        await server.stop()


async def test_reads_count_as_activity(api: ApiClient, redis_roles: dict[str, FastRedis]) -> None:
    user = new_user()
    started_ms = int(time.time() * 1000)
    assert (await api.call("GET", f"/api/cache/{user}")).status == 200
    assert (await api.call("GET", f"/api/cache/{user}")).status == 200  # a hit: same flush
    metrics = redis_roles["metrics"]
    shard = keys.shard_of(user)

    async def recorded() -> bool:
        return await metrics.execute("ZSCORE", keys.activity_index(shard), user) is not None

    await eventually(recorded)
    last = float(await metrics.execute("ZSCORE", keys.activity_index(shard), user))
    assert last >= started_ms
    assert int(await metrics.execute("HGET", keys.activity_frequency(shard), user)) >= 1


async def test_redis_down_answers_503(settings: Settings) -> None:
    down = settings.with_overrides(redis_url=f"redis://127.0.0.1:{closed_port()}")
    async with serve_api(down) as api:
        user = new_user()
        for path in (f"/api/cache/{user}", f"/api/cache/status/{user}"):
            reply = await api.call("GET", path)
            assert reply.status == 503
            assert reply.body["error"] == "REDIS_UNAVAILABLE"
            assert reply.body["success"] is False
