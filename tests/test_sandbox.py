"""The sandbox upstreams, exercised over real HTTP on loopback (asyncio_mode = auto)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio

from engine.errors import ConfigError
from engine.settings import Settings
from engine.wire import (
    Pagination,
    Post,
    issued_token_decoder,
    timeline_page_decoder,
    validation_decoder,
)
from sandbox import SandboxServer, SandboxSettings, SandboxTokens, load_sandbox_settings
from sandbox.ca import validate
from sandbox.server import run_sandbox
from sandbox.timeline import generate_posts, timeline_body
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parent.parent
USER = "550e8400-e29b-41d4-a716-446655440000"
OTHER = "6f1c2a34-1b2c-4d5e-8f90-123456789abc"
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class _SandboxPage(msgspec.Struct):
    """The sandbox timeline body, every field required, in wire order."""

    success: bool
    userId: str
    posts: list[Post]
    pagination: Pagination


ALL_PERMISSIONS = {"read": True, "write": True, "append": True, "delete": True, "update": True}


def loopback_settings(**changes: Any) -> Settings:
    """Settings with both upstreams on free loopback ports."""
    return Settings().with_overrides(
        timeline_url="http://127.0.0.1:0", ca_url="http://127.0.0.1:0", **changes
    )


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


@pytest_asyncio.fixture
async def server() -> AsyncIterator[SandboxServer]:
    async with SandboxServer(loopback_settings(), SandboxSettings()) as running:
        yield running


def timeline(server: SandboxServer, user_id: str, limit: int | None = 100) -> str:
    query = "" if limit is None else f"?limit={limit}"
    return f"{server.timeline_url}/api/timeline/user/{user_id}{query}"


async def fetch(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, bytes]:
    async with session.get(url, **kwargs) as response:
        return response.status, await response.read()


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        return await response.json()


async def check_token(
    session: aiohttp.ClientSession, server: SandboxServer, token: Any
) -> tuple[int, dict[str, Any]]:
    url = f"{server.ca_url}/api/tokens/validate"
    async with session.post(url, json={"token": token}) as response:
        return response.status, await response.json()


# --- timeline -------------------------------------------------------------------------------


async def test_bound_urls_and_health(server: SandboxServer, session: aiohttp.ClientSession) -> None:
    assert not server.timeline_url.endswith(":0") and not server.ca_url.endswith(":0")
    assert server.timeline_url != server.ca_url
    for url, name in ((server.timeline_url, "sandbox-timeline"), (server.ca_url, "sandbox-ca")):
        assert await get_json(session, f"{url}/health") == {"status": "healthy", "service": name}


async def test_posts_are_deterministic_and_typed(
    server: SandboxServer, session: aiohttp.ClientSession
) -> None:
    status, first = await fetch(session, timeline(server, USER))
    _, second = await fetch(session, timeline(server, USER))
    assert status == 200 and first == second
    page = timeline_page_decoder.decode(first)
    assert page.success and page.userId == USER and len(page.posts) == 100
    assert page.pagination is not None
    assert (page.pagination.page, page.pagination.limit, page.pagination.hasMore) == (1, 100, True)
    assert len({post.id for post in page.posts}) == 100
    for post in page.posts:
        uuid.UUID(post.id)
        assert post.userId == USER and post.content and not post.deleted
        assert post.contentType in ("text", "image", "video", "link")
        assert post.visibility in ("public", "followers", "private")
        assert ISO_MS.fullmatch(post.createdAt) and ISO_MS.fullmatch(post.updatedAt)
        assert post.updatedAt >= post.createdAt
        assert isinstance(msgspec.json.decode(post.metadata)["tags"], list)
        assert min(post.likeCount, post.commentCount, post.repostCount) >= 0
        assert (post.blueskyUri is not None) == post.syncedToBluesky
        if post.contentType in ("image", "video"):
            media = msgspec.json.decode(post.media)
            assert media and media[0]["type"] == post.contentType
    created = [post.createdAt for post in page.posts]
    assert created == sorted(created, reverse=True)
    # Every field of the Appendix shape is on the wire, bluesky ones included even when null.
    raw = msgspec.json.decode(first)
    assert set(raw) == {"success", "userId", "posts", "pagination"}
    assert set(raw["posts"][0]) == set(Post.__struct_fields__)


async def test_limits_prefixes_and_users(
    server: SandboxServer, session: aiohttp.ClientSession
) -> None:
    _, full = await fetch(session, timeline(server, USER, 100))
    _, short = await fetch(session, timeline(server, USER, 2))
    _, default = await fetch(session, timeline(server, USER, None))
    _, other = await fetch(session, timeline(server, OTHER, 100))
    full_posts = timeline_page_decoder.decode(full).posts
    assert timeline_page_decoder.decode(short).posts == full_posts[:2]
    default_page = timeline_page_decoder.decode(default)
    assert len(default_page.posts) == 20 and default_page.posts == full_posts[:20]
    assert {p.id for p in timeline_page_decoder.decode(other).posts}.isdisjoint(
        {p.id for p in full_posts}
    )
    _, most = await fetch(session, timeline(server, USER, 1000))
    most_page = timeline_page_decoder.decode(most)
    assert len(most_page.posts) == 1000
    assert most_page.pagination is not None and most_page.pagination.hasMore is False
    for bad in ("0", "1001", "abc", "-5"):
        status, body = await fetch(session, timeline(server, USER, None) + f"?limit={bad}")
        assert status == 400 and msgspec.json.decode(body)["success"] is False


async def test_hundred_posts_are_about_45_kb(
    server: SandboxServer, session: aiohttp.ClientSession
) -> None:
    for user_id in (USER, OTHER, str(uuid.UUID(int=7))):
        status, body = await fetch(session, timeline(server, user_id, 100))
        assert status == 200 and 30_000 <= len(body) <= 60_000


def test_bodies_are_canonical_and_stable_across_processes() -> None:
    """Assembled bodies equal msgspec's encoding and do not depend on the hash seed."""
    page_decoder = msgspec.json.Decoder(_SandboxPage)
    for user_id in (USER, OTHER, 'we"ird\\ \u00fcser\u2028'):
        body = timeline_body(user_id, 100)
        page = page_decoder.decode(body)
        assert msgspec.json.encode(page) == body and page.userId == user_id
        assert generate_posts(user_id, 100) == page.posts
        dids = {post.blueskyDid for post in page.posts if post.syncedToBluesky}
        assert len(dids) == 1 and re.fullmatch(r"did:plc:[a-z2-7]{24}", dids.pop())
        for post in page.posts:
            assert post.blueskyUri == (
                f"at://{post.blueskyDid}/app.bsky.feed.post/{post.blueskyRkey}"
                if post.syncedToBluesky
                else None
            )
    script = (
        "import hashlib; from sandbox.timeline import timeline_body; "
        f"print(hashlib.sha256(timeline_body({USER!r}, 1000)).hexdigest())"
    )
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        digests.add(run.stdout.strip())
    assert digests == {hashlib.sha256(timeline_body(USER, 1000)).hexdigest()}


