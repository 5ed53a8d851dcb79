"""One socket of FastRedis: buffers commands, writes them once per loop iteration, and matches
replies to callers FIFO.

Apart from engine.store.fastredis because it is the part that knows nothing of commands or
of reconnecting: it takes packed bytes, hands back hiredis's raw replies (an error reply as
a `RedisReplyError` value, not raised), and when anything goes wrong (the socket closes, the
stream is garbled, a reply is missing for `timeout`) it fails every command in flight with
`RedisUnavailable` and is done for good. FIFO matching can no longer be trusted after any of
those, so the client dials a new one instead of repairing this one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

import hiredis

from engine.errors import RedisReplyError, RedisUnavailable

_NOT_ENOUGH_DATA: Final = object()
# Reads are fed to hiredis in pieces of at most this many bytes (see data_received).
FEED_PIECE: Final = 32 * 1024


@dataclass(slots=True)
class ConnectionStats:
    """Shared by every connection a client opens, so its figures outlive each one."""

    writes: int = 0
    # Called once whenever a connection closes, for whatever reason (see on_disconnect).
    listeners: list[Callable[[], None]] = field(default_factory=list)


class Connection(asyncio.Protocol):
    """One socket: buffers commands, flushes once per loop iteration, matches replies FIFO."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout: float | None, stats: ConnectionStats
    ):
        self._loop = loop
        self._timeout = timeout
        self._stats = stats
        self._reader = hiredis.Reader(replyError=RedisReplyError, notEnoughData=_NOT_ENOUGH_DATA)
        self._transport: asyncio.Transport | None = None
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._deadlines: deque[float] = deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._lost: asyncio.Future[None] = loop.create_future()
        self.closed = False

    @property
    def in_flight(self) -> int:
        """How many commands await a reply."""
        return len(self._pending)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def send(self, payload: bytes) -> asyncio.Future[Any]:
        """Queue one packed command; the returned future gets its raw reply."""
        loop = self._loop
        fut: asyncio.Future[Any] = loop.create_future()
        if self.closed:
            fut.set_exception(RedisUnavailable("Redis connection is closed"))
            return fut
        self._pending.append(fut)
        self._out.append(payload)
        if self._timeout is not None:
            deadline = loop.time() + self._timeout
            self._deadlines.append(deadline)
            if self._timer is None:
                self._timer = loop.call_at(deadline, self._check_deadline)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out or self._transport is None:
            return
        self._transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        self._stats.writes += 1

    def data_received(self, data: bytes) -> None:
        # hiredis trims its buffer after every reply of a read (a memmove of all that is left
        # in it), so one large read full of large replies cost time quadratic in its size: 64
        # replies of 9 KB took 6.2 µs each fed whole, 1.2 fed in pieces (tuning.md).
        size = len(data)
        if size <= FEED_PIECE:
            self._reader.feed(data)
            self._deliver()
            return
        for offset in range(0, size, FEED_PIECE):
            self._reader.feed(data, offset, min(FEED_PIECE, size - offset))
            if not self._deliver():
                return

    def _deliver(self) -> bool:
        """Hand every complete reply in the reader to its caller; False if this failed us."""
        reader = self._reader
        pending = self._pending
        deadlines = self._deadlines
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(f"Redis protocol error: {exc}")
                return False
            if reply is _NOT_ENOUGH_DATA:
                return True
            if not pending:
                self.fail("Redis sent a reply nobody asked for")
                return False
            fut = pending.popleft()
            if deadlines:
                deadlines.popleft()
            if not fut.done():
                fut.set_result(reply)

    def _check_deadline(self) -> None:
        self._timer = None
        if self.closed or not self._deadlines:
            return
        head = self._deadlines[0]
        if head > self._loop.time() + 0.001:
            self._timer = self._loop.call_at(head, self._check_deadline)
            return
        self.fail(f"Redis did not answer within {self._timeout} s")

    def fail(self, reason: str) -> None:
        """Drop the connection and fail everything in flight with `RedisUnavailable`."""
        if self.closed:
            return
        self.closed = True
        self._out.clear()
        for listener in self._stats.listeners:
            listener()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, deque()
        self._deadlines.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(RedisUnavailable(reason))
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.fail(f"connection to Redis lost: {exc or 'closed by the server'}")
        if not self._lost.done():
            self._lost.set_result(None)

    async def close(self) -> None:
        """Fail what is in flight, close the socket and wait (briefly) until it is gone."""
        transport = self._transport
        self.fail("Redis client closed")
        if transport is not None:
            await asyncio.wait([self._lost], timeout=1.0)
