"""The hot read without a request object: a cached timeline answered from the parsed message.

With the front door and the whole-written response (api.front_door, api.raw_response), a
cached read still cost the API ~55 µs against a bare aiohttp handler's ~40: aiohttp builds a
request object, a task, a stream writer and a response per request, and runs the connection
loop's bookkeeping around them. For the read this service exists for, none of that is needed:
api.server hands this module the parsed request message of an idle connection, and when the
request is the plain case, it is answered from a callback on the Redis reply: no coroutine,
no task.

The plain case, decided before anything is sent (`accept`): GET /api/cache/{userId} over
HTTP/1.1 keep-alive, no body, no query, no If-None-Match, a valid user id, and a token whose
verdict is remembered and admits the read (api.auth `allows`). The read then asks the hot
tier, then the warm one (`send`, `landed`). With a local copy (API_LOCAL_CACHE_MB,
engine/store/local_cache.py), a read the copy holds is answered at once instead
(`answer_copy`), and one it does not hold goes to the app, whose tracked read copies it.
Everything else, and every outcome but a hit (a miss, so a read-through; a Redis error or
refusal; no live Redis connection), goes to the app as before, with the same message: its
answer, its errors and their envelopes are the app's.
A hit is answered exactly as the app answers it (api.views_cache.timeline_answer, the same
headers, X-Request-Id as the envelope would set it) and counted as the app counts it (the
hit and tier statistics, the activity batch, the HTTP metrics and access line through
api.access_log.record). tests/test_hot_read.py compares both paths over real connections.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from aiohttp.http import HttpVersion11, RawRequestMessage

from api.access_log import ACCESS_LOGGER, record
from api.appkeys import AUTH, RUNTIME
from api.front_door import PREFIX
from api.middlewares import request_id_from
from api.raw_response import OK_STATUS, send, whole_head
from api.validation import UUID_LENGTH, user_id
from api.views_cache import TIMELINE_ROUTE, accepts_gzip, count_hit, timeline_answer
from engine import tracing
from engine.errors import PrefetchError

_SKIP: Final = len(PREFIX)
_TIERS: Final = ("hot", "warm")


@dataclass(slots=True)
class HotRead:
    """One read taken off the app: who, how to answer, and which tier is being asked."""

    user: str
    path: str
    gzip_ok: bool
    request_id: str
    started: float
    tier: int = 0  # index into _TIERS


class HotReads:
    """The plain case of GET /api/cache/{userId}, for api.server's connections."""

    __slots__ = ("_app", "_sample", "answered", "taken")

    def __init__(self, app: web.Application, access_sample: float) -> None:
        self._app = app
        self._sample = access_sample
        self.taken = 0  # reads taken off aiohttp's loop (tests and benches look)
        self.answered = 0  # of those, answered here

    def accept(self, message: RawRequestMessage) -> HotRead | None:
        """The read to answer here, or None: the app answers `message`."""
        path = message.path
        raw_user = path[_SKIP:]
        if (
            len(raw_user) != UUID_LENGTH
            or message.method != "GET"
            or not path.startswith(PREFIX)
            or message.version != HttpVersion11
            or message.should_close
            or message.upgrade
            or message.chunked
            or tracing.tracer is not None
        ):
            return None
        headers = message.headers
        if "If-None-Match" in headers or headers.get("Content-Length", "0") != "0":
            return None
        try:
            user = user_id(raw_user)
        except PrefetchError:
            return None
        if not self._app[AUTH].allows(headers.get("Authorization"), "read", user):
            return None
        return HotRead(
            user,
            path,
            accepts_gzip(headers.get("Accept-Encoding", "")),
            request_id_from(headers),
            time.perf_counter(),
        )

    def answer_copy(
        self, read: HotRead, transport: asyncio.Transport, remote: Callable[[], str | None]
    ) -> bool:
        """Answer the read from the local copy (API_LOCAL_CACHE_MB) at once: True when it held
        the user's entry and the read was answered, False when Redis must be asked."""
        found = self._app[RUNTIME].cache.copied(read.user)
        if found is None:
            return False
        tier, stored = found
        return self._answer(read, tier, stored, transport, remote)

    def send(self, read: HotRead) -> asyncio.Future[Any] | None:
        """The GET of the read's current tier, sent; None when Redis cannot be asked so."""
        return self._app[RUNTIME].cache.send_get(_TIERS[read.tier], read.user)

    def landed(
        self,
        read: HotRead,
        reply: asyncio.Future[Any],
        transport: asyncio.Transport,
        remote: Callable[[], str | None],
    ) -> bool | asyncio.Future[Any]:
        """The GET came back: True when answered here, False when the app must answer, or
        the future of the next tier's GET. Raises only before anything was written."""
        if reply.cancelled() or reply.exception() is not None:
            return False
        stored = reply.result()
        if stored is None:
            if read.tier + 1 < len(_TIERS):
                read.tier += 1
                following = self.send(read)
                return False if following is None else following
            return False  # a miss: the app reads through
        if not isinstance(stored, bytes):  # an error reply: the app answers it
            return False
        return self._answer(read, _TIERS[read.tier], stored, transport, remote)

    def _answer(
        self,
        read: HotRead,
        tier: str,
        stored: bytes,
        transport: asyncio.Transport,
        remote: Callable[[], str | None],
    ) -> bool:
        """Answer the read with `stored`, found in `tier`, and count it as the app would."""
        # Built first: an entry that cannot be answered (a corrupt gzip member for a plain
        # client) raises here, before anything is counted, and the app answers it.
        body, lines = timeline_answer(stored, read.gzip_ok)
        lines += b"X-Request-Id: %s\r\n" % read.request_id.encode()
        count_hit(self._app, read.user, tier)
        send(transport, whole_head(OK_STATUS, lines, len(body)), body)
        record(
            ACCESS_LOGGER,
            self._sample,
            "GET",
            TIMELINE_ROUTE,
            read.path,
            200,
            time.perf_counter() - read.started,
            "hit",
            len(body),
            remote,
            read.request_id,
        )
        self.answered += 1
        return True
