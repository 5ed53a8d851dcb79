"""Clients of the two upstreams: the timeline service and the certificate authority (CA).

One pooled aiohttp session per process serves both. The timeline client decodes straight
into typed structs and maps every failure to an error of engine.errors, which tells the job
engine whether it is worth a retry. Their messages reach clients (and failed jobs' reasons),
so they name no host, port or decoder position: those are logged, at debug level (a failing
upstream fails many calls alike; the message says which kind of failure it was).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import msgspec
from yarl import URL

from engine import tracing, wire
from engine.errors import (
    CAUnavailable,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRetryable,
    UpstreamTimeout,
)
from engine.metrics import prometheus, tally
from engine.settings import Settings

log = logging.getLogger(__name__)


def make_session(limit: int) -> aiohttp.ClientSession:
    """The process's one client session: keep-alive pool of `limit` connections, no cookies."""
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=True,
        skip_auto_headers=("User-Agent",),
    )


class ServiceTokens:
    """The bearer token for calls to the timeline: static, or issued by the CA and cached."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self._static = settings.service_token or None
        self._issue_url = (
            f"{settings.ca_url}{settings.service_token_path}"
            if (settings.service_token_path)
            else None
        )
        self._timeout = aiohttp.ClientTimeout(total=settings.ca_timeout_ms / 1000)
        self._session = session
        self._token: str | None = None
        self._valid_until = 0.0
        self._inflight: asyncio.Future[str] | None = None

    async def get(self) -> str | None:
        """The current token; asks the CA (once for all waiters) when it has none or it aged."""
        if self._issue_url is None:
            return self._static
        if self._token is not None and time.monotonic() < self._valid_until:
            return self._token
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._issue())
            self._inflight.add_done_callback(self._clear_inflight)
        return await asyncio.shield(self._inflight)

    def _clear_inflight(self, _: object) -> None:
        self._inflight = None

    async def _issue(self) -> str:
        assert self._issue_url is not None
        try:
            async with self._session.post(self._issue_url, json={}, timeout=self._timeout) as rsp:
                body = await rsp.read()
                if rsp.status != 200:
                    prometheus.upstream_error("ca", prometheus.status_kind(rsp.status))
                    raise UpstreamError(f"CA refused to issue a service token ({rsp.status})")
            issued = wire.issued_token_decoder.decode(body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.debug("service token request failed: %r", exc)
            kind = "timeout" if isinstance(exc, TimeoutError) else "connect"
            prometheus.upstream_error("ca", kind)
            raise UpstreamRetryable(
                f"CA unreachable for a service token ({type(exc).__name__})"
            ) from None
        except msgspec.DecodeError as exc:
            log.debug("malformed service token answer: %s", exc)
            prometheus.upstream_error("ca", "malformed")
            raise UpstreamError("CA sent a malformed service token") from None
        lifetime = 3600.0
        if issued.expiresAt is not None:
            lifetime = max(0.0, issued.expiresAt / 1000 - time.time())
        self._token = issued.token
        self._valid_until = time.monotonic() + lifetime * 0.9
        return issued.token

    def drop(self) -> None:
        """Forget the cached token (the timeline refused it)."""
        self._token = None
        self._valid_until = 0.0


class TimelineClient:
    """GET {TIMELINE_SERVICE_URL}{TIMELINE_PATH}?limit={MAX_TIMELINE_SIZE}, decoded to posts."""

    def __init__(
        self, settings: Settings, session: aiohttp.ClientSession, tokens: ServiceTokens
    ) -> None:
        prefix, _, suffix = settings.timeline_path.partition("{userId}")
        self._prefix = settings.timeline_url + prefix
        self._suffix = f"{suffix}?limit={settings.max_timeline_size}"
        self._health_url = settings.timeline_url + "/health"
        self._session = session
        self._tokens = tokens
        self._timeout = aiohttp.ClientTimeout(total=settings.prefetch_timeout_ms / 1000)

    async def fetch(self, user_id: str) -> list[wire.Post]:
        """The user's posts; raises UpstreamNotFound, UpstreamTimeout, UpstreamRetryable, ..."""
        if tracing.tracer is not None:
            with tracing.span("timeline.fetch", "client", {"prefetch.user_id": user_id}):
                return await self._fetch(user_id)
        return await self._fetch(user_id)

    async def _fetch(self, user_id: str) -> list[wire.Post]:
        url = URL(self._prefix + user_id + self._suffix, encoded=True)
        started = time.perf_counter()
        try:
            status, body = await self._get(url, await self._tokens.get())
            if status in (401, 403):
                # The token may have been rotated: drop it and try once more with a new one.
                self._tokens.drop()
                prometheus.TOKEN_REFRESH.inc()
                status, body = await self._get(url, await self._tokens.get())
        finally:
            tally.observe(prometheus.FETCH_DURATION, time.perf_counter() - started)
        if status == 200:
            try:
                return wire.timeline_page_decoder.decode(body).posts
            except msgspec.DecodeError as exc:
                log.debug("malformed timeline body for %s: %s", user_id, exc)
                prometheus.upstream_error("timeline", "malformed")
                raise UpstreamError("Timeline service sent a malformed body") from None
        prometheus.upstream_error("timeline", prometheus.status_kind(status))
        if status == 404:
            raise UpstreamNotFound("Timeline service has no such user")
        if status >= 500:
            raise UpstreamRetryable(f"Timeline service answered {status}")
        raise UpstreamError(f"Timeline service answered {status}")

    async def _get(self, url: URL, token: str | None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if tracing.tracer is not None:
            tracing.inject(headers)  # the timeline service can continue the trace
        try:
            async with self._session.get(url, headers=headers, timeout=self._timeout) as rsp:
                return rsp.status, await rsp.read()
        except TimeoutError:
            prometheus.upstream_error("timeline", "timeout")
            raise UpstreamTimeout("Timeline service timed out") from None
        except aiohttp.ClientError as exc:
            log.debug("timeline call failed: %r", exc)
            prometheus.upstream_error("timeline", "connect")
            raise UpstreamRetryable(
                f"Timeline service unreachable ({type(exc).__name__})"
            ) from None

    async def health(self) -> dict[str, Any]:
        """The seed's `timeline` health check."""
        return await probe(self._session, self._health_url, "timelineStatus")


class CAClient:
    """POST {CA_URL}/api/tokens/validate with a 2 s timeout."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self._url = URL(settings.ca_url + "/api/tokens/validate", encoded=True)
        self._health_url = settings.ca_url + "/health"
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=settings.ca_timeout_ms / 1000)

    async def validate(self, token: str) -> wire.Validation:
        """The CA's verdict; a 401 is a verdict (valid false), anything unusable CAUnavailable."""
        if tracing.tracer is not None:
            with tracing.span("ca.validate", "client"):
                return await self._validate(token)
        return await self._validate(token)

    async def _validate(self, token: str) -> wire.Validation:
        headers = tracing.inject() if tracing.tracer is not None else None
        try:
            async with self._session.post(
                self._url, json={"token": token}, headers=headers, timeout=self._timeout
            ) as rsp:
                status, body = rsp.status, await rsp.read()
        except TimeoutError:
            prometheus.ca_call_failed("timeout")
            raise CAUnavailable("Certificate authority timed out") from None
        except aiohttp.ClientError:
            prometheus.ca_call_failed("connect")
            raise CAUnavailable("Certificate authority unreachable") from None
        if status not in (200, 401, 403):
            prometheus.ca_call_failed(prometheus.status_kind(status))
            raise CAUnavailable(f"Certificate authority answered {status}")
        try:
            verdict = wire.validation_decoder.decode(body)
        except msgspec.DecodeError:
            if status == 200:
                prometheus.ca_call_failed("malformed")
                raise CAUnavailable("Certificate authority sent a malformed answer") from None
            verdict = wire.Validation(valid=False)
        if status != 200:
            verdict.valid = False
        prometheus.CA_CALLS.labels(outcome="valid" if verdict.valid else "invalid").inc()
        return verdict

    async def health(self) -> dict[str, Any]:
        """The seed's `ca` health check."""
        return await probe(self._session, self._health_url, "caStatus")


async def probe(session: aiohttp.ClientSession, url: str, field: str) -> dict[str, Any]:
    """GET a /health URL within 2 s: {status: connected|disconnected, <field>, latency}."""
    started = time.perf_counter()
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as rsp:
            payload = await rsp.json(content_type=None) if rsp.status == 200 else {}
            ok = rsp.status == 200
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        return {"status": "disconnected", field: "unreachable", "error": type(exc).__name__}
    latency = f"{(time.perf_counter() - started) * 1000:.0f}ms"
    remote = payload.get("status", "unknown") if isinstance(payload, dict) else "unknown"
    return {"status": "connected" if ok else "error", field: remote, "latency": latency}
