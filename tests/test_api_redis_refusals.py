"""Redis up but refusing commands: out of memory, busy, read-only, loading after a restart.

Each test runs a private redis-server (tests/redis_support.py) and puts it in the state for
real: `maxmemory` under `noeviction` after filling it, a Lua script that will not stop, a
replica, a restart with a dataset that loads slowly. Routes that write answer 503 with the
envelope, reads work as long as Redis serves reads, and health says what is going on.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from engine.settings import Settings
from tests.conftest import ApiClient, Reply, eventually, new_user, serve_api
from tests.redis_support import PrivateRedis, private_redis

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path) as started:
        yield started


def _refused(reply: Reply, kind: str) -> None:
    status, body = reply.status, reply.body
    assert status == 503, (status, body)
    assert body["success"] is False and body["error"] == "REDIS_REFUSED"
    assert kind in body["message"]
    assert "127.0.0.1" not in body["message"] and "redis://" not in body["message"]


async def _fill_then_cap(server: PrivateRedis) -> None:
    client = server.client()
    with client.pipeline(transaction=False) as pipe:
        for i in range(200):
            pipe.set(f"pad:{i}", b"x" * 10_000)
        pipe.execute()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1mb")
    client.close()


async def test_out_of_memory_refuses_writes_with_503_and_keeps_serving_reads(
    settings: Settings, server: PrivateRedis
) -> None:
    async with serve_api(settings.with_overrides(redis_url=server.url)) as api:
        cached, gone, fresh = new_user(), new_user(), new_user()
        for user in (cached, gone):
            reply = await api.call(
                "POST", f"/api/prefetch/immediate/{user}", json={"priority": "high"}
            )
            assert reply.status == 200
        await _fill_then_cap(server)

        _refused(await api.call("POST", f"/api/prefetch/schedule/{new_user()}"), "OOM")
        _refused(await api.call("POST", f"/api/prefetch/immediate/{new_user()}"), "OOM")
        # The generation bump is refused: the invalidation must not report success.
        _refused(await api.call("DELETE", f"/api/cache/{gone}/timeline"), "OOM")

        hit = await api.call("GET", f"/api/cache/{cached}")
        assert hit.status == 200 and hit.body["meta"]["cached"] is True
        # A read-through has the upstream's body: the reader gets it though it is not kept.
        through = await api.call("GET", f"/api/cache/{fresh}")
        assert through.status == 200 and through.body["meta"]["cached"] is False
        assert through.body["data"]["postsCount"] == 100
        # Nothing was kept, so there is nothing to revalidate against.
        assert "ETag" not in through.headers
        assert through.headers["Cache-Control"] == "private, max-age=0"
        status = await api.call("GET", f"/api/cache/status/{fresh}")
        assert status.status == 200 and status.body["data"]["cached"] is False

        health = await api.call("GET", "/health", token=None)
        assert health.status == 200 and health.body["status"] == "degraded"
        hot = health.body["checks"]["hotCache"]
        assert hot["status"] == "read-only" and hot["reason"] == "OOM"
        ready = await api.call("GET", "/health/ready", token=None)
        assert ready.status == 200 and "OOM" in ready.body["degraded"]
        redis_check = await api.call("GET", "/health/redis", token=None)
        assert redis_check.status == 200 and redis_check.body["status"] == "degraded"

        server.client().config_set("maxmemory", "0")
        assert (await api.call("POST", f"/api/prefetch/schedule/{new_user()}")).status == 202
        assert (await api.call("GET", "/health", token=None)).body["status"] == "healthy"


async def test_a_busy_script_makes_every_route_503_and_the_service_unhealthy(
    settings: Settings, server: PrivateRedis
) -> None:
    admin = server.client()
    admin.config_set("busy-reply-threshold", 50)
    user = new_user()
    async with serve_api(settings.with_overrides(redis_url=server.url)) as api:
        assert (await api.call("GET", f"/api/cache/{user}")).status == 200

        blocker = server.client()
        outcome: list[BaseException] = []

        def spin() -> None:
            try:
                blocker.eval("while true do end", 0)
            except redis.RedisError as exc:  # ended by SCRIPT KILL
                outcome.append(exc)

        thread = threading.Thread(target=spin, daemon=True)
        thread.start()
        try:
            # Reads that need Redis (new users): the API's local copy of entries it has read
            # (API_LOCAL_CACHE_MB) may still serve `user`, unchanged while the script runs.
            async def busy() -> bool:
                reply = await api.call("GET", f"/api/cache/{new_user()}")
                return reply.status == 503

            await eventually(busy, timeout=20)
            _refused(await api.call("GET", f"/api/cache/{new_user()}"), "BUSY")
            _refused(await api.call("POST", f"/api/prefetch/schedule/{user}"), "BUSY")
            health = await api.call("GET", "/health", token=None)
            assert health.status == 503 and health.body["status"] == "unhealthy"
            hot = health.body["checks"]["hotCache"]
            assert hot["status"] == "refused" and hot["reason"] == "BUSY"
            ready = await api.call("GET", "/health/ready", token=None)
            assert ready.status == 503 and "BUSY" in ready.body["reason"]
        finally:
            admin.script_kill()
            await asyncio.to_thread(thread.join, 10)
        assert outcome, "the script was killed"

        async def back() -> bool:
            return (await api.call("GET", "/health/ready", token=None)).status == 200

        await eventually(back, timeout=20)
        assert (await api.call("GET", f"/api/cache/{user}")).status == 200


async def test_a_read_only_replica_refuses_writes_and_serves_reads(
    settings: Settings, server: PrivateRedis, tmp_path: Path
) -> None:
    primary_api_settings = settings.with_overrides(redis_url=server.url)
    user = new_user()
    async with serve_api(primary_api_settings) as api:
        assert (await api.call("POST", f"/api/prefetch/immediate/{user}")).status == 200
    replica_dir = tmp_path / "replica"
    replica_dir.mkdir()
    with private_redis(replica_dir, ["--replicaof", "127.0.0.1", str(server.port)]) as replica:

        async def synced() -> bool:
            info = replica.client().info("replication")
            return bool(info.get("master_link_status") == "up")

        await eventually(synced, timeout=20)
        async with serve_api(settings.with_overrides(redis_url=replica.url)) as api:

            async def replicated() -> bool:
                return (await api.call("GET", f"/api/cache/{user}?cacheOnly=true")).status == 200

            await eventually(replicated, timeout=20)
            _refused(await api.call("POST", f"/api/prefetch/schedule/{user}"), "READONLY")
            _refused(await api.call("DELETE", f"/api/cache/{user}/timeline"), "READONLY")
            health = await api.call("GET", "/health", token=None)
            assert health.status == 200 and health.body["status"] == "degraded"
            assert health.body["checks"]["warmCache"]["reason"] == "READONLY"


async def test_loading_after_a_restart_is_503_until_the_dataset_is_in(
    settings: Settings, server: PrivateRedis
) -> None:
    client = server.client()
    with client.pipeline(transaction=False) as pipe:
        for i in range(10_000):
            pipe.set(f"pad:{i}", i)
        pipe.execute()
    client.save()
    client.close()
    server.stop()
    # 10,000 keys at 200 µs each: two seconds at least of answering LOADING.
    server.start(["--key-load-delay", "200", "--loading-process-events-interval-bytes", "1024"])
    async with serve_api(settings.with_overrides(redis_url=server.url)) as api:
        _refused(await api.call("GET", f"/api/cache/{new_user()}"), "LOADING")
        _refused(await api.call("POST", f"/api/prefetch/schedule/{new_user()}"), "LOADING")
        health = await api.call("GET", "/health", token=None)
        assert health.status == 503
        assert health.body["checks"]["hotCache"]["reason"] == "LOADING"
        assert (await api.call("GET", "/health/ready", token=None)).status == 503
        assert (await api.call("GET", "/health/live", token=None)).status == 200

        async def loaded() -> bool:
            return (await api.call("GET", "/health/ready", token=None)).status == 200

        await eventually(loaded, timeout=60, interval=0.2)
        assert (await api.call("POST", f"/api/prefetch/schedule/{new_user()}")).status == 202


async def _activity(api: ApiClient, *users: str) -> Reply:
    return await api.call("POST", "/api/activity", json={"userIds": list(users) or [new_user()]})


async def _event(api: ApiClient, user: str) -> Reply:
    return await api.call(
        "POST", "/api/prefetch/events", json={"type": "post.created", "userId": user}
    )


async def test_activity_and_events_answer_503_while_redis_refuses_writes(
    settings: Settings, server: PrivateRedis
) -> None:
    async with serve_api(settings.with_overrides(redis_url=server.url)) as api:
        cached = new_user()
        assert (await api.call("GET", f"/api/cache/{cached}")).status == 200
        assert (await _activity(api)).status == 202
        await _fill_then_cap(server)

        # 202 means "held, and the last write landed": once a flush is refused, it stops.
        async def refusing() -> bool:
            return (await _activity(api)).status == 503

        await eventually(refusing, timeout=10)
        _refused(await _activity(api), "OOM")
        _refused(await _event(api, cached), "OOM")  # a refresh job: refused
        _refused(await _event(api, new_user()), "OOM")  # an invalidation: refused

        server.client().config_set("maxmemory", "0")

        async def accepting() -> bool:
            return (await _activity(api)).status == 202

        await eventually(accepting, timeout=10)
        assert (await _event(api, cached)).status == 202


async def test_activity_and_events_answer_503_while_redis_is_down(
    settings: Settings, server: PrivateRedis
) -> None:
    async with serve_api(settings.with_overrides(redis_url=server.url)) as api:
        user = new_user()
        assert (await _activity(api, user)).status == 202
        server.stop()

        async def down() -> bool:
            return (await _activity(api)).status == 503

        await eventually(down, timeout=15)
        reply = await _activity(api)
        assert reply.body["error"] == "REDIS_UNAVAILABLE"
        event = await _event(api, user)
        assert event.status == 503 and event.body["error"] == "REDIS_UNAVAILABLE"

        server.start()

        async def back() -> bool:
            return (await _activity(api)).status == 202

        await eventually(back, timeout=20)
