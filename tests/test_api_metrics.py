"""Service metrics, reported activity and event-triggered prefetch."""

from __future__ import annotations

import re
import time
from typing import Any, cast

import pytest

from api import activity
from engine.errors import Busy
from engine.metrics.daily import BUCKETS_MS, utc_day
from engine.runtime import Runtime
from engine.settings import Settings
from engine.store import keys
from engine.store.fastredis import FastRedis
from tests.conftest import ApiClient, eventually, new_user, serve_api
from tests.strategy_support import queued_batches

pytestmark = pytest.mark.timeout(30)

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


async def _metrics(api: ApiClient, suffix: str = "") -> dict[str, Any]:
    reply = await api.call("GET", f"/api/prefetch/metrics{suffix}")
    assert reply.status == 200
    data: dict[str, Any] = reply.body["data"]
    return data


async def test_metrics_count_hits_misses_and_prefetches(api: ApiClient) -> None:
    hot_user, warm_user = new_user(), new_user()
    await api.call("POST", f"/api/prefetch/immediate/{hot_user}", json={"priority": "high"})
    for _ in range(2):
        assert (await api.call("GET", f"/api/cache/{hot_user}")).status == 200
    for _ in range(2):  # a read-through (miss), then a warm hit
        assert (await api.call("GET", f"/api/cache/{warm_user}")).status == 200

    async def flushed() -> bool:
        cache = (await _metrics(api))["cache"]
        return bool(cache["hotHits"] + cache["warmHits"] + cache["misses"] >= 4)

    await eventually(flushed)
    data = await _metrics(api)
    assert data["cache"] == {"hitRate": 0.75, "hotHits": 2, "warmHits": 1, "misses": 1}
    prefetch = data["prefetch"]
    assert prefetch["totalJobs"] == 2 and prefetch["successful"] == 2 and prefetch["failed"] == 0
    assert isinstance(prefetch["avgDuration"], int)
    # Percentiles are read off fixed buckets, and say so.
    assert prefetch["percentilesAre"] == "bucketUpperBoundsMs"
    assert {prefetch["p50"], prefetch["p95"], prefetch["p99"]} <= set(BUCKETS_MS)
    assert prefetch["p50"] <= prefetch["p95"] <= prefetch["p99"]
    assert ISO_UTC.match(data["timestamp"])

    today = await _metrics(api, f"/{utc_day()}")
    assert today["cache"] == data["cache"]
    assert today["prefetch"]["totalJobs"] == 2
    assert today["date"] == utc_day() and ISO_UTC.match(today["timestamp"])


async def test_failed_prefetches_are_counted(api: ApiClient) -> None:
    assert (await api.call("GET", f"/api/cache/{new_user('0000dead-')}")).status == 404

    async def flushed() -> bool:
        return bool((await _metrics(api))["prefetch"]["failed"] == 1)

    await eventually(flushed)
    assert (await _metrics(api))["cache"]["misses"] == 1


async def test_a_quiet_day_is_all_zeros(api: ApiClient) -> None:
    data = await _metrics(api, "/2001-01-01")
    assert data["cache"] == {"hitRate": 0, "hotHits": 0, "warmHits": 0, "misses": 0}
    assert data["prefetch"]["totalJobs"] == 0 and data["prefetch"]["avgDuration"] == 0


@pytest.mark.parametrize("day", ["2024-02-30", "2024-13-01", "20241221", "2024-1-01", "today"])
async def test_bad_date_is_400(api: ApiClient, day: str) -> None:
    reply = await api.call("GET", f"/api/prefetch/metrics/{day}")
    assert reply.status == 400
    assert reply.body["error"] == "INVALID_DATE"


