"""The cache tiers on a real Redis: storage format, TTLs and the invalidation guard."""

from __future__ import annotations

import json

from engine import wire
from engine.settings import Settings
from engine.store import keys
from engine.store.cache import TimelineCache, compress, decompress
from engine.store.fastredis import FastRedis
from sandbox.timeline import generate_posts
from tests.conftest import new_user


def body_for(user: str, tier: str) -> bytes:
    return wire.cached_body(generate_posts(user, 100), 1_700_000_000_000, tier, cached=True)


def test_gzip_round_trips_and_plain_bytes_pass_through() -> None:
    body = body_for(new_user(), "hot")
    packed = compress(body)
    assert packed[:2] == b"\x1f\x8b"
    assert len(packed) < len(body) / 2
    assert decompress(packed) == body
    assert decompress(body) == body


async def test_an_entry_is_the_ready_response_body(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    cache = TimelineCache(settings, redis_roles["hot"], redis_roles["warm"])
    user = new_user()
    ticket = await cache.begin(user, "hot")
    assert not ticket.hot_fresh
    assert await cache.store("hot", user, cache.encode(body_for(user, "hot")), ticket)
    tier, stored = await cache.read(user) or ("", b"")
    parsed = json.loads(decompress(stored))
    assert tier == "hot"
    assert parsed["success"] is True
    assert parsed["meta"] == {"cached": True, "tier": "hot", "fetchedAt": 1_700_000_000_000}
    assert parsed["data"]["postsCount"] == 100
    assert (await cache.begin(user, "hot")).hot_fresh
    status = await cache.status(user)
    assert status is not None and status[0] == "hot"
    assert settings.hot_ttl_ms - 2_000 < status[1] <= settings.hot_ttl_ms


async def test_hot_wins_over_warm_and_warm_keeps_its_own_ttl(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    cache = TimelineCache(settings, redis_roles["hot"], redis_roles["warm"])
    user = new_user()
    await cache.store("warm", user, body_for(user, "warm"), await cache.begin(user, "warm"))
    status = await cache.status(user)
    assert status is not None and status[0] == "warm" and status[1] > settings.hot_ttl_ms
    await cache.store("hot", user, body_for(user, "hot"), await cache.begin(user, "hot"))
    assert (await cache.read(user) or ("", b""))[0] == "hot"


async def test_a_store_that_began_before_an_invalidation_is_dropped(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    cache = TimelineCache(settings, redis_roles["hot"], redis_roles["warm"])
    user = new_user()
    stale = await cache.begin(user, "warm")
    await cache.invalidate(user)
    assert not await cache.store("warm", user, body_for(user, "warm"), stale)
    assert await cache.read(user) is None
    fresh = await cache.begin(user, "warm")
    assert await cache.store("warm", user, body_for(user, "warm"), fresh)
    assert await cache.exists(user)


async def test_one_db_for_every_tier_still_keeps_tiers_apart(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    one = redis_roles["hot"]
    shared = settings.with_overrides(db_warm=settings.db_hot)
    cache = TimelineCache(shared, one, one)
    user = new_user()
    await cache.store("warm", user, body_for(user, "warm"), await cache.begin(user, "warm"))
    assert await one.execute("EXISTS", keys.timeline("warm", user)) == 1
    assert await one.execute("EXISTS", keys.timeline("hot", user)) == 0
    assert (await cache.read(user) or ("", b""))[0] == "warm"
    await cache.invalidate(user)
    assert await cache.read(user) is None