def test_generated_posts_vary_and_ids_are_unique_uuid4s() -> None:
    ids: set[str] = set()
    users = [str(uuid.UUID(int=n)) for n in range(300)]
    for user_id in users:
        posts = generate_posts(user_id, 100)
        shapes = {msgspec.json.encode(msgspec.structs.replace(p, id="")) for p in posts}
        assert len(shapes) == 100
        for post in posts:
            assert uuid.UUID(post.id).version == 4 and str(uuid.UUID(post.id)) == post.id
        ids.update(post.id for post in posts)
        assert 45_000 <= len(timeline_body(user_id, 100)) <= 60_000
    assert len(ids) == 100 * len(users)
    # Past the template pool and the id masks: still unique, ordered, and a prefix.
    many = generate_posts(USER, 2_500)
    assert len({post.id for post in many}) == 2_500 and many[:1000] == generate_posts(USER, 1000)
    created = [post.createdAt for post in many]
    assert created == sorted(created, reverse=True)
    assert generate_posts(USER, 0) == []


async def test_fault_users(server: SandboxServer, session: aiohttp.ClientSession) -> None:
    status, body = await fetch(session, timeline(server, "0000dead-0000-4000-8000-000000000001"))
    assert status == 404 and msgspec.json.decode(body)["error"] == "USER_NOT_FOUND"

    for _ in range(3):
        status, _ = await fetch(session, timeline(server, "0000fa11-0000-4000-8000-000000000001"))
        assert status == 503

    url = timeline(server, "0000bad0-0000-4000-8000-000000000001")
    async with session.get(url) as response:
        assert response.status == 200 and response.content_type == "application/json"
        body = await response.read()
    with pytest.raises(msgspec.DecodeError):
        timeline_page_decoder.decode(body)


