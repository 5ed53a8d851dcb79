"""api/front_door.py: the hot route answered before the router, exactly as the router would.

Every request below is sent to two servers over the same sandbox and Redis: one with the
front door (as the CLI serves), one that routes everything through the app. Their answers
must agree (status, error code, the headers a client acts on), and the door must take
exactly the requests it claims: GETs of `/api/cache/<one segment>`. (That it steps aside
while tracing is on is tests/test_tracing.py's: a read's server span comes from the app's
tracing middleware.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from api.front_door import FrontDoor
from engine.settings import Settings
from sandbox.ca import user_token
from tests.conftest import ApiClient, Reply, new_user, serve_api

pytestmark = pytest.mark.timeout(60)

# Headers whose presence (and, for these, value) a client acts on.
COMPARED = ("Content-Encoding", "Content-Type", "Vary", "Allow")


def _shape(reply: Reply) -> tuple[object, ...]:
    code = reply.body.get("error") if isinstance(reply.body, dict) else None
    return (
        reply.status,
        code,
        tuple(reply.headers.get(name) for name in COMPARED),
        "ETag" in reply.headers,
        "X-Request-Id" in reply.headers,
        len(reply.raw) > 0,
    )


async def test_the_door_answers_as_the_router_would(settings: Settings) -> None:
    cached, uncached, other = new_user(), new_user(), new_user()
    requests: list[tuple[str, str, dict[str, str], str | None]] = [
        ("GET", f"/api/cache/{cached}", {"Accept-Encoding": "gzip"}, "service"),
        ("GET", f"/api/cache/{cached}", {"Accept-Encoding": "identity"}, "service"),
        ("GET", f"/api/cache/{cached.upper()}", {}, "service"),
        ("GET", f"/api/cache/{cached}?cacheOnly=true", {}, "service"),
        ("GET", f"/api/cache/{uncached}?cacheOnly=true", {}, "service"),
        ("GET", f"/api/cache/{cached}", {}, None),  # no token: 401
        ("GET", f"/api/cache/{cached}", {}, "other-user"),  # another user's token: 403
        ("GET", f"/api/cache/{cached}", {}, "own-user"),
        ("GET", "/api/cache/not-a-uuid", {}, "service"),
        ("GET", "/api/cache/status", {}, "service"),
        ("GET", "/api/cache/", {}, "service"),
        ("GET", f"/api/cache/{cached}/", {}, "service"),
        ("GET", f"/api/cache/status/{cached}", {}, "service"),
        ("POST", f"/api/cache/{cached}", {}, "service"),
        ("DELETE", f"/api/cache/{uncached}/timeline", {}, "service"),
    ]
    tokens = {"own-user": user_token(cached), "other-user": user_token(other)}

    async with serve_api(settings) as door, serve_api(settings, front_door=False) as router:
        taken = _count_fallbacks(door)
        assert (await door.call("GET", f"/api/cache/{cached}")).status == 200  # now cached
        for method, path, headers, who in requests:
            token = tokens.get(who or "", "sandbox-service") if who is not None else None
            before = taken.calls
            through_door = await door.call(method, path, token=token, headers=headers)
            through_router = await router.call(method, path, token=token, headers=headers)
            assert _shape(through_door) == _shape(through_router), (method, path, who)
            expect_door = method == "GET" and path.count("/") == 3 and not path.endswith("/")
            assert taken.calls - before == (0 if expect_door else 1), (method, path)


class _Counted:
    """The door's fallback, counted."""

    def __init__(self, fallback: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]):
        self.fallback = fallback
        self.calls = 0

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        self.calls += 1
        return await self.fallback(request)


def _count_fallbacks(client: ApiClient) -> _Counted:
    """Count the requests the running server's door hands to the app."""
    door = client.server_handler
    assert isinstance(door, FrontDoor)
    counted = _Counted(door._fallback)
    door._fallback = counted
    return counted
