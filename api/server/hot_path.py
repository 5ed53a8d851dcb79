"""The connection side of api.hot_read: taking a parsed read off aiohttp's connection loop.

aiohttp's `RequestHandler.data_received` parses what arrives into (message, payload) pairs,
queues them, and wakes the connection's loop (`start`, parked on `_waiter`), which makes a
request object, a task and a response for each. For a connection whose loop is parked with
nothing queued, this class holds the wake-up back while aiohttp parses (so aiohttp's own
parser, limits and error answers stay the authority), and when what was parsed is one message
that api.hot_read accepts, takes it off the queue and answers it from the Redis reply's
callback. A message the hot read gives back (a miss, an error) is queued as aiohttp would have
queued it, and the loop is woken: the app answers it.

Order and flow on the connection are kept: while a read is taken, what arrives is held (and
reading paused past HOLD_LIMIT bytes) and fed through `data_received` once the read is
answered or queued, so a pipelined request is answered after the one before it. The taken
message frees its parser slot only once answered (aiohttp frees it when its loop takes a
message); the keep-alive deadline moves with each taken read, as the loop moves it; and a
shutdown waits for a taken read as aiohttp waits for a request in progress.

Leans on aiohttp's internals like api.server.connections (the same pin, the same test
module): RequestHandler's `_waiter`, `_messages`, `_parser`, `_upgraded`,
`_request_in_progress`, `_payload_parser`, `_force_close`, `_close`,
`_next_keepalive_close_time` and `_keepalive_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any, Final

from aiohttp.http import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler

from api.hot_read import HotRead, HotReads

log = logging.getLogger("api.server")

# Bytes held for a connection while its taken read is answered, past which reading pauses.
HOLD_LIMIT: Final = 64 * 1024
_HOT_START: Final = b"GET /api/cache/"


class HotPathHandler(RequestHandler):
    """aiohttp's connection protocol, taking the plain cached reads off its loop."""

    __slots__ = ("_held", "_held_bytes", "_held_paused", "_hot_busy", "_hot_over", "_hot_reads")

    def __init__(self, manager: Any, *, hot_reads: HotReads | None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._hot_reads = hot_reads
        self._hot_busy = False  # a taken read is being answered
        self._hot_over: asyncio.Future[None] | None = None  # set by a shutdown waiting for it
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._held_paused = False

    def data_received(self, data: bytes) -> None:
        if self._hot_busy:
            self._hold(data)
            return
        reads = self._hot_reads
        waiter = self._waiter
        if (
            reads is None
            or not data.startswith(_HOT_START)
            or waiter is None
            or waiter.done()
            or self._messages
            or self._request_in_progress
            or self._payload_parser is not None
            or self._upgraded
            or self._force_close
            or self._close
        ):
            super().data_received(data)
            return
        # The loop is parked with nothing queued: parse without waking it, then decide.
        self._waiter = None
        try:
            super().data_received(data)
        finally:
            self._waiter = waiter
        try:
            taken = self._take(reads)
        except Exception:  # a bug of ours must not strand the request: the app answers it
            log.exception("hot read: could not take a request; the app answers it")
            taken = False
        if not taken and self._messages and not waiter.done():
            waiter.set_result(None)

    def _take(self, reads: HotReads) -> bool:
        """Answer the one queued message here if the hot read accepts it."""
        messages = self._messages
        if len(messages) != 1 or self._upgraded:
            return False
        message, payload = messages[0]
        if payload is not EMPTY_PAYLOAD or not isinstance(message, RawRequestMessage):
            return False
        read = reads.accept(message)
        if read is None:
            return False
        if self._answered_from_copy(reads, read):
            messages.popleft()  # answered from the local copy: no Redis reply to wait for
            reads.taken += 1
            if self._parser is not None:
                self._parser.message_consumed()
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
            return True
        reply = reads.send(read)
        if reply is None:
            return False
        messages.popleft()
        reads.taken += 1
        self._hot_busy = True
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        reply.add_done_callback(partial(self._landed, reads, read, message, payload))
        return True

    def _answered_from_copy(self, reads: HotReads, read: HotRead) -> bool:
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        try:
            return reads.answer_copy(read, transport, self._remote)
        except Exception:  # nothing written yet: the app answers (and logs) what failed here
            return False

    def _landed(
        self,
        reads: HotReads,
        read: HotRead,
        message: RawRequestMessage,
        payload: StreamReader,
        reply: asyncio.Future[Any],
    ) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            if not reply.cancelled():
                reply.exception()  # retrieved: the connection is gone, nobody will answer
            self._finish()
            return
        try:
            outcome = reads.landed(read, reply, transport, self._remote)
        except Exception:  # nothing written yet: the app answers (and logs) what failed here
            outcome = False
        if isinstance(outcome, asyncio.Future):  # the next tier is being asked
            outcome.add_done_callback(partial(self._landed, reads, read, message, payload))
            return
        if outcome:
            if self._parser is not None:
                self._parser.message_consumed()
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        else:
            self._messages.append((message, payload))  # the app answers it, in order
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self._finish()

    def _finish(self) -> None:
        """The taken read is over: let a waiting shutdown go on, feed what was held."""
        self._hot_busy = False
        over = self._hot_over
        if over is not None and not over.done():
            over.set_result(None)
        if not self._held:
            return
        data = b"".join(self._held)
        self._held.clear()
        self._held_bytes = 0
        if self._held_paused:
            self._held_paused = False
            if self.transport is not None:
                self.transport.resume_reading()
        if self.transport is not None:
            self.data_received(data)

    def _hold(self, data: bytes) -> None:
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > HOLD_LIMIT and not self._held_paused and self.transport is not None:
            self._held_paused = True
            self.transport.pause_reading()

    def _peername(self) -> Any:
        """The transport's `peername`: (host, port, ...) over TCP, None once it is gone."""
        transport = self.transport
        return transport.get_extra_info("peername") if transport is not None else None

    def _remote(self) -> str | None:
        """The peer's address, as aiohttp's `request.remote` gives it."""
        peer = self._peername()
        if isinstance(peer, (list, tuple)):
            return str(peer[0])
        return None if peer is None else str(peer)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._held.clear()
        self._held_bytes = 0
        super().connection_lost(exc)

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """Wait (up to `timeout`) for a taken read, as aiohttp waits for a request."""
        if self._hot_busy:
            self._hot_over = self._loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._hot_over), timeout)
            except TimeoutError:
                pass
        await super().shutdown(timeout)
