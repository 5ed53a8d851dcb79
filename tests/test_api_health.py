"""The /health family and GET /metrics: no auth, the seed's shapes, honest statuses."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.appkeys import RUNTIME
from api.memo import Memo
from engine.settings import Settings
from engine.store.fastredis import FastRedis
from tests.conftest import ApiClient, closed_port, eventually, new_user, serve_api

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


async def test_memory_over_the_configured_limit_is_pressure_and_degraded(
    settings: Settings,
) -> None:
    # Any API process holds more than 16 MB: the lowest limit the setting accepts.
    async with serve_api(settings.with_overrides(health_memory_limit_mb=16)) as api:
        reply = await api.call("GET", "/health", token=None)
        assert reply.status == 200 and reply.body["status"] == "degraded"
        memory = reply.body["checks"]["memory"]
        assert memory["status"] == "pressure" and memory["limit"] == "16MB"
    async with serve_api(settings.with_overrides(health_memory_limit_mb=100_000)) as api:
        memory = (await api.call("GET", "/health", token=None)).body["checks"]["memory"]
        assert memory["status"] == "healthy" and memory["limit"] == "100000MB"


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


def _samples(text: str) -> dict[str, float]:
    """Prometheus text as {name{labels}: value}."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


async def _metrics(api: ApiClient) -> dict[str, float]:
    reply = await api.call("GET", "/metrics", token=None)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    return _samples(reply.raw.decode())


async def test_prometheus_metrics_count_what_happened(api: ApiClient) -> None:
    before = await _metrics(api)
    user = new_user()
    await api.call("GET", f"/api/cache/{user}")  # a miss, fetched through
    await api.call("GET", f"/api/cache/{user}")  # a warm hit
    await api.call("GET", f"/api/cache/{user}")  # another
    after = await _metrics(api)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew('prefetch_cache_hits_total{tier="warm"}') == 2
    assert grew('prefetch_cache_hits_total{tier="hot"}') == 0
    assert grew("prefetch_cache_misses_total") == 1
    assert grew('prefetch_queue_jobs_total{status="completed"}') == 1  # the read-through
    assert grew('prefetch_queue_jobs_total{status="failed"}') == 0
    assert grew("prefetch_queue_duration_seconds_count") == 1
    assert grew("prefetch_timeline_fetch_duration_seconds_count") == 1
    assert grew("prefetch_token_refresh_total") == 0
    assert "prefetch_token_refresh_total" in after


async def test_cache_health_keeps_its_answer_for_a_few_seconds(api: ApiClient) -> None:
    first = await api.call("GET", "/health/cache", token=None)
    assert first.status == 200 and first.body["hot"]["entries"] == 0
    await api.call("POST", f"/api/prefetch/immediate/{new_user()}", json={"priority": "high"})
    again = await api.call("GET", "/health/cache", token=None)
    assert again.body == first.body  # the SCANs are not run again within CACHE_COUNTS_TTL_S


async def test_a_memo_computes_once_for_concurrent_callers_and_again_when_stale() -> None:
    calls = 0

    async def compute() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        if calls == 3:
            raise RuntimeError("boom")
        return calls

    memo: Memo[int] = Memo(ttl_s=0.05)
    assert await asyncio.gather(*(memo.get(compute) for _ in range(20))) == [1] * 20
    assert await memo.get(compute) == 1
    await eventually(lambda: _stale(memo, compute), timeout=5)
    assert calls == 2
    # A failure is not kept: the next caller computes again.
    await eventually(lambda: _fails(memo, compute), timeout=5)
    assert await memo.get(compute) == 4


async def _stale(memo: Memo[int], compute: Callable[[], Awaitable[int]]) -> bool:
    return await memo.get(compute) == 2


async def _fails(memo: Memo[int], compute: Callable[[], Awaitable[int]]) -> bool:
    try:
        await memo.get(compute)
    except RuntimeError:
        return True
    return False


async def test_redis_down_names_no_host_or_port(settings: Settings) -> None:
    port = closed_port()
    async with serve_api(settings.with_overrides(redis_url=f"redis://127.0.0.1:{port}")) as api:
        for method, path in (
            ("GET", f"/api/cache/{new_user()}"),
            ("POST", f"/api/prefetch/schedule/{new_user()}"),
            ("GET", "/api/prefetch/queue/stats"),
        ):
            reply = await api.call(method, path)
            assert reply.status == 503 and reply.body["error"] == "REDIS_UNAVAILABLE"
            assert reply.body["message"] == "Redis is unavailable"
            assert str(port) not in reply.raw.decode()


async def test_background_flushes_do_not_share_the_read_connection(settings: Settings) -> None:
    one_db = settings.with_overrides(db_hot=10, db_warm=10, db_queue=10, db_metrics=10)
    async with serve_api(one_db) as api:
        user = new_user()
        assert (await api.call("GET", f"/api/cache/{user}")).status == 200
        runtime = api.app[RUNTIME]
        background = runtime.redis["background"]
        assert background is not runtime.redis["hot"] is runtime.redis["metrics"]
        # A slow reply on the background connection (a big flush, say) ...
        stalled = asyncio.ensure_future(background.execute("BLPOP", "prefetch:test:never", 3))
        await eventually(lambda: _in_flight(background))
        # ... holds no read up: they answer while it is still waiting.
        for _ in range(5):
            assert (await api.call("GET", f"/api/cache/{user}")).status == 200
        assert not stalled.done()
        assert await stalled is None


async def _in_flight(client: FastRedis) -> bool:
    return client.in_flight == 1
