"""The API's local copy of read entries on a real Redis: served without a round trip, and
never stale after a write, delete, invalidation, expiry or a lost tracking connection."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from api.appkeys import RUNTIME
from engine import wire
from engine.errors import ConfigError
from engine.runtime import make_local_cache
from engine.settings import Settings, load_settings
from engine.store import keys
from engine.store.cache import TimelineCache
from engine.store.entry import compress, new_tag, stamp
from engine.store.fastredis import FastRedis
from engine.store.local_cache import LocalCache
from sandbox.timeline import generate_posts
from tests.conftest import eventually, new_user, serve_api
from tests.test_cache import wire_now_ms


def entry(user: str, expires_in_ms: int = 300_000) -> bytes:
    """A stamped gzip entry, as a prefetch stores it."""
    body = wire.cached_body(generate_posts(user, 20), 1_700_000_000_000, "hot", cached=True)
    return stamp(compress(body), new_tag(), wire_now_ms() + expires_in_ms)


class Reader:
    """A TimelineCache with a tracked local copy, on read connections of its own."""

    def __init__(self, settings: Settings, max_bytes: int = 8 << 20) -> None:
        self.hot = FastRedis(settings.redis_url, settings.db_hot)
        self.warm = FastRedis(settings.redis_url, settings.db_warm)
        self.local = LocalCache(max_bytes, [self.hot, self.warm])
        self.cache = TimelineCache(settings, self.hot, self.warm, local=self.local)

    def round_trips(self) -> int:
        return self.hot.writes + self.warm.writes

    async def live(self) -> bool:
        return self.local.live

    async def close(self) -> None:
        await self.local.close()
        await self.hot.close()
        await self.warm.close()


@pytest_asyncio.fixture
async def reader(settings: Settings) -> AsyncIterator[Reader]:
    tracked = Reader(settings)
    tracked.local.start()
    await eventually(tracked.live)
    yield tracked
    await tracked.close()


async def invalidated_after(reader: Reader, seen: int) -> None:
    async def arrived() -> bool:
        return reader.local.invalidations > seen

    await eventually(arrived)


async def test_a_read_entry_is_served_again_without_redis(
    reader: Reader, redis_roles: dict[str, FastRedis]
) -> None:
    user = new_user()
    stored = entry(user)
    await redis_roles["hot"].set(keys.timeline("hot", user), stored, px=300_000)
    assert await reader.cache.read(user) == ("hot", stored)
    trips = reader.round_trips()
    for _ in range(5):
        assert await reader.cache.read(user) == ("hot", stored)
    assert reader.round_trips() == trips
    assert reader.local.hits == 5


async def test_a_warm_hit_is_copied_and_a_new_hot_entry_replaces_it(
    reader: Reader, redis_roles: dict[str, FastRedis]
) -> None:
    user = new_user()
    warm = entry(user)
    await redis_roles["warm"].set(keys.timeline("warm", user), warm, px=300_000)
    assert await reader.cache.read(user) == ("warm", warm)
    assert await reader.cache.read(user) == ("warm", warm)
    assert reader.local.hits == 1
    # The hot GET that missed is tracked too: a hot entry appearing drops the warm copy.
    seen = reader.local.invalidations
    hot = entry(user)
    await redis_roles["hot"].set(keys.timeline("hot", user), hot, px=300_000)
    await invalidated_after(reader, seen)
    assert await reader.cache.read(user) == ("hot", hot)


async def test_a_write_or_delete_in_redis_is_never_served_stale(
    reader: Reader, redis_roles: dict[str, FastRedis]
) -> None:
    user = new_user()
    key = keys.timeline("hot", user)
    await redis_roles["hot"].set(key, entry(user), px=300_000)
    await reader.cache.read(user)
    seen = reader.local.invalidations
    newer = entry(user)
    await redis_roles["hot"].set(key, newer, px=300_000)
    await invalidated_after(reader, seen)
    assert await reader.cache.read(user) == ("hot", newer)
    assert await reader.cache.read(user) == ("hot", newer)  # copied again
    seen = reader.local.invalidations
    await redis_roles["hot"].delete(key)
    await invalidated_after(reader, seen)
    assert await reader.cache.read(user) is None


async def test_an_expiry_in_redis_or_in_the_stamp_ends_the_copy(
    reader: Reader, redis_roles: dict[str, FastRedis]
) -> None:
    user, other = new_user(), new_user()
    # Redis expires the key: its invalidation drops the copy.
    await redis_roles["hot"].set(keys.timeline("hot", user), entry(user), px=150)
    assert await reader.cache.read(user) is not None

    async def gone() -> bool:
        return await reader.cache.read(user) is None

    await eventually(gone)
    # The stamp expires first (Redis still holds the key): the copy is not served past it.
    stamped = entry(other, expires_in_ms=300)
    await redis_roles["hot"].set(keys.timeline("hot", other), stamped, px=300_000)
    assert await reader.cache.read(other) == ("hot", stamped)

    async def expired() -> bool:
        return reader.local.get(other) is None

    await eventually(expired)
    trips = reader.round_trips()
    assert await reader.cache.read(other) == ("hot", stamped)  # from Redis, not copied again
    assert reader.round_trips() > trips
    assert reader.local.get(other) is None


async def test_an_invalidation_during_a_get_in_flight_keeps_its_reply_out(
    reader: Reader, redis_roles: dict[str, FastRedis]
) -> None:
    user = new_user()
    key = keys.timeline("hot", user)
    old = entry(user)
    await redis_roles["hot"].set(key, old, px=300_000)
    local = reader.local
    ticket = local.begin(user)
    assert ticket is not None
    # The GET goes out tracked; its reply is "in flight" until finish() sees it.
    caching, stored = await reader.hot.pipeline([(b"CLIENT", b"CACHING", b"yes"), (b"GET", key)])
    assert caching == b"OK" and stored == old
    seen = local.invalidations
    newer = entry(user)
    await redis_roles["hot"].set(key, newer, px=300_000)
    await invalidated_after(reader, seen)
    local.finish(user, ticket, ("hot", stored))
    assert local.get(user) is None
    assert await reader.cache.read(user) == ("hot", newer)
    # Our own writes drop the copy and any reply in flight without waiting for the message.
    ticket = local.begin(user)
    assert ticket is not None
    local.forget(user)
    local.finish(user, ticket, ("hot", newer))
    assert local.get(user) is None


async def test_a_killed_tracking_connection_flushes_the_copy_until_tracking_is_back(
    reader: Reader, redis_roles: dict[str, FastRedis]
) -> None:
    user = new_user()
    key = keys.timeline("hot", user)
    await redis_roles["hot"].set(key, entry(user), px=300_000)
    await reader.cache.read(user)
    assert len(reader.local) == 1
    old_id, flushes = reader.local.tracking_id, reader.local.flushes
    assert await redis_roles["hot"].execute(b"CLIENT", b"KILL", b"ID", old_id) == 1

    async def flushed() -> bool:
        return reader.local.flushes > flushes

    await eventually(flushed)
    assert len(reader.local) == 0

    async def tracked_again() -> bool:
        return reader.local.live and reader.local.tracking_id != old_id

    await eventually(tracked_again)
    newer = entry(user)
    await redis_roles["hot"].set(key, newer, px=300_000)
    assert await reader.cache.read(user) == ("hot", newer)
    seen = reader.local.invalidations
    newest = entry(user)
    await redis_roles["hot"].set(key, newest, px=300_000)  # invalidation on the new connection
    await invalidated_after(reader, seen)
    assert await reader.cache.read(user) == ("hot", newest)


async def test_a_read_connection_that_reconnects_loses_the_copy_until_tracked_again(
    reader: Reader, redis_roles: dict[str, FastRedis]
) -> None:
    user = new_user()
    key = keys.timeline("hot", user)
    await redis_roles["hot"].set(key, entry(user), px=300_000)
    await reader.cache.read(user)
    read_id = await reader.hot.execute(b"CLIENT", b"ID")
    await redis_roles["hot"].execute(b"CLIENT", b"KILL", b"ID", read_id)

    async def dropped() -> bool:
        return not reader.hot.is_connected

    await eventually(dropped)
    assert len(reader.local) == 0 and not reader.local.live
    await eventually(reader.live)  # the new connection is tracked again
    newer = entry(user)
    await redis_roles["hot"].set(key, newer, px=300_000)
    assert await reader.cache.read(user) == ("hot", newer)
    seen = reader.local.invalidations
    newest = entry(user)
    await redis_roles["hot"].set(key, newest, px=300_000)
    await invalidated_after(reader, seen)
    assert await reader.cache.read(user) == ("hot", newest)


async def test_a_flush_in_redis_drops_the_copy_and_a_quiet_subscriber_is_pinged(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    tracked = Reader(settings)
    tracked.local.heartbeat_s = 0.05
    tracked.local.start()
    try:
        await eventually(tracked.live)
        user = new_user()
        await redis_roles["hot"].set(keys.timeline("hot", user), entry(user), px=300_000)
        await tracked.cache.read(user)
        assert len(tracked.local) == 1
        flushes, tracking_id = tracked.local.flushes, tracked.local.tracking_id
        await redis_roles["hot"].execute(b"FLUSHDB")  # Redis says: every key (nil)

        async def flushed() -> bool:
            return tracked.local.flushes > flushes

        await eventually(flushed)
        assert len(tracked.local) == 0 and await tracked.cache.read(user) is None

        async def pinged() -> bool:
            return tracked.local.heartbeats >= 3

        await eventually(pinged)
        assert tracked.local.live and tracked.local.tracking_id == tracking_id
    finally:
        await tracked.close()


async def test_the_copy_stays_within_its_byte_budget(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    tracked = Reader(settings, max_bytes=64 << 10)
    tracked.local.start()
    try:
        await eventually(tracked.live)
        users = [new_user() for _ in range(60)]
        for user in users:
            await redis_roles["hot"].set(keys.timeline("hot", user), entry(user), px=300_000)
            await tracked.cache.read(user)
            assert tracked.local.size <= 64 << 10
        assert 0 < len(tracked.local) < len(users)
        assert tracked.local.get(users[-1]) is not None
        assert tracked.local.get(users[0]) is None  # least recently read went first
    finally:
        await tracked.close()


async def test_the_api_serves_hits_locally_and_a_delete_is_seen_at_once(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    user = new_user()
    stored = entry(user)
    await redis_roles["hot"].set(keys.timeline("hot", user), stored, px=300_000)
    async with serve_api(settings.with_overrides(api_local_cache_mb=8)) as api:
        local = api.app[RUNTIME].cache._local
        assert isinstance(local, LocalCache)

        async def live() -> bool:
            return local.live

        await eventually(live)
        first = await api.call("GET", f"/api/cache/{user}")
        second = await api.call("GET", f"/api/cache/{user}")
        assert first.status == second.status == 200
        assert first.headers["ETag"] == second.headers["ETag"]
        assert local.hits == 1
        assert (await api.call("DELETE", f"/api/cache/{user}/timeline")).status == 200
        after = await api.call("GET", f"/api/cache/{user}")  # read-through: a new entry
        assert after.status == 200 and after.headers["ETag"] != first.headers["ETag"]


def test_the_setting_is_validated_and_off_at_zero_or_on_a_cluster(settings: Settings) -> None:
    assert load_settings({"API_LOCAL_CACHE_MB": "64"}).api_local_cache_mb == 64
    for bad in ("-1", "lots", "5000"):
        with pytest.raises(ConfigError, match="API_LOCAL_CACHE_MB"):
            load_settings({"API_LOCAL_CACHE_MB": bad})
    clients = {
        "hot": FastRedis(settings.redis_url, settings.db_hot),
        "warm": FastRedis(settings.redis_url, settings.db_warm),
    }
    assert make_local_cache(settings.with_overrides(api_local_cache_mb=0), dict(clients)) is None
    cluster = settings.with_overrides(redis_cluster_mode=True)
    assert make_local_cache(cluster, dict(clients)) is None
    local = make_local_cache(settings.with_overrides(api_local_cache_mb=8), dict(clients))
    assert local is not None and local.max_bytes == 8 << 20