def test_activity_is_taken_all_or_none_and_a_full_buffer_is_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """202 must mean held: users that do not all fit are refused (503), none kept."""
    monkeypatch.setattr(activity, "MAX_PENDING", 3)
    batcher = activity.ActivityBatcher(cast(Runtime, None))  # accept() never reaches Redis
    first, second = [new_user(), new_user()], [new_user(), new_user()]
    assert batcher.accept(first + first) == 2
    with pytest.raises(Busy) as refused:
        batcher.accept(second)
    assert refused.value.status == 503 and refused.value.code == "SERVICE_UNAVAILABLE"
    assert not any(batcher.is_pending(user) for user in second)
    assert all(batcher.is_pending(user) for user in first)


async def test_reported_activity_reaches_redis(
    api: ApiClient, redis_roles: dict[str, FastRedis]
) -> None:
    # More users than one slice of a flush (api.activity.FLUSH_SLICE): each slice must land.
    users = [new_user() for _ in range(2 * activity.FLUSH_SLICE + 45)]
    started_ms = int(time.time() * 1000)
    reply = await api.call("POST", "/api/activity", json={"userIds": [users[0].upper(), *users]})
    assert reply.status == 202
    assert reply.body == {"success": True, "data": {"recorded": len(users)}}
    metrics = redis_roles["metrics"]

    def last_active(user: str) -> Any:
        return metrics.execute("ZSCORE", keys.activity_index(keys.shard_of(user)), user)

    async def flushed() -> bool:
        return all([await last_active(user) is not None for user in users])

    await eventually(flushed)
    for user in users:
        assert int(float(await last_active(user))) >= started_ms
        frequency = keys.activity_frequency(keys.shard_of(user))
        assert await metrics.execute("HGET", frequency, user) == b"1"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "INVALID_BODY"),
        ({"userIds": []}, "INVALID_BODY"),
        ({"userIds": "not-a-list"}, "INVALID_BODY"),
        ({"userIds": [new_user() for _ in range(1001)]}, "INVALID_BODY"),
        ({"userIds": [new_user(), "nope"]}, "INVALID_UUID"),
        ({"userIds": [42]}, "INVALID_UUID"),
        ([1, 2], "INVALID_BODY"),
    ],
)
async def test_bad_activity_reports_are_400(api: ApiClient, body: Any, code: str) -> None:
    reply = await api.call("POST", "/api/activity", json=body)
    assert reply.status == 400
    assert reply.body["error"] == code


async def test_events_refresh_readers_keep_idle_entries_and_invalidate_the_rest(
    api: ApiClient, redis_roles: dict[str, FastRedis]
) -> None:
    cached, active, idle, unknown = new_user(), new_user(), new_user(), new_user()
    await api.call("POST", f"/api/prefetch/immediate/{cached}", json={"priority": "high"})
    await api.call("POST", "/api/activity", json={"userIds": [active]})
    # Long ago active, so outside the activity window: not worth a refresh.
    stale_ms = int(time.time() * 1000) - api.settings.activity_window_ms - 60_000
    await redis_roles["metrics"].execute(
        "ZADD", keys.activity_index(keys.shard_of(idle)), stale_ms, idle
    )

    body = {
        "type": "post.created",
        "userId": new_user(),
        "affectedUserIds": [cached, active, idle, unknown],
    }
    reply = await api.call("POST", "/api/prefetch/events", json=body)
    assert reply.status == 202
    data = {"refreshed": 1, "invalidated": 2, "deferred": 1}
    assert reply.body == {"success": True, "data": data}
    stats = (await api.call("GET", "/api/prefetch/queue/stats")).body["data"]
    assert stats["byPriority"]["high"]["waiting"] == 1  # the active user's refresh
    # The entry of a user who is not reading is kept as it is.
    status = (await api.call("GET", f"/api/cache/status/{cached}")).body["data"]
    assert status["cached"] is True and status["tier"] == "hot"


