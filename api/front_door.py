"""The front door: the hot route answered before aiohttp's router and middleware chain.

A cached read costs the API about twice what a bare aiohttp handler costs for the same bytes
(tuning.md, "Cached reads"); about 5 µs of the difference is aiohttp's `Application._handle`:
resolving the path among the app's ~20 resources, freezing a match info, and two middleware
frames (the envelope and aiohttp's own `_fix_request_current_app`). GET /api/cache/{userId}
is recognised here by its path alone and handed to the same view and the same envelope
(api.views_cache.read_timeline, api.middlewares.envelope); every other request, a HEAD among
them, goes to the app as before.

What the router would do, the door does the same way: it takes a path only when
`/api/cache/{userId}` would match it (one non-empty segment after the prefix, in the
percent-decoded path the router's value is decoded to) and `/api/cache/status/{userId}`
would not (that one has two segments). While tracing is on, every request goes through the
app, whose tracing middleware makes the server span.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from api.appkeys import ROUTE
from api.middlewares import envelope
from api.views_cache import TIMELINE_ROUTE, read_timeline
from engine import tracing

AppHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

PREFIX: Final = TIMELINE_ROUTE.removesuffix("{userId}")
_SKIP: Final = len(PREFIX)


class FrontDoor:
    """The server's request handler: the hot route here, everything else to `fallback`."""

    __slots__ = ("_app", "_fallback")

    def __init__(self, app: web.Application, fallback: AppHandler) -> None:
        self._app = app
        self._fallback = fallback

    def __call__(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # A plain function returning the coroutine to await: no frame of its own per request.
        if request.method == "GET" and tracing.tracer is None:
            path = request.path
            user = path[_SKIP:]
            if path.startswith(PREFIX) and user and "/" not in user:
                request[ROUTE] = TIMELINE_ROUTE
                return envelope(request, self._app, self._timeline)
        return self._fallback(request)

    def _timeline(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        return read_timeline(request, self._app, request.path[_SKIP:])
