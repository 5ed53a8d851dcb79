"""Were prefetched entries read before they expired? (precision, per origin)

Every prefetch but a read-through stores its entry with an *unread mark* (per tier and shard:
a zset user -> expiry and a hash user -> origin, written by the store script with the entry).
A cache hit clears the mark and counts `read:<origin>`: the API's activity flush calls
`count_reads` with the users it served, so the read path itself pays no round trip. A mark
still there when its entry expired is settled by the scheduler's tick (`sweep`) as
`wasted:<origin>`; a store that replaces an unread entry counts it wasted at once
(engine.prefetcher). Both land in the daily metrics hash (GET /api/prefetch/metrics) and in
Prometheus. An invalidation drops the mark: that entry counts neither way.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping

from engine.metrics.daily import StatsRecorder
from engine.store import keys
from engine.store.client import RedisClient
from engine.store.fastredis import Script
from engine.strategies.shards import by_shard, eval_many

_SWEEP = Script.load(__file__, "sweep.lua")
_CONSUME = Script.load(__file__, "consume.lua")

# A read just before expiry reaches Redis with the next activity flush (a second later).
UNREAD_GRACE_MS = 5_000
# Marks settled per shard and tier per tick; the rest wait for the next tick.
SWEEP_LIMIT = 1_000


async def count_reads(
    redis: Mapping[str, RedisClient], served: Mapping[str, set[str]], stats: StatsRecorder
) -> int:
    """Clear the unread marks of entries that reads served (`served`: tier -> users) and
    count them as read by the origin that prefetched them. Returns how many were."""
    total = 0

    async def tier(name: str, users: set[str]) -> None:
        nonlocal total
        calls = [
            ([keys.unread_index(name, shard), keys.unread_origin(name, shard)], group)
            for shard, group in by_shard(users).items()
        ]
        origins: Counter[str] = Counter()
        for reply in await eval_many(redis[name], _CONSUME, calls):
            origins.update(origin.decode() for origin in reply)
        # Counted as soon as this tier's marks are cleared, whatever the other tier does.
        for origin, count in origins.items():
            stats.prefetch_read(origin, count)
        total += sum(origins.values())

    await asyncio.gather(*(tier(name, users) for name, users in served.items() if users))
    return total


async def sweep(redis: Mapping[str, RedisClient], now_ms: int, stats: StatsRecorder | None) -> int:
    """Trim passed expiry-index members and settle the unread marks of expired entries as
    wasted (counted in `stats`). Returns how many were wasted."""
    origins: Counter[str] = Counter()

    async def tier(name: str) -> None:
        calls = [
            (
                [
                    keys.expiry_index(name, shard),
                    keys.unread_index(name, shard),
                    keys.unread_origin(name, shard),
                ],
                [now_ms, UNREAD_GRACE_MS, SWEEP_LIMIT],
            )
            for shard in range(keys.SHARDS)
        ]
        for reply in await eval_many(redis[name], _SWEEP, calls):
            origins.update(origin.decode() for origin in reply)

    await asyncio.gather(*(tier(name) for name in keys.TIERS))
    if stats is not None:
        for origin, count in origins.items():
            stats.prefetch_wasted(origin, count)
    return sum(origins.values())
