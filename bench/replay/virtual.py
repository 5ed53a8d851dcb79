"""Virtual time's plumbing for the simulation: expiry, the upstream, key shards, latency.

- `VirtualExpiry`: Redis keeps an entry for its TTL in real time, which the virtual clock
  outruns; entries whose virtual expiry (the expiry-index score the store script wrote with
  the virtual clock) has passed are deleted before anything looks at them (expire.lua).
- `SimUpstream`: the timeline service, answering at once and counting fetches.
- `key_shards`: the simulation's key shard count (see simulation.py).
- `Latency` and `calibrate`: the modelled read latencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

from engine import wire
from engine.metrics.daily import StatsRecorder
from engine.prefetcher import Prefetcher
from engine.settings import Settings
from engine.store import keys
from engine.store.cache import TimelineCache
from engine.store.fastredis import Arg, FastRedis, Script
from engine.strategies.shards import eval_many
from sandbox.posts import generate_posts

POSTS_PER_ENTRY = 5  # small bodies: the simulation measures policy, not bytes
# A batch job on a shared machine: a slow answer is waited for, not a failure.
REDIS_TIMEOUT_S = 120.0
_EXPIRE = Script.load(__file__, "expire.lua")


@contextlib.contextmanager
def key_shards(count: int) -> Iterator[None]:
    """Run with `count` key shards instead of keys.SHARDS (see the module docstring)."""
    saved = keys.SHARDS
    keys.SHARDS = count
    try:
        yield
    finally:
        keys.SHARDS = saved


class SimUpstream:
    """The timeline service of the simulation: answers at once and counts its fetches."""

    def __init__(self) -> None:
        self.fetches = 0
        self._posts: dict[str, list[wire.Post]] = {}

    async def fetch(self, user_id: str) -> list[wire.Post]:
        """The user's posts (the same every time)."""
        self.fetches += 1
        posts = self._posts.get(user_id)
        if posts is None:
            posts = self._posts[user_id] = generate_posts(user_id, POSTS_PER_ENTRY)
        return posts


class VirtualExpiry:
    """Deletes entries whose virtual expiry has passed, before anything looks at them."""

    def __init__(self, redis: Mapping[str, FastRedis]) -> None:
        self._redis = redis

    async def apply(self, users: list[tuple[str, int]]) -> list[dict[str, float]]:
        """Expire the dead entries of (user, at) pairs; each live entry's expiry by tier."""
        out: list[dict[str, float]] = [{} for _ in users]

        async def tier(name: str) -> None:
            calls: list[tuple[list[str], list[Arg]]] = [
                (
                    [keys.timeline(name, user), keys.expiry_index(name, keys.shard_of(user))],
                    [at, user],
                )
                for user, at in users
            ]
            replies = await eval_many(self._redis[name], _EXPIRE, calls)
            for live, reply in zip(out, replies, strict=True):
                if reply is not None:
                    live[name] = float(reply)

        if users:
            await asyncio.gather(*(tier(name) for name in keys.TIERS))
        return out


@dataclass(frozen=True, slots=True)
class Latency:
    """Modelled read latencies (ms): the simulation runs reads concurrently, so it does not
    time them one by one; `calibrate` measures one hit and one read-through on this Redis."""

    hit_ms: float = 0.2
    miss_ms: float = 50.2


async def calibrate(settings: Settings, redis: FastRedis, upstream_ms: float) -> Latency:
    """Median time of one cache hit and of one read-through (plus `upstream_ms`) here."""
    roles = {"hot": redis, "warm": redis, "queue": redis, "metrics": redis}
    cache = TimelineCache(settings, roles["hot"], roles["warm"])
    stats = StatsRecorder(redis, settings.metrics_retention_days)
    prefetcher = Prefetcher(cache, cast(Any, SimUpstream()), stats)
    misses: list[float] = []
    for i in range(50):
        started = time.perf_counter()
        await prefetcher.read_through(f"00000000-ca11-4000-8000-{i:012d}")
        misses.append(time.perf_counter() - started)
    hits: list[float] = []
    for _ in range(200):
        started = time.perf_counter()
        await cache.read("00000000-ca11-4000-8000-000000000000")
        hits.append(time.perf_counter() - started)
    hit_ms = sorted(hits)[len(hits) // 2] * 1000
    return Latency(hit_ms, hit_ms + sorted(misses)[len(misses) // 2] * 1000 + upstream_ms)
