"""The /health family and GET /metrics: no auth, the seed's shapes, honest statuses."""

from __future__ import annotations

import re

import pytest

from engine.settings import Settings
from tests.conftest import ApiClient, closed_port, new_user, serve_api

pytestmark = pytest.mark.timeout(30)

LATENCY = re.compile(r"^\d+ms$")
SIZE = re.compile(r"^\d+(\.\d+)?[KMGT]?B$")


async def test_health_when_everything_is_up(api: ApiClient) -> None:
    reply = await api.call("GET", "/health", token=None)
    assert reply.status == 200
    body = reply.body
    assert body["service"] == "exprsn-prefetch"
    assert body["status"] == "healthy"
    assert isinstance(body["uptime"], int) and body["timestamp"].endswith("Z")
    checks = body["checks"]
    assert set(checks) == {
        "hotCache",
        "warmCache",
        "timeline",
        "ca",
        "memory",
        "queue",
        "scheduler",
    }
    hot, warm = checks["hotCache"], checks["warmCache"]
    assert hot["status"] == warm["status"] == "connected"
    assert LATENCY.match(hot["latency"]) and SIZE.match(hot["memory"])
    assert hot["db"] == api.settings.db_hot and warm["db"] == api.settings.db_warm
    assert isinstance(hot["keys"], int) and isinstance(warm["keys"], int)
    assert checks["timeline"]["status"] == "connected"
    assert checks["timeline"]["timelineStatus"] == "healthy"
    assert checks["ca"]["status"] == "connected" and checks["ca"]["caStatus"] == "healthy"
    assert checks["memory"]["status"] == "healthy" and SIZE.match(checks["memory"]["rss"])
    assert checks["queue"] == {
        "status": "healthy",
        "waiting": 0,
        "active": 0,
        "completed": 0,
        "failed": 0,
    }
    # No scheduler runs beside this API: the check says so without degrading the service.
    assert checks["scheduler"] == {
        "status": "no-leader",
        "leader": None,
        "token": None,
        "leaseExpiresIn": None,
        "lastTick": None,
    }


async def test_redis_down_is_unhealthy_and_not_ready(settings: Settings) -> None:
    down = settings.with_overrides(redis_url=f"redis://127.0.0.1:{closed_port()}")
    async with serve_api(down) as api:
        reply = await api.call("GET", "/health", token=None)
        assert reply.status == 503
        assert reply.body["status"] == "unhealthy"
        assert reply.body["checks"]["hotCache"]["status"] == "disconnected"
        assert reply.body["checks"]["timeline"]["status"] == "connected"
        assert (await api.call("GET", "/health/ready", token=None)).status == 503
        assert (await api.call("GET", "/health/redis", token=None)).status == 503
        assert (await api.call("GET", "/health/cache", token=None)).status == 503
        live = await api.call("GET", "/health/live", token=None)
        assert live.status == 200 and live.body == {"status": "alive"}


async def test_unreachable_upstreams_degrade(settings: Settings) -> None:
    gone = f"http://127.0.0.1:{closed_port()}"
    async with serve_api(settings.with_overrides(ca_url=gone, timeline_url=gone)) as api:
        reply = await api.call("GET", "/health", token=None)
        assert reply.status == 200
        assert reply.body["status"] == "degraded"
        assert reply.body["checks"]["ca"]["status"] == "disconnected"
        assert reply.body["checks"]["timeline"]["status"] == "disconnected"
        for path in ("/health/ca", "/health/timeline"):
            check = await api.call("GET", path, token=None)
            assert check.status == 503 and check.body["healthy"] is False
        assert (await api.call("GET", "/health/ready", token=None)).status == 200


async def test_queue_backlog_degrades(settings: Settings) -> None:
    async with serve_api(settings.with_overrides(queue_backlog_degraded=1)) as api:
        for _ in range(2):
            await api.call("POST", f"/api/prefetch/schedule/{new_user()}")
        reply = await api.call("GET", "/health", token=None)
        assert reply.status == 200
        assert reply.body["status"] == "degraded"
        assert reply.body["checks"]["queue"]["status"] == "backlog"
        assert reply.body["checks"]["queue"]["waiting"] == 2


async def test_single_checks(api: ApiClient) -> None:
    ready = await api.call("GET", "/health/ready", token=None)
    assert ready.status == 200 and ready.body == {"status": "ready"}
    redis = await api.call("GET", "/health/redis", token=None)
    assert redis.status == 200 and redis.body["status"] == "healthy"
    assert redis.body["hotCache"]["status"] == redis.body["warmCache"]["status"] == "connected"
    for path, field in (("/health/timeline", "timelineStatus"), ("/health/ca", "caStatus")):
        check = await api.call("GET", path, token=None)
        assert check.status == 200
        assert check.body["status"] == "connected" and check.body[field] == "healthy"


async def test_cache_health_counts_entries_per_tier(api: ApiClient) -> None:
    await api.call("POST", f"/api/prefetch/immediate/{new_user()}", json={"priority": "high"})
    for _ in range(2):
        await api.call("GET", f"/api/cache/{new_user()}")  # read-through: warm
    reply = await api.call("GET", "/health/cache", token=None)
    assert reply.status == 200
    assert reply.body["hot"]["entries"] == 1 and reply.body["warm"]["entries"] == 2
    assert reply.body["hot"]["exact"] is True
    assert reply.body["hot"]["ttlMs"] == api.settings.hot_ttl_ms


async def test_prometheus_metrics(api: ApiClient) -> None:
    user = new_user()
    await api.call("GET", f"/api/cache/{user}")
    await api.call("GET", f"/api/cache/{user}")
    reply = await api.call("GET", "/metrics", token=None)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    text = reply.raw.decode()
    for name in (
        'prefetch_cache_hits_total{tier="warm"}',
        "prefetch_cache_misses_total",
        "prefetch_queue_jobs_total",
        "prefetch_queue_duration_seconds",
        "prefetch_timeline_fetch_duration_seconds",
        "prefetch_token_refresh_total",
    ):
        assert name in text, name