async def test_slow_user_does_not_block_others(
    server: SandboxServer, session: aiohttp.ClientSession
) -> None:
    slow_user = "0000510e-0000-4000-8000-000000000001"
    slow = asyncio.create_task(fetch(session, timeline(server, slow_user)))

    async def slow_arrived() -> bool:
        stats = await get_json(session, f"{server.timeline_url}/__stats")
        return bool(stats["byUser"].get(slow_user))

    await eventually(slow_arrived)
    # Served while the slow user's request is still being held: it did not wait behind it.
    status, _ = await fetch(session, timeline(server, USER))
    assert status == 200
    assert not slow.done()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(slow), timeout=1.0)
    slow.cancel()
    started = time.monotonic()
    await server.stop()
    # A stop does not wait out the slow user's 60 s (its timeout is a second).
    assert time.monotonic() - started < 30


async def test_error_rate_one_fails_every_request(session: aiohttp.ClientSession) -> None:
    async with SandboxServer(loopback_settings(), SandboxSettings(error_rate=1.0)) as server:
        for user_id in (USER, OTHER):
            status, body = await fetch(session, timeline(server, user_id))
            assert status == 503 and msgspec.json.decode(body)["success"] is False
        # Fixed fault users keep their own answer whatever the knobs.
        status, _ = await fetch(session, timeline(server, "0000dead-0000-4000-8000-00000000000a"))
        assert status == 404


async def test_latency_knob_delays_answers(session: aiohttp.ClientSession) -> None:
    knobs = SandboxSettings(latency_ms=150, jitter_ms=50)
    async with SandboxServer(loopback_settings(), knobs) as server:
        started = time.monotonic()
        status, _ = await fetch(session, timeline(server, USER))
        elapsed = time.monotonic() - started
    assert status == 200 and elapsed >= 0.15  # at least the latency; never early


async def test_stats_count_fetches_and_reset(
    server: SandboxServer, session: aiohttp.ClientSession
) -> None:
    dead = "0000dead-0000-4000-8000-000000000002"
    for user_id in (USER, USER, OTHER, dead):
        await fetch(session, timeline(server, user_id))
    stats = await get_json(session, f"{server.timeline_url}/__stats")
    # One at a time: the peak of requests in flight is 1.
    assert stats == {
        "timelineFetches": 4,
        "byUser": {USER: 2, OTHER: 1, dead: 1},
        "peakInFlight": 1,
    }
    async with session.post(f"{server.timeline_url}/__reset") as response:
        assert response.status == 200
    stats = await get_json(session, f"{server.timeline_url}/__stats")
    assert stats == {"timelineFetches": 0, "byUser": {}, "peakInFlight": 0}


async def test_timeline_checks_bearer_tokens(
    server: SandboxServer, session: aiohttp.ClientSession
) -> None:
    url = timeline(server, USER, 5)
    assert (await fetch(session, url))[0] == 200
    ok = {"Authorization": "Bearer sandbox-service"}
    assert (await fetch(session, url, headers=ok))[0] == 200
    for header in ("Bearer nope", "Basic sandbox-service", "sandbox-service", "Bearer "):
        status, body = await fetch(session, url, headers={"Authorization": header})
        assert status == 401
        assert msgspec.json.decode(body)["error"] == "INVALID_TOKEN"


