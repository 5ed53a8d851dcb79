"""Bearer authentication against the CA, route permissions and the validation cache."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator

import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from api.auth import USER_TOKEN_REFUSED
from engine.settings import Settings
from sandbox.ca import user_token
from tests.conftest import READONLY_TOKEN, ApiClient, closed_port, new_user, serve_api

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("header", [None, "Basic dXNlcjpwdw==", "Bearer", "Bearer   ", "Token x"])
async def test_missing_or_non_bearer_token_is_401(api: ApiClient, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    reply = await api.call("GET", f"/api/cache/{new_user()}", token=None, headers=headers)
    assert reply.status == 401
    assert reply.body["error"] == "MISSING_TOKEN"
    assert reply.body["success"] is False
    assert (await api.ca_stats())["validateCalls"] == 0


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("sandbox-expired", "TOKEN_EXPIRED"),
        ("sandbox-revoked", "TOKEN_REVOKED"),
        ("no-such-token", "INVALID_TOKEN"),
    ],
)
async def test_rejected_tokens_are_401_with_the_ca_reason(
    api: ApiClient, token: str, reason: str
) -> None:
    reply = await api.call("GET", f"/api/cache/{new_user()}", token=token)
    assert reply.status == 401
    assert reply.body == {
        "success": False,
        "error": "INVALID_TOKEN",
        "message": f"Token rejected: {reason}",
    }


async def test_bearer_scheme_is_case_insensitive(api: ApiClient) -> None:
    headers = {"Authorization": "bearer sandbox-service"}
    reply = await api.call("GET", "/api/prefetch/queue/stats", token=None, headers=headers)
    assert reply.status == 200


async def test_readonly_token_reads_but_may_not_write_or_delete(api: ApiClient) -> None:
    user = new_user()
    assert (await api.call("GET", f"/api/cache/{user}", token=READONLY_TOKEN)).status == 200
    assert (await api.call("GET", "/api/prefetch/queue/stats", token=READONLY_TOKEN)).status == 200
    for method, path in [
        ("POST", f"/api/prefetch/schedule/{user}"),
        ("POST", f"/api/prefetch/immediate/{user}"),
        ("POST", f"/api/prefetch/queue/retry/prefetch:{user}:1"),
        ("DELETE", f"/api/cache/{user}/timeline"),
    ]:
        reply = await api.call(method, path, token=READONLY_TOKEN)
        assert reply.status == 403, path
        assert reply.body["error"] == "INSUFFICIENT_PERMISSIONS", path


async def test_user_token_reaches_only_its_own_user(api: ApiClient) -> None:
    owner, other = new_user(), new_user()
    token = user_token(owner)
    assert (await api.call("GET", f"/api/cache/{owner.upper()}", token=token)).status == 200
    assert (await api.call("GET", f"/api/cache/status/{owner}", token=token)).status == 200
    assert (await api.call("POST", f"/api/prefetch/schedule/{owner}", token=token)).status == 202
    assert (await api.call("DELETE", f"/api/cache/{owner}/timeline", token=token)).status == 200

    for method, path, body in [
        ("GET", f"/api/cache/{other}", None),
        ("GET", f"/api/cache/status/{other}", None),
        ("POST", f"/api/prefetch/schedule/{other}", None),
        ("POST", f"/api/prefetch/immediate/{other}", None),
        ("DELETE", f"/api/cache/{other}/timeline", None),
        ("GET", "/api/prefetch/queue/stats", None),
        ("GET", "/api/prefetch/queue/failed", None),
        ("POST", f"/api/prefetch/queue/retry/prefetch:{owner}:1", None),
        ("GET", "/api/prefetch/metrics", None),
        ("GET", "/api/prefetch/metrics/2024-12-21", None),
        ("POST", "/api/activity", {"userIds": [owner]}),
        ("POST", "/api/prefetch/events", {"type": "post.created", "userId": owner}),
    ]:
        reply = await api.call(method, path, token=token, json=body)
        assert reply.status == 403, path
        assert reply.body["error"] == "ACCESS_DENIED", path
        # Whether another user's data or a route for services only: the message says which.
        service_only = other not in path
        expected = (
            USER_TOKEN_REFUSED if service_only else "A user token may only access its own user"
        )
        assert reply.body["message"] == expected, path


async def test_unreachable_ca_is_503(settings: Settings) -> None:
    gone = f"http://127.0.0.1:{closed_port()}"
    async with serve_api(settings.with_overrides(ca_url=gone)) as api:
        reply = await api.call("GET", f"/api/cache/{new_user()}")
        assert reply.status == 503
        assert reply.body["error"] == "CA_UNAVAILABLE"


async def test_one_ca_call_per_token_under_load(api: ApiClient) -> None:
    token = user_token(new_user())
    user = token.removeprefix("sandbox-user-")
    path = f"/api/cache/status/{user}"
    replies = await asyncio.gather(*(api.call("GET", path, token=token) for _ in range(50)))
    assert [reply.status for reply in replies] == [200] * 50
    for _ in range(10):
        assert (await api.call("GET", path, token=token)).status == 200
    assert (await api.ca_stats())["byToken"] == {token: 1}


async def test_rejections_are_cached_too(api: ApiClient) -> None:
    for _ in range(5):
        reply = await api.call("GET", f"/api/cache/{new_user()}", token="sandbox-expired")
        assert reply.status == 401
    assert (await api.ca_stats())["byToken"] == {"sandbox-expired": 1}


async def test_zero_ttl_asks_the_ca_every_time(settings: Settings) -> None:
    async with serve_api(settings.with_overrides(auth_cache_ttl_ms=0)) as api:
        for _ in range(3):
            assert (await api.call("GET", "/api/prefetch/queue/stats")).status == 200
        assert (await api.ca_stats())["byToken"] == {"sandbox-service": 3}


class ShortLivedCA:
    """A CA whose tokens expire `lifetime_ms` after each validation, counting its calls."""

    def __init__(self, lifetime_ms: int) -> None:
        self.lifetime_ms = lifetime_ms
        self.calls = 0

    async def validate(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = {
            "success": True,
            "valid": True,
            "token": {"expiresAt": int(time.time() * 1000) + self.lifetime_ms},
            "permissions": {"read": True, "write": True, "delete": True},
        }
        return web.json_response(body, dumps=lambda v: orjson.dumps(v).decode())


@pytest_asyncio.fixture
async def short_lived_ca() -> AsyncIterator[tuple[ShortLivedCA, str]]:
    ca = ShortLivedCA(lifetime_ms=1000)
    app = web.Application()
    app.router.add_post("/api/tokens/validate", ca.validate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield ca, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_valid_verdict_is_not_cached_past_token_expiry(
    settings: Settings, short_lived_ca: tuple[ShortLivedCA, str]
) -> None:
    ca, url = short_lived_ca
    async with serve_api(settings.with_overrides(ca_url=url, auth_cache_ttl_ms=60_000)) as api:
        validated_at = time.monotonic()
        assert (await api.call("GET", "/api/prefetch/queue/stats")).status == 200
        assert (await api.call("GET", "/api/prefetch/queue/stats")).status == 200
        assert ca.calls == 1
        # The token's own expiry is a point in time: wait until it has passed.
        await asyncio.sleep(max(0.0, validated_at + 1.05 - time.monotonic()))
        assert (await api.call("GET", "/api/prefetch/queue/stats")).status == 200
        assert ca.calls == 2


class ScriptedCA:
    """A CA that validates one long token and answers everything else with `answer`.

    Only for answers the sandbox CA cannot give: a long (JWT-sized) valid token, and
    malformed verdicts.
    """

    def __init__(self) -> None:
        self.long_token = "eyJ" + "a" * 400
        self.answer: tuple[int, bytes] = (401, b'{"valid": false, "error": "INVALID_TOKEN"}')
        self.seen: list[str] = []

    async def validate(self, request: web.Request) -> web.Response:
        token = (await request.json())["token"]
        self.seen.append(token)
        if token == self.long_token:
            body = {"valid": True, "permissions": {"read": True, "write": True}}
            return web.json_response(body, dumps=lambda v: orjson.dumps(v).decode())
        status, raw = self.answer
        return web.Response(status=status, body=raw, content_type="application/json")


@pytest_asyncio.fixture
async def scripted_ca() -> AsyncIterator[tuple[ScriptedCA, str]]:
    ca = ScriptedCA()
    app = web.Application()
    app.router.add_post("/api/tokens/validate", ca.validate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield ca, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_the_digest_of_a_long_valid_token_is_not_a_credential(
    settings: Settings, scripted_ca: tuple[ScriptedCA, str]
) -> None:
    ca, url = scripted_ca
    async with serve_api(settings.with_overrides(ca_url=url)) as api:
        assert (
            await api.call("GET", "/api/prefetch/queue/stats", token=ca.long_token)
        ).status == 200
        digest = hashlib.sha256(ca.long_token.encode()).hexdigest()
        reply = await api.call("GET", "/api/prefetch/queue/stats", token=digest)
        assert reply.status == 401 and reply.body["error"] == "INVALID_TOKEN"
        assert ca.seen == [ca.long_token, digest]  # the digest was asked about, not looked up


MALFORMED_VERDICTS = {
    "empty-user-id": {"valid": True, "userId": "", "permissions": {"read": True}},
    "empty-nested-user-id": {
        "valid": True,
        "tokenData": {"userId": ""},
        "permissions": {"read": True},
    },
    "user-id-not-a-uuid": {"valid": True, "userId": "admin", "permissions": {"read": True}},
    "user-id-a-number": {"valid": True, "userId": 42, "permissions": {"read": True}},
    "nested-user-id-a-number": {
        "valid": True,
        "tokenData": {"userId": 42},
        "permissions": {"read": True},
    },
    "user-ids-disagree": {
        "valid": True,
        "userId": "550e8400-e29b-41d4-a716-446655440000",
        "tokenData": {"userId": "7c9e6679-7425-40de-944b-e07fc1f90ae7"},
        "permissions": {"read": True},
    },
    "token-data-not-an-object": {"valid": True, "tokenData": "x", "permissions": {"read": True}},
    "permission-not-a-bool": {"valid": True, "permissions": {"read": "yes"}},
    "permissions-null": {"valid": True, "permissions": None},
    "not-an-object": [True],
}


@pytest.mark.parametrize("case", sorted(MALFORMED_VERDICTS))
async def test_a_malformed_ca_answer_fails_closed(
    settings: Settings, scripted_ca: tuple[ScriptedCA, str], case: str
) -> None:
    ca, url = scripted_ca
    ca.answer = (200, orjson.dumps(MALFORMED_VERDICTS[case]))
    async with serve_api(settings.with_overrides(ca_url=url)) as api:
        for path in ("/api/prefetch/queue/stats", f"/api/cache/status/{new_user()}"):
            reply = await api.call("GET", path, token="some-token")
            assert reply.status == 503, (path, reply.status, reply.body)
            assert reply.body["error"] == "CA_UNAVAILABLE"
            assert "127.0.0.1" not in reply.body["message"]
        # Never cached: the next request asks again.
        assert len(ca.seen) == 2


async def test_a_ca_reason_that_is_not_a_code_is_not_echoed(
    settings: Settings, scripted_ca: tuple[ScriptedCA, str]
) -> None:
    ca, url = scripted_ca
    ca.answer = (401, orjson.dumps({"valid": False, "error": "<script>at db01:5432</script>"}))
    async with serve_api(settings.with_overrides(ca_url=url)) as api:
        reply = await api.call("GET", "/api/prefetch/queue/stats", token="some-token")
        assert reply.status == 401
        assert reply.body["message"] == "Token rejected: INVALID_TOKEN"


async def test_tokens_outside_printable_ascii_are_refused_unasked(api: ApiClient) -> None:
    for token in ("caf\u00e9-token", "tab\there"):
        reply = await api.call("GET", "/api/prefetch/queue/stats", token=token)
        assert reply.status == 401 and reply.body["error"] == "INVALID_TOKEN"
    assert (await api.ca_stats())["validateCalls"] == 0


async def test_a_ca_failure_names_no_host_or_port(settings: Settings) -> None:
    port = closed_port()
    async with serve_api(settings.with_overrides(ca_url=f"http://127.0.0.1:{port}")) as api:
        reply = await api.call("GET", "/api/prefetch/queue/stats")
        assert reply.status == 503
        assert "127.0.0.1" not in reply.body["message"] and str(port) not in reply.body["message"]
