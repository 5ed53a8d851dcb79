"""Upstream clients against the sandbox over real HTTP: service tokens, failures, the CA."""

from __future__ import annotations

import aiohttp
import pytest

from engine.errors import (
    CAUnavailable,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRetryable,
    UpstreamTimeout,
)
from engine.metrics import prometheus
from engine.settings import Settings
from engine.upstream import CAClient, ServiceTokens, TimelineClient, make_session
from sandbox.server import SandboxServer
from tests.conftest import closed_port, new_user


def refreshes() -> float:
    return prometheus.TOKEN_REFRESH._value.get()


async def test_an_issued_service_token_is_cached_and_renewed_once_after_rotation(
    settings: Settings, sandbox: SandboxServer
) -> None:
    settings = settings.with_overrides(service_token="", service_token_path="/api/tokens/service")
    async with make_session(10) as session:
        tokens = ServiceTokens(settings, session)
        timeline = TimelineClient(settings, session, tokens)
        user = new_user()
        assert len(await timeline.fetch(user)) == 100
        assert len(await timeline.fetch(user)) == 100
        assert sandbox.tokens.stats()["issued"] == 1  # cached for 90% of its lifetime

        before = refreshes()
        sandbox.tokens.rotate()  # the timeline now refuses the cached token with a 401
        assert len(await timeline.fetch(user)) == 100
        assert sandbox.tokens.stats()["issued"] == 2
        assert refreshes() == before + 1


async def test_concurrent_callers_share_one_token_request(
    settings: Settings, sandbox: SandboxServer
) -> None:
    import asyncio

    settings = settings.with_overrides(service_token="", service_token_path="/api/tokens/service")
    async with make_session(10) as session:
        tokens = ServiceTokens(settings, session)
        got = await asyncio.gather(*(tokens.get() for _ in range(20)))
    assert len(set(got)) == 1
    assert sandbox.tokens.stats()["issued"] == 1


async def test_a_refused_static_token_is_retried_once_then_fails(settings: Settings) -> None:
    settings = settings.with_overrides(service_token="not-a-service-token")
    async with make_session(10) as session:
        timeline = TimelineClient(settings, session, ServiceTokens(settings, session))
        before = refreshes()
        with pytest.raises(UpstreamError, match="401") as caught:
            await timeline.fetch(new_user())
    assert not caught.value.retryable
    assert refreshes() == before + 1


@pytest.mark.parametrize(
    ("prefix", "error", "retryable"),
    [
        ("0000dead-", UpstreamNotFound, False),
        ("0000fa11-", UpstreamRetryable, True),
        ("0000bad0-", UpstreamError, False),
        ("0000510e-", UpstreamTimeout, True),
    ],
)
async def test_fault_users_map_to_typed_errors(
    settings: Settings, prefix: str, error: type[UpstreamError], retryable: bool
) -> None:
    settings = settings.with_overrides(prefetch_timeout_ms=300)
    async with make_session(10) as session:
        timeline = TimelineClient(settings, session, ServiceTokens(settings, session))
        with pytest.raises(error) as caught:
            await timeline.fetch(new_user(prefix))
    assert type(caught.value) is error
    assert caught.value.retryable is retryable


async def test_an_unreachable_timeline_is_a_retryable_error(settings: Settings) -> None:
    settings = settings.with_overrides(timeline_url=f"http://127.0.0.1:{closed_port()}")
    async with make_session(10) as session:
        timeline = TimelineClient(settings, session, ServiceTokens(settings, session))
        with pytest.raises(UpstreamRetryable):
            await timeline.fetch(new_user())
        health = await timeline.health()
    assert health["status"] == "disconnected"


async def test_the_ca_verdicts(settings: Settings) -> None:
    async with make_session(10) as session:
        ca = CAClient(settings, session)
        service = await ca.validate("sandbox-service")
        assert service.valid and service.userId is None and service.permissions.delete
        user = new_user()
        mine = await ca.validate(f"sandbox-user-{user}")
        assert mine.valid and mine.userId == user and not mine.permissions.update
        expired = await ca.validate("sandbox-expired")
        assert not expired.valid and expired.error == "TOKEN_EXPIRED"
        assert (await ca.health())["status"] == "connected"


async def test_an_unreachable_ca_is_unavailable_not_invalid(settings: Settings) -> None:
    settings = settings.with_overrides(ca_url=f"http://127.0.0.1:{closed_port()}")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(CAUnavailable):
            await CAClient(settings, session).validate("sandbox-service")


async def test_failure_messages_name_no_host_port_or_decoder_position(settings: Settings) -> None:
    port = closed_port()
    gone = settings.with_overrides(timeline_url=f"http://127.0.0.1:{port}")
    async with make_session(10) as session:
        timeline = TimelineClient(gone, session, ServiceTokens(gone, session))
        with pytest.raises(UpstreamRetryable) as unreachable:
            await timeline.fetch(new_user())
        timeline = TimelineClient(settings, session, ServiceTokens(settings, session))
        with pytest.raises(UpstreamError) as malformed:
            await timeline.fetch(new_user("0000bad0-"))
    for error in (unreachable.value, malformed.value):
        text = error.public_message
        assert text == str(error)  # upstream messages are written to be shown
        assert "127.0.0.1" not in text and str(port) not in text and "$." not in text, text
    assert str(unreachable.value).startswith("Timeline service unreachable")
    assert str(malformed.value) == "Timeline service sent a malformed body"