async def test_custom_path_and_url_prefix(session: aiohttp.ClientSession) -> None:
    settings = loopback_settings(timeline_path="/v2/users/{userId}/posts").with_overrides(
        timeline_url="http://127.0.0.1:0/upstream", ca_url="http://127.0.0.1:0/ca"
    )
    async with SandboxServer(settings, SandboxSettings()) as server:
        assert server.timeline_url.endswith("/upstream") and server.ca_url.endswith("/ca")
        status, body = await fetch(session, f"{server.timeline_url}/v2/users/{USER}/posts?limit=3")
        assert status == 200 and len(timeline_page_decoder.decode(body).posts) == 3
        assert (await fetch(session, f"{server.timeline_url}/health"))[0] == 200
        assert (await check_token(session, server, "sandbox-service"))[0] == 200


# --- CA -------------------------------------------------------------------------------------


async def test_fixed_tokens(server: SandboxServer, session: aiohttp.ClientSession) -> None:
    status, body = await check_token(session, server, "sandbox-service")
    assert status == 200 and body["valid"] and body["permissions"] == ALL_PERMISSIONS
    assert "userId" not in body and body["token"]["expiresAt"] is None

    status, body = await check_token(session, server, "sandbox-readonly")
    validation = validation_decoder.decode(msgspec.json.encode(body))
    assert status == 200 and validation.valid and validation.userId is None
    assert body["permissions"] == {
        "read": True,
        "write": False,
        "append": False,
        "delete": False,
        "update": False,
    }

    for token, code, message in (
        ("sandbox-expired", "TOKEN_EXPIRED", "Token has expired"),
        ("sandbox-revoked", "TOKEN_REVOKED", "Token has been revoked"),
    ):
        status, body = await check_token(session, server, token)
        assert status == 401
        assert body == {
            "success": False,
            "valid": False,
            "error": code,
            "message": message,
            "reason": message,
        }

    refused: tuple[Any, ...] = ("nope", "", "sandbox-user-not-a-uuid", "sandbox-svc-99", 42, None)
    for bad in refused:
        status, body = await check_token(session, server, bad)
        assert status == 401 and body["error"] == "INVALID_TOKEN" and body["valid"] is False
    url = f"{server.ca_url}/api/tokens/validate"
    for raw in (b"{not json", b"", b"[]"):
        async with session.post(url, data=raw) as response:
            assert response.status == 401
            assert (await response.json())["error"] == "INVALID_TOKEN"


async def test_user_tokens(server: SandboxServer, session: aiohttp.ClientSession) -> None:
    before = time.time() * 1000
    status, body = await check_token(session, server, f"sandbox-user-{USER.upper()}")
    assert status == 200
    validation = validation_decoder.decode(msgspec.json.encode(body))
    assert validation.valid and validation.userId == USER
    assert validation.tokenData == {"userId": USER}
    assert body["permissions"] == {
        "read": True,
        "write": True,
        "append": False,
        "delete": True,
        "update": False,
    }
    assert validation.token is not None and validation.token.expiresAt is not None
    assert before + 3_500_000 < validation.token.expiresAt < before + 3_700_000


async def test_validate_calls_are_counted(
    server: SandboxServer, session: aiohttp.ClientSession
) -> None:
    for token in ("sandbox-service", "sandbox-service", "sandbox-expired", "x"):
        await check_token(session, server, token)
    stats = await get_json(session, f"{server.ca_url}/__stats")
    assert stats["validateCalls"] == 4
    assert stats["byToken"] == {"sandbox-service": 2, "sandbox-expired": 1, "x": 1}
    async with session.post(f"{server.ca_url}/__reset") as response:
        assert response.status == 200
    stats = await get_json(session, f"{server.ca_url}/__stats")
    assert stats == {"validateCalls": 0, "byToken": {}, "issued": 0}