async def test_a_deferred_refresh_runs_at_the_users_next_app_open(
    api: ApiClient, redis_roles: dict[str, FastRedis]
) -> None:
    away, gone = new_user(), new_user()
    for user in (away, gone):
        await api.call("POST", f"/api/prefetch/immediate/{user}")
    body = {"type": "post.created", "userId": new_user(), "affectedUserIds": [away, gone]}
    reply = await api.call("POST", "/api/prefetch/events", json=body)
    assert reply.body["data"] == {"refreshed": 0, "invalidated": 0, "deferred": 2}
    for user in (away, gone):
        changed = keys.changed_index(keys.shard_of(user))
        assert await redis_roles["metrics"].execute("ZSCORE", changed, user) is not None
    queue = redis_roles["queue"]
    assert not [b for b in await queued_batches(queue) if {away, gone} & set(b.users)]
    # `gone`'s entry expires unseen; `away` opens the app: served from cache at once, and the
    # refresh the event deferred is scheduled by the activity flush.
    await api.call("DELETE", f"/api/cache/{gone}/timeline")
    assert (await api.call("GET", f"/api/cache/{away}")).body["meta"]["cached"] is True
    assert (await api.call("GET", f"/api/cache/{gone}")).body["meta"]["cached"] is False

    async def scheduled() -> bool:
        return any(away in b.users for b in await queued_batches(queue))

    await eventually(scheduled)
    [job] = [b for b in await queued_batches(queue) if away in b.users]
    assert job.actor == "prefetch_high" and job.origin == "event" and job.force
    assert not [b for b in await queued_batches(queue) if gone in b.users]  # a miss: fresh
    for user in (away, gone):  # the marks are taken at the open
        changed = keys.changed_index(keys.shard_of(user))
        assert await redis_roles["metrics"].execute("ZSCORE", changed, user) is None


async def test_follow_event_affects_the_follower(api: ApiClient) -> None:
    follower, away = new_user(), new_user()
    await api.call("POST", "/api/activity", json={"userIds": [follower]})
    body = {"type": "follow.created", "userId": follower}
    reply = await api.call("POST", "/api/prefetch/events", json=body)
    assert reply.body["data"] == {"refreshed": 1, "invalidated": 0, "deferred": 0}
    await api.call("POST", f"/api/prefetch/immediate/{away}")
    body = {"type": "follow.created", "userId": away}
    reply = await api.call("POST", "/api/prefetch/events", json=body)
    assert reply.body["data"] == {"refreshed": 0, "invalidated": 0, "deferred": 1}
    idle = {"type": "follow.deleted", "userId": new_user()}
    assert (await api.call("POST", "/api/prefetch/events", json=idle)).body["data"] == {
        "refreshed": 0,
        "invalidated": 1,
        "deferred": 0,
    }


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"type": "post.liked", "userId": new_user()}, "INVALID_EVENT"),
        ({"userId": new_user()}, "INVALID_EVENT"),
        ({"type": "post.created", "userId": "nope"}, "INVALID_UUID"),
        ({"type": "post.created", "userId": new_user(), "affectedUserIds": ["x"]}, "INVALID_UUID"),
        ({"type": "post.created"}, "INVALID_BODY"),
        ({"type": "post.created", "userId": new_user(), "affectedUserIds": "x"}, "INVALID_BODY"),
    ],
)
async def test_bad_events_are_400(api: ApiClient, body: dict[str, Any], code: str) -> None:
    reply = await api.call("POST", "/api/prefetch/events", json=body)
    assert reply.status == 400
    assert reply.body["error"] == code


async def test_events_do_nothing_when_disabled(settings: Settings) -> None:
    async with serve_api(settings.with_overrides(enable_event_triggered=False)) as api:
        user = new_user()
        await api.call("POST", f"/api/prefetch/immediate/{user}")
        body = {"type": "post.updated", "userId": user}
        reply = await api.call("POST", "/api/prefetch/events", json=body)
        assert reply.status == 202
        assert reply.body["data"] == {
            "refreshed": 0,
            "invalidated": 0,
            "deferred": 0,
            "enabled": False,
        }
        assert (await api.call("GET", f"/api/cache/status/{user}")).body["data"]["cached"] is True
