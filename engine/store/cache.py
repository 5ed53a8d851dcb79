"""The two cache tiers: read, status, guarded store and invalidation.

Entries are the ready response body of GET /api/cache/{userId} (gzip-compressed when
CACHE_COMPRESSION=gzip), stamped when encoded with a new entity tag and the time the entry
expires, so that a read answers ETag and Cache-Control from fixed offsets without computing
anything (engine/store/entry.py). Every invalidation bumps a per-user generation; a store
carries the generation it saw before fetching and is dropped by a script if the generation
moved, so an invalidation always wins over a fetch that was in flight when it arrived.

The same scripts keep the strategies' per-shard indexes (engine/strategies) in step with the
entries: the expiry index (when each user's entry expires) and the unread marks of
prefetched entries (usefulness: was it read before it expired?).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine import tracing
from engine.errors import RedisReplyError, redis_reply_error
from engine.settings import Settings
from engine.store import keys
from engine.store.client import RedisClient
from engine.store.entry import compress, new_tag, stamp
from engine.store.fastredis import Script

if TYPE_CHECKING:
    from engine.store.local_cache import LocalCache

# Generations outlive any fetch by far; expiring them keeps idle users from costing memory.
GENERATION_TTL_MS = 3_600_000

# Before a GET on a read connection in tracking OPTIN mode: Redis tracks that GET's key.
_CACHING_YES = (b"CLIENT", b"CACHING", b"yes")
_GUARDED_SET = Script.load(__file__, "guarded_set.lua")
_INVALIDATE = Script.load(__file__, "invalidate.lua")


def wall_clock_ms() -> int:
    """Epoch milliseconds now (the default clock of everything that writes index times)."""
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Ticket:
    """What a prefetch saw before fetching: whether hot is fresh, and the target's generation.

    `origin` (engine.broker.jobs.ORIGINS) marks the stored entry as prefetched and unread until
    a read serves it; None for a body that is served at once (read-through).
    """

    hot_fresh: bool
    generation: bytes
    origin: str | None = None


@dataclass(frozen=True, slots=True)
class Stored:
    """The outcome of a store: true when it landed.

    `replaced` is the origin of a prefetched entry that nobody read and that this store
    replaced (a wasted prefetch), else None.
    """

    stored: bool
    replaced: str | None = None

    def __bool__(self) -> bool:
        return self.stored


def _index_keys(tier: str, user_id: str) -> list[str]:
    shard = keys.shard_of(user_id)
    return [
        keys.timeline(tier, user_id),
        keys.generation(tier, user_id),
        keys.expiry_index(tier, shard),
        keys.unread_index(tier, shard),
        keys.unread_origin(tier, shard),
    ]


class TimelineCache:
    """Hot and warm tiers over two (possibly identical) Redis connections."""

    def __init__(
        self,
        settings: Settings,
        hot: RedisClient,
        warm: RedisClient,
        clock: Callable[[], int] = wall_clock_ms,
        local: LocalCache | None = None,
    ) -> None:
        self._settings = settings
        self._local = local  # the API's tracked copy of recent reads (engine.store.local_cache)
        self._conn = {"hot": hot, "warm": warm}
        self._compress = settings.cache_compression == "gzip"
        self._clock = clock  # epoch ms written to the expiry index (a replay injects its own)

    @property
    def settings(self) -> Settings:
        """The settings the tiers were made with (their TTLs)."""
        return self._settings

    def encode(self, body: bytes, tier: str, ttl_ms: int | None = None) -> bytes:
        """The stored form of a response body for `tier`: compressed (CACHE_COMPRESSION) and
        stamped with a new entity tag and the time the entry will expire (wall clock: it is
        what clients are told, whatever clock the indexes run on). `ttl_ms` defaults to the
        tier's."""
        encoded = compress(body) if self._compress else body
        ttl = self._settings.ttl_ms(tier) if ttl_ms is None else ttl_ms
        return stamp(encoded, new_tag(), wall_clock_ms() + ttl)

    async def read(self, user_id: str) -> tuple[str, bytes] | None:
        """(tier, stored bytes) of the freshest entry, hot first; None when neither has one."""
        if tracing.tracer is not None:
            return await self._traced_read(user_id)
        local = self._local
        if local is not None:
            found = local.get(user_id)
            if found is not None:
                return found
            ticket = local.begin(user_id)
            if ticket is not None:
                return await self._tracked_read(local, ticket, user_id)
        # The product's hot path: no frame between the view and the GETs (hence the twin).
        stored = await self._conn["hot"].get(keys.timeline("hot", user_id))
        if stored is not None:
            return "hot", stored
        stored = await self._conn["warm"].get(keys.timeline("warm", user_id))
        if stored is not None:
            return "warm", stored
        return None

    def copied(self, user_id: str) -> tuple[str, bytes] | None:
        """(tier, stored bytes) from the API's local copy (API_LOCAL_CACHE_MB) when it holds
        a valid one for the user, else None (no copy, or no local copy at all): a read that
        needs no Redis."""
        local = self._local
        return None if local is None else local.get(user_id)

    def send_get(self, tier: str, user_id: str) -> asyncio.Future[Any] | None:
        """The GET of the user's entry in `tier`, sent without waiting: the future of its raw
        reply (bytes, None, or an error reply as a value). None when a read must go through
        `read`: tracing, the local copy, or no live connection."""
        if self._local is not None:
            return None
        return self._conn[tier].send_now(b"GET", keys.timeline(tier, user_id))

    async def _tracked_read(
        self, local: LocalCache, ticket: int, user_id: str
    ) -> tuple[str, bytes] | None:
        """`read` from Redis with each GET tracked (CLIENT CACHING yes), the result copied."""
        found: tuple[str, bytes] | None = None
        try:
            for tier in keys.TIERS:
                _, stored = await self._conn[tier].pipeline(
                    [_CACHING_YES, (b"GET", keys.timeline(tier, user_id))]
                )
                if isinstance(stored, Exception):
                    raise stored
                if stored is not None:
                    found = tier, stored
                    break
        finally:
            local.finish(user_id, ticket, found)
        return found

    async def _traced_read(self, user_id: str) -> tuple[str, bytes] | None:
        with tracing.span("cache.read", attributes={"prefetch.user_id": user_id}) as span:
            found: tuple[str, bytes] | None = None
            for tier in keys.TIERS:
                stored = await self._conn[tier].get(keys.timeline(tier, user_id))
                if stored is not None:
                    found = tier, stored
                    break
            if span is not None:
                span.set_attribute("prefetch.tier", found[0] if found else "miss")
            return found

    async def status(self, user_id: str) -> tuple[str, int] | None:
        """(tier, remaining ms) of the entry that a read would serve, or None."""
        for tier in keys.TIERS:
            ttl = await self._conn[tier].pttl(keys.timeline(tier, user_id))
            if ttl >= 0:
                return tier, ttl
            if ttl == -1:  # no expiry should never happen; report it as a full TTL
                return tier, self._settings.ttl_ms(tier)
        return None

    async def begin(
        self, user_id: str, tier: str, *, check_hot: bool = True, origin: str | None = None
    ) -> Ticket:
        """Read, before fetching, the hot entry's existence and the target tier's generation."""
        hot, target = self._conn["hot"], self._conn[tier]
        hot_key, gen_key = keys.timeline("hot", user_id), keys.generation(tier, user_id)
        if not check_hot:
            exists, gen = 0, await target.get(gen_key)
        elif target is hot:
            exists, gen = await hot.pipeline([("EXISTS", hot_key), ("GET", gen_key)])
        else:
            # Two databases, two connections: both commands in flight at once, so that the
            # job waits one round trip, not two, before its fetch.
            exists, gen = await _both(
                hot.send_now(b"EXISTS", hot_key) or hot.execute(b"EXISTS", hot_key),
                target.send_now(b"GET", gen_key) or target.get(gen_key),
            )
        if isinstance(exists, Exception):
            raise exists
        if isinstance(gen, Exception):
            raise gen
        return Ticket(hot_fresh=bool(exists), generation=gen or b"", origin=origin)

    async def store(
        self, tier: str, user_id: str, body: bytes, ticket: Ticket, ttl_ms: int | None = None
    ) -> Stored:
        """Store an encoded entry unless the user was invalidated since `ticket`.

        The entry's expiry (after `ttl_ms`, by default the tier's TTL) goes into the tier's
        expiry index in the same atomic step.
        """
        ttl = self._settings.ttl_ms(tier) if ttl_ms is None else ttl_ms
        try:
            reply = await self._conn[tier].evalsha_or_eval(
                _GUARDED_SET,
                _index_keys(tier, user_id),
                [body, ttl, ticket.generation, user_id, self._clock() + ttl, ticket.origin or ""],
            )
        finally:
            # Redis's invalidation message may trail our next read: drop the copy (and any
            # read in flight) once the write has landed.
            if self._local is not None:
                self._local.forget(user_id)
        if reply[0] != 1:
            return Stored(False)
        replaced = reply[1]
        return Stored(True, replaced.decode() if isinstance(replaced, bytes) else None)

    async def invalidate(self, user_id: str) -> None:
        """Drop both tiers' entries and index members, bump their generations (in flight
        fetches lose)."""
        try:
            await asyncio.gather(
                *(
                    self._conn[tier].evalsha_or_eval(
                        _INVALIDATE, _index_keys(tier, user_id), [GENERATION_TTL_MS, user_id]
                    )
                    for tier in keys.TIERS
                )
            )
        finally:
            if self._local is not None:  # as in `store`
                self._local.forget(user_id)

    async def exists(self, user_id: str) -> bool:
        """Whether either tier holds an entry for the user."""
        for tier in keys.TIERS:
            if await self._conn[tier].execute("EXISTS", keys.timeline(tier, user_id)):
                return True
        return False


async def _both(first: Awaitable[Any], second: Awaitable[Any]) -> tuple[Any, Any]:
    """Both replies, each awaited even when the other failed (an error as its value, a
    refusal as RedisRefused): no reply future is left with an exception nobody retrieved."""
    replies: list[Any] = []
    for pending in (first, second):
        try:
            reply = await pending
        except Exception as exc:  # RedisUnavailable, or a reply error `execute` raised
            reply = exc
        replies.append(redis_reply_error(reply) if isinstance(reply, RedisReplyError) else reply)
    return replies[0], replies[1]