async def test_issued_service_token_lifecycle(
    server: SandboxServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(f"{server.ca_url}/api/tokens/service") as response:
        assert response.status == 200
        issued = issued_token_decoder.decode(await response.read())
    assert issued.token.startswith("sandbox-svc-") and issued.expiresAt is not None
    assert abs(issued.expiresAt - (time.time() * 1000 + 3_600_000)) < 60_000

    status, body = await check_token(session, server, issued.token)
    assert status == 200 and body["valid"] and body["permissions"] == ALL_PERMISSIONS
    assert "userId" not in body and body["token"]["expiresAt"] == issued.expiresAt

    bearer = {"Authorization": f"Bearer {issued.token}"}
    assert (await fetch(session, timeline(server, USER, 5), headers=bearer))[0] == 200
    async with session.post(f"{server.ca_url}/__rotate") as response:
        assert (await response.json())["revoked"] == 1
    assert (await fetch(session, timeline(server, USER, 5), headers=bearer))[0] == 401
    status, body = await check_token(session, server, issued.token)
    assert status == 401 and body["error"] == "TOKEN_REVOKED"
    service = {"Authorization": "Bearer sandbox-service"}
    assert (await fetch(session, timeline(server, USER, 5), headers=service))[0] == 200
    async with session.get(f"{server.ca_url}/__stats") as response:
        assert (await response.json())["issued"] == 1


def test_issued_tokens_expire() -> None:
    now = [1_000.0]
    tokens = SandboxTokens(clock=lambda: now[0], ttl_ms=10_000)
    token, expires_at = tokens.issue()
    assert expires_at == 1_010_000 and tokens.service_token_ok(token)
    assert validate(tokens, token)[0] == 200
    now[0] += 11
    assert not tokens.service_token_ok(token)
    status, body = validate(tokens, token)
    assert status == 401 and msgspec.json.decode(body)["error"] == "TOKEN_EXPIRED"
    assert tokens.service_token_ok("sandbox-service")


# --- configuration and process --------------------------------------------------------------


def test_sandbox_settings_from_env() -> None:
    assert load_sandbox_settings({}) == SandboxSettings()
    assert load_sandbox_settings({"SANDBOX_LATENCY_MS": ""}) == SandboxSettings()
    env = {"SANDBOX_LATENCY_MS": "50", "SANDBOX_JITTER_MS": " 10 ", "SANDBOX_ERROR_RATE": "0.25"}
    assert load_sandbox_settings(env) == SandboxSettings(50, 10, 0.25)


@pytest.mark.parametrize(
    ("name", "raw", "accepted"),
    [
        ("SANDBOX_LATENCY_MS", "abc", "an integer from 0 to 600000"),
        ("SANDBOX_LATENCY_MS", "-1", "an integer from 0 to 600000"),
        ("SANDBOX_JITTER_MS", "600001", "an integer from 0 to 600000"),
        ("SANDBOX_JITTER_MS", "1.5", "an integer from 0 to 600000"),
        ("SANDBOX_ERROR_RATE", "1.5", "a number from 0 to 1"),
        ("SANDBOX_ERROR_RATE", "nan", "a number from 0 to 1"),
        ("SANDBOX_ERROR_RATE", "lots", "a number from 0 to 1"),
    ],
)
def test_bad_sandbox_settings_name_the_variable(name: str, raw: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_sandbox_settings({name: raw})
    message = str(caught.value)
    assert message == f"{name}={raw!r} is not valid: expected {accepted}"
    assert "\n" not in message
    with pytest.raises(ConfigError, match=name):
        run_sandbox(loopback_settings(), {name: raw})


def test_run_sandbox_serves_until_sigterm() -> None:
    script = (
        "import sys; from engine.settings import Settings; from sandbox import run_sandbox; "
        "s = Settings().with_overrides(timeline_url='http://127.0.0.1:0', "
        "ca_url='http://127.0.0.1:0'); sys.exit(run_sandbox(s, {'SANDBOX_LATENCY_MS': '1'}))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        timeline_line = proc.stdout.readline()
        ca_line = proc.stdout.readline()
        assert re.search(r"http://127\.0\.0\.1:\d+", timeline_line), timeline_line
        assert re.search(r"http://127\.0\.0\.1:\d+", ca_line), ca_line
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert cmdline.startswith(b"prefetch: sandbox")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
