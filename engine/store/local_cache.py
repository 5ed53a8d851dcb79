"""The API's local copy of recently read timeline entries, kept correct by Redis itself.

A read served from Redis costs the API a round trip (12-17 µs of CPU, tuning.md "Cached
reads"); a copy in the process costs a dict lookup. The copy is bounded in bytes (LRU) and
invalidated by Redis's client-side caching in RESP2 redirect mode: a connection of our own
(`_Subscriber`) takes `CLIENT ID` and subscribes to `__redis__:invalidate`, and every read
connection runs `CLIENT TRACKING on REDIRECT <id> OPTIN`, so that the GETs sent right after
`CLIENT CACHING yes` (and only those) make Redis name their key on that channel when it is
written, deleted, expires or is evicted (a nil key list: everything was flushed).

Correctness, race by race:
- a GET reply in flight when its key is invalidated: the read marks the user pending before
  sending (`begin`); an invalidation of a pending user makes `finish` drop that reply;
- a lost connection (the subscriber's, or a read connection's, whose tracking state Redis
  forgets): the copy is flushed at once, in-flight replies are dropped (the epoch moves) and
  nothing is copied until tracking is set up again on every read connection;
- expiry: an entry carries its expiry in its stamp; a copy is never served past it, whatever
  Redis has or has not sent (active expiry may lag);
- our own writes (read-through stores, DELETE) drop the copy synchronously (`forget`): the
  invalidation message travels on another socket and may arrive after the next request.
A write by another process is seen once its invalidation arrives: on the same host, within
the event-loop iteration that sees the writer's reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

import hiredis

from engine.errors import RedisReplyError, RedisUnavailable
from engine.store import keys
from engine.store.endpoint import RedisAddress
from engine.store.entry import unstamp
from engine.store.fastredis import RECONNECT_FIRST_S, RECONNECT_MAX_S, FastRedis

log = logging.getLogger(__name__)

CHANNEL: Final = b"__redis__:invalidate"
# What a copied entry costs beyond its bytes (the tuple, the dict slot, the key string).
ENTRY_OVERHEAD: Final = 200
# The subscriber is PINGed after this long without news, and must answer within as long.
HEARTBEAT_S: Final = 1.0
_pack = cast("Callable[[tuple[Any, ...]], bytes]", hiredis.pack_command)


def _ignore(names: list[bytes] | None) -> None:
    pass


class _Subscriber(asyncio.Protocol):
    """The tracking connection: answers AUTH, CLIENT ID and SUBSCRIBE, then only messages."""

    def __init__(self, on_message: Callable[[list[bytes] | None], None]) -> None:
        self._reader = hiredis.Reader(replyError=RedisReplyError)
        self._on_message = on_message
        self._handshake: deque[asyncio.Future[Any]] = deque()
        self._transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def send(self, *commands: tuple[Any, ...]) -> list[asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        if self.lost.done():
            for fut in futures:
                fut.set_exception(RedisUnavailable("tracking connection lost"))
            return futures
        self._handshake.extend(futures)
        if self._transport is not None:
            self._transport.write(b"".join(_pack(c) for c in commands))
        return futures

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                self._on_message(reply[2])
            elif self._handshake:  # AUTH, CLIENT ID, SUBSCRIBE, then PINGs
                fut = self._handshake.popleft()
                if not fut.done():
                    fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        handshake, self._handshake = self._handshake, deque()
        for fut in handshake:
            if not fut.done():
                fut.set_exception(RedisUnavailable(f"tracking connection lost: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)

    def close(self) -> None:
        """Abort the connection; `lost` is done at once (no invalidation is read after)."""
        self._on_message = _ignore
        if self._transport is not None:
            self._transport.abort()
        self.connection_lost(None)


class LocalCache:
    """A byte-bounded LRU of user -> (tier, stored entry), valid while Redis tracks it."""

    def __init__(self, max_bytes: int, readers: Sequence[FastRedis]) -> None:
        self.max_bytes = max_bytes
        self._readers = list({id(r): r for r in readers}.values())
        self._address: RedisAddress = self._readers[0].address
        self._entries: OrderedDict[str, tuple[tuple[str, bytes], int, int]] = OrderedDict()
        self._bytes = 0
        self._pending: dict[str, int] = {}
        self._stale: set[str] = set()
        self._epoch = 0  # moves on every flush: replies in flight across it are dropped
        self.live = False  # tracking is set up on every read connection
        self._losses = 0  # tracking lost (a connection closed) this many times
        self.heartbeat_s = HEARTBEAT_S
        self.heartbeats = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._subscriber: _Subscriber | None = None
        self.tracking_id: int | None = None  # CLIENT ID of the subscriber connection
        self.hits = 0
        self.invalidations = 0
        self.flushes = 0
        for reader in self._readers:
            reader.on_disconnect(self._tracking_lost)

    @property
    def size(self) -> int:
        """Bytes held (entries plus their estimated overhead)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    # The read path: a lookup, and the pending marks around a GET.

    def get(self, user_id: str) -> tuple[str, bytes] | None:
        """The copied (tier, stored) of the user, unless absent or past its stamp's expiry."""
        entry = self._entries.get(user_id)
        if entry is None:
            return None
        if entry[1] <= time.time() * 1000:
            self._drop(user_id)
            return None
        self._entries.move_to_end(user_id)
        self.hits += 1
        return entry[0]

    def begin(self, user_id: str) -> int | None:
        """Mark a GET of the user as in flight; its ticket for `finish`, or None when nothing
        may be copied now (tracking is not set up)."""
        if not self.live:
            return None
        self._pending[user_id] = self._pending.get(user_id, 0) + 1
        return self._epoch

    def finish(self, user_id: str, ticket: int, found: tuple[str, bytes] | None) -> None:
        """End the GET(s) `begin` marked; copy `found` unless it may be stale by now."""
        left = self._pending.pop(user_id) - 1
        stale = user_id in self._stale
        if left:
            self._pending[user_id] = left
        else:
            self._stale.discard(user_id)
        if found is None or stale or ticket != self._epoch or not self.live:
            return
        expires_at = unstamp(found[1]).expires_at
        if expires_at <= time.time() * 1000:  # unstamped (0) or already expired
            return
        size = len(found[1]) + ENTRY_OVERHEAD
        if size > self.max_bytes // 16:  # one entry must not flush most of the copy
            return
        self._drop(user_id)
        self._entries[user_id] = (found, expires_at, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, _, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted

    def forget(self, user_id: str) -> None:
        """Drop the user's copy, and any reply in flight for them (a write of ours)."""
        self._drop(user_id)
        if user_id in self._pending:
            self._stale.add(user_id)

    def flush(self) -> None:
        """Drop every copy and every reply in flight."""
        self._entries.clear()
        self._bytes = 0
        self._epoch += 1
        self._stale.update(self._pending)
        self.flushes += 1

    def _drop(self, user_id: str) -> None:
        entry = self._entries.pop(user_id, None)
        if entry is not None:
            self._bytes -= entry[2]

    def _invalidated(self, names: list[bytes] | None) -> None:
        if names is None:  # FLUSHDB, FLUSHALL
            self.flush()
            return
        for name in names:
            user_id = keys.timeline_owner(name)
            if user_id is not None:
                self.invalidations += 1
                self.forget(user_id)

    def _tracking_lost(self) -> None:
        self._losses += 1
        if self.live:
            log.info("local cache: tracking lost, copy flushed until it is set up again")
        self.live = False
        self.flush()
        self._changed.set()

    # Tracking: one subscriber connection, and every read connection redirected to it.

    def start(self) -> None:
        """Start setting up (and keeping up) tracking in the background."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._maintain())

    async def close(self) -> None:
        """Stop tracking and drop the copy."""
        self._tracking_lost()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._subscriber is not None:
            self._subscriber.close()
            self._subscriber = None

    async def _maintain(self) -> None:
        failures = 0
        while True:
            try:
                subscriber, client_id = await self._subscribe()
                self._subscriber, self.tracking_id = subscriber, client_id
                while not subscriber.lost.done():
                    self._changed.clear()
                    losses = self._losses
                    for reader in self._readers:
                        await reader.execute(
                            b"CLIENT", b"TRACKING", b"on", b"REDIRECT", client_id, b"OPTIN"
                        )
                    if losses == self._losses and not subscriber.lost.done():
                        self.live = True
                        failures = 0
                    await self._watch(subscriber)
                self._tracking_lost()
            except (RedisUnavailable, RedisReplyError, OSError) as exc:
                self._tracking_lost()
                failures += 1
                log.debug("local cache: cannot set up tracking: %s", exc)
                backoff = min(RECONNECT_MAX_S, RECONNECT_FIRST_S * 2 ** (failures - 1))
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            finally:
                if self._subscriber is not None:
                    self._subscriber.close()
                    self._subscriber = None

    async def _watch(self, subscriber: _Subscriber) -> None:
        """Return when tracking must be set up again, or the subscriber is lost. A heartbeat
        (PING) not answered in time closes the subscriber: a silently dead connection would
        otherwise leave copies that no invalidation can reach."""
        changed: asyncio.Future[Any] = asyncio.ensure_future(self._changed.wait())
        lost: asyncio.Future[Any] = subscriber.lost
        try:
            while True:
                done, _ = await asyncio.wait(
                    [changed, lost], timeout=self.heartbeat_s, return_when="FIRST_COMPLETED"
                )
                if done:
                    return
                try:
                    (pong,) = subscriber.send((b"PING",))
                    await asyncio.wait_for(pong, self.heartbeat_s)
                    self.heartbeats += 1
                except (RedisUnavailable, TimeoutError):
                    log.warning("local cache: tracking connection unresponsive, reconnecting")
                    subscriber.close()
                    return
        finally:
            changed.cancel()

    async def _subscribe(self) -> tuple[_Subscriber, int]:
        loop = asyncio.get_running_loop()
        addr = self._address
        subscriber = _Subscriber(self._invalidated)
        dial: Any
        if addr.path is not None:
            dial = loop.create_unix_connection(lambda: subscriber, addr.path)
        else:
            tls = addr.tls_options.context() if addr.tls else None
            dial = loop.create_connection(
                lambda: subscriber,
                addr.host,
                addr.port,
                ssl=tls,
                server_hostname=addr.host if tls else None,
            )
        try:
            await asyncio.wait_for(dial, self._readers[0].connect_timeout)
            commands: list[tuple[Any, ...]] = []
            if addr.password is not None:
                auth = (addr.username, addr.password) if addr.username else (addr.password,)
                commands.append((b"AUTH", *auth))
            commands += [(b"CLIENT", b"ID"), (b"SUBSCRIBE", CHANNEL)]
            replies = await asyncio.wait_for(
                asyncio.gather(*subscriber.send(*commands)), self._readers[0].connect_timeout
            )
        except BaseException:
            subscriber.close()
            raise
        for reply in replies:
            if isinstance(reply, RedisReplyError):
                subscriber.close()
                raise reply
        return subscriber, int(replies[-2])
