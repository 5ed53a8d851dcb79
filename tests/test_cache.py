"""The cache tiers on a real Redis: storage format, TTLs and the invalidation guard."""

from __future__ import annotations

import gzip
import json
import time
import zlib

import pytest

from engine import wire
from engine.settings import Settings
from engine.store import keys
from engine.store.cache import TimelineCache
from engine.store.entry import compress, decompress, new_tag, stamp, unstamp
from engine.store.fastredis import FastRedis
from sandbox.timeline import generate_posts
from tests.conftest import new_user


def wire_now_ms() -> int:
    return int(time.time() * 1000)


def body_for(user: str, tier: str) -> bytes:
    return wire.cached_body(generate_posts(user, 100), 1_700_000_000_000, tier, cached=True)


@pytest.fixture
def cache(settings: Settings, redis_roles: dict[str, FastRedis]) -> TimelineCache:
    """The two tiers on their own databases (REDIS_DB_HOT, REDIS_DB_WARM)."""
    return TimelineCache(settings, redis_roles["hot"], redis_roles["warm"])


def test_gzip_round_trips_and_plain_bytes_pass_through() -> None:
    body = body_for(new_user(), "hot")
    packed = compress(body)
    assert packed[:2] == b"\x1f\x8b"
    assert len(packed) < len(body) / 2
    assert decompress(packed) == body
    assert decompress(body) == body


def test_a_stamped_gzip_entry_is_still_one_standard_gzip_member() -> None:
    body = body_for(new_user(), "hot")
    tag = new_tag()
    stored = stamp(compress(body), tag, 1_764_000_123_456)
    assert stored[:4] == b"\x1f\x8b\x08\x08"  # FNAME flag set
    for decoder in (gzip.decompress, lambda b: zlib.decompress(b, wbits=31), decompress):
        assert decoder(stored) == body
    parts = unstamp(stored)
    assert (parts.gzip, parts.tag, parts.expires_at) == (True, tag, 1_764_000_123_456)
    assert parts.payload is stored  # what goes out to a gzip client is the stored object


def test_a_stamped_plain_entry_serves_its_json_after_the_stamp() -> None:
    body = body_for(new_user(), "warm")
    tag = new_tag()
    stored = stamp(body, tag, 42)
    parts = unstamp(stored)
    assert (parts.gzip, parts.tag, parts.expires_at) == (False, tag, 42)
    assert bytes(parts.payload) == body == decompress(stored)


def test_entries_without_a_stamp_are_served_as_they_are() -> None:
    body = body_for(new_user(), "warm")
    for stored in (body, compress(body)):
        parts = unstamp(stored)
        assert parts.payload is stored and parts.tag is None and parts.expires_at == 0
    assert new_tag() != new_tag()
    with pytest.raises(ValueError, match="16 hex digits"):
        stamp(body, "short", 1)
    with pytest.raises(ValueError, match="optional header"):
        stamp(stamp(compress(body), new_tag(), 1), new_tag(), 1)


async def test_an_entry_is_the_ready_response_body(
    settings: Settings, redis_roles: dict[str, FastRedis], cache: TimelineCache
) -> None:
    user = new_user()
    ticket = await cache.begin(user, "hot")
    assert not ticket.hot_fresh
    assert await cache.store("hot", user, cache.encode(body_for(user, "hot"), "hot"), ticket)
    tier, stored = await cache.read(user) or ("", b"")
    parsed = json.loads(decompress(stored))
    assert tier == "hot"
    # Stamped when encoded: a tag, and an expiry no later than Redis's own.
    stamped = unstamp(stored)
    assert stamped.tag is not None and stamped.gzip
    pttl = await redis_roles["hot"].execute("PTTL", keys.timeline("hot", user))
    assert 0 < stamped.expires_at - wire_now_ms() <= pttl + 50
    assert parsed["success"] is True
    assert parsed["meta"] == {"cached": True, "tier": "hot", "fetchedAt": 1_700_000_000_000}
    assert parsed["data"]["postsCount"] == 100
    assert (await cache.begin(user, "hot")).hot_fresh
    status = await cache.status(user)
    assert status is not None and status[0] == "hot"
    assert settings.hot_ttl_ms - 2_000 < status[1] <= settings.hot_ttl_ms


async def test_hot_wins_over_warm_and_warm_keeps_its_own_ttl(
    settings: Settings, cache: TimelineCache
) -> None:
    user = new_user()
    await cache.store("warm", user, body_for(user, "warm"), await cache.begin(user, "warm"))
    status = await cache.status(user)
    assert status is not None and status[0] == "warm" and status[1] > settings.hot_ttl_ms
    await cache.store("hot", user, body_for(user, "hot"), await cache.begin(user, "hot"))
    assert (await cache.read(user) or ("", b""))[0] == "hot"


async def test_a_store_that_began_before_an_invalidation_is_dropped(
    cache: TimelineCache,
) -> None:
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


async def test_a_warm_job_reads_the_hot_entry_and_the_warm_generation(
    redis_roles: dict[str, FastRedis], cache: TimelineCache
) -> None:
    # Two databases: begin sends both reads at once; each reply must land in its own field.
    user = new_user()
    first = await cache.begin(user, "warm")
    assert not first.hot_fresh and first.generation == b""
    await cache.invalidate(user)  # bumps the generations
    await cache.store("hot", user, body_for(user, "hot"), await cache.begin(user, "hot"))
    ticket = await cache.begin(user, "warm")
    warm_generation = await redis_roles["warm"].get(keys.generation("warm", user))
    assert ticket.hot_fresh and warm_generation and ticket.generation == warm_generation
    assert not (await cache.begin(user, "warm", check_hot=False)).hot_fresh
