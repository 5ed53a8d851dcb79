"""Scheduling, immediate prefetch and the job queue routes. No worker runs: jobs stay waiting.

The queue routes run on each broker (`queue_api`): the queue in Redis, and on RabbitMQ.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from engine import wire
from engine.broker.jobs import JobQueue
from engine.settings import Settings
from engine.store import keys
from engine.store.fastredis import FastRedis
from tests.conftest import ApiClient, closed_port, new_user, serve_api
from tests.engine_support import empty_queues

pytestmark = pytest.mark.timeout(30)

JOB_ID = re.compile(r"^prefetch:([0-9a-f-]{36}):(\d+)$")


@pytest_asyncio.fixture
async def queue_api(settings: Settings, broker_url: str) -> AsyncIterator[ApiClient]:
    """The API with its queue on each broker in turn (RabbitMQ: its queues emptied first)."""
    if broker_url:
        await asyncio.to_thread(empty_queues, broker_url)
    async with serve_api(settings.with_overrides(broker_url=broker_url)) as client:
        yield client


async def _stats(api: ApiClient) -> dict[str, Any]:
    reply = await api.call("GET", "/api/prefetch/queue/stats")
    assert reply.status == 200
    data: dict[str, Any] = reply.body["data"]
    return data


async def test_schedule_queues_a_job(queue_api: ApiClient) -> None:
    api = queue_api
    user = new_user()
    before_ms = int(time.time() * 1000)
    reply = await api.call("POST", f"/api/prefetch/schedule/{user}")  # no body at all
    assert reply.status == 202
    assert reply.body["success"] is True
    assert reply.body["message"] == "Prefetch job scheduled"
    data = reply.body["data"]
    assert set(data) == {"jobId", "userId", "priority", "delay"}
    assert data["userId"] == user and data["priority"] == "medium" and data["delay"] == 0
    match = JOB_ID.match(data["jobId"])
    assert match is not None and match.group(1) == user
    assert int(match.group(2)) >= before_ms
    assert (await _stats(api))["waiting"] == 1


async def test_schedule_accepts_priority_and_delay(queue_api: ApiClient) -> None:
    api = queue_api
    user = new_user()
    body = {"priority": "low", "delay": 86_400_000}
    reply = await api.call("POST", f"/api/prefetch/schedule/{user}", json=body)
    assert reply.status == 202
    assert reply.body["data"]["priority"] == "low"
    assert reply.body["data"]["delay"] == 86_400_000
    stats = await _stats(api)
    assert stats["delayed"] == 1 and stats["waiting"] == 0


async def test_pending_job_of_equal_or_higher_priority_is_returned(queue_api: ApiClient) -> None:
    api = queue_api
    user = new_user()
    path = f"/api/prefetch/schedule/{user}"
    first = (await api.call("POST", path, json={"priority": "medium"})).body["data"]
    for priority in ("medium", "low"):
        reply = await api.call("POST", path, json={"priority": priority})
        assert reply.status == 202
        assert reply.body["data"] == {**first, "deduplicated": True}
    assert (await _stats(api))["waiting"] == 1

    higher = await api.call("POST", path, json={"priority": "high"})
    assert higher.status == 202
    assert higher.body["data"]["priority"] == "high"
    assert "deduplicated" not in higher.body["data"]
    stats = await _stats(api)
    assert stats["waiting"] == 2
    assert stats["byPriority"]["high"]["waiting"] == 1


@pytest.mark.parametrize("priority", ["urgent", "HIGH", 1, True, ["high"]])
async def test_unknown_priority_is_400(api: ApiClient, priority: object) -> None:
    for route in ("schedule", "immediate"):
        reply = await api.call(
            "POST", f"/api/prefetch/{route}/{new_user()}", json={"priority": priority}
        )
        assert reply.status == 400
        assert reply.body["error"] == "INVALID_PRIORITY"


async def test_a_delay_written_as_a_whole_double_is_that_integer(api: ApiClient) -> None:
    """Found by schemathesis: 86400000.0 is an integer to JSON Schema (and to JavaScript)."""
    body = {"delay": 86_400_000.0}
    reply = await api.call("POST", f"/api/prefetch/schedule/{new_user()}", json=body)
    assert reply.status == 202 and reply.body["data"]["delay"] == 86_400_000


@pytest.mark.parametrize("delay", [-1, 86_400_001, 1.5, 86_400_001.0, "10", True, [1]])
async def test_bad_delay_is_400(api: ApiClient, delay: object) -> None:
    reply = await api.call("POST", f"/api/prefetch/schedule/{new_user()}", json={"delay": delay})
    assert reply.status == 400
    assert reply.body["error"] == "INVALID_DELAY"


async def test_immediate_prefetches_then_reports_the_fresh_hot_entry(api: ApiClient) -> None:
    user = new_user()
    path = f"/api/prefetch/immediate/{user}"
    first = await api.call("POST", path, json={"priority": "high"})
    assert first.status == 200
    data = first.body["data"]
    assert set(data) == {"success", "cached", "tier", "postsCount", "duration"}
    assert data["success"] is True and data["cached"] is False
    assert data["tier"] == "hot" and data["postsCount"] == 100
    assert isinstance(data["duration"], int)

    second = (await api.call("POST", path, json={"priority": "high"})).body["data"]
    assert second["cached"] is True and second["tier"] == "hot" and second["postsCount"] == 100
    assert (await api.timeline_stats())["byUser"] == {user: 1}


async def test_immediate_medium_goes_to_warm(api: ApiClient) -> None:
    user = new_user()
    reply = await api.call("POST", f"/api/prefetch/immediate/{user}", json={"priority": "medium"})
    assert reply.body["data"]["tier"] == "warm" and reply.body["data"]["cached"] is False
    status = (await api.call("GET", f"/api/cache/status/{user}")).body["data"]
    assert status["tier"] == "warm"


@pytest.mark.parametrize(
    ("prefix", "status", "code"),
    [
        ("0000dead-", 404, "NOT_FOUND"),
        ("0000fa11-", 502, "PREFETCH_FAILED"),
        ("0000bad0-", 502, "PREFETCH_FAILED"),
        ("0000510e-", 504, "UPSTREAM_TIMEOUT"),
    ],
)
async def test_immediate_failures_map_to_status_codes(
    api: ApiClient, prefix: str, status: int, code: str
) -> None:
    reply = await api.call("POST", f"/api/prefetch/immediate/{new_user(prefix)}")
    assert reply.status == status
    assert reply.body["error"] == code


async def test_queue_stats_shape(queue_api: ApiClient) -> None:
    api = queue_api
    stats = await _stats(api)
    assert stats["name"] == "prefetch"
    for field in ("waiting", "active", "completed", "failed", "delayed"):
        assert stats[field] == 0, field


async def test_failed_list_is_empty_at_first(queue_api: ApiClient) -> None:
    api = queue_api
    reply = await api.call("GET", "/api/prefetch/queue/failed")
    assert reply.status == 200
    assert reply.body == {"success": True, "data": {"jobs": [], "count": 0}}
    assert (await api.call("GET", "/api/prefetch/queue/failed?limit=50")).status == 200


@pytest.mark.parametrize("limit", ["0", "51", "abc", "-1", "1.5", ""])
async def test_bad_limit_is_400(api: ApiClient, limit: str) -> None:
    reply = await api.call("GET", f"/api/prefetch/queue/failed?limit={limit}")
    assert reply.status == 400
    assert reply.body["error"] == "INVALID_LIMIT"


async def test_retry_of_unknown_job_is_404(queue_api: ApiClient) -> None:
    api = queue_api
    for job_id in (f"prefetch:{new_user()}:1703184000000", "not-a-job-id"):
        reply = await api.call("POST", f"/api/prefetch/queue/retry/{job_id}")
        assert reply.status == 404
        assert reply.body["error"] == "JOB_NOT_FOUND"


async def test_retry_of_a_pending_job_is_409(queue_api: ApiClient) -> None:
    api = queue_api
    user = new_user()
    job_id = (await api.call("POST", f"/api/prefetch/schedule/{user}")).body["data"]["jobId"]
    reply = await api.call("POST", f"/api/prefetch/queue/retry/{job_id}")
    assert reply.status == 409
    assert reply.body["error"] == "JOB_NOT_FAILED"


async def test_failed_jobs_are_listed_newest_first_and_retried(
    queue_api: ApiClient, redis_roles: dict[str, FastRedis]
) -> None:
    api = queue_api
    queue = JobQueue(redis_roles["queue"])
    older, newer = new_user(), new_user()
    for user, stamp in ((older, 1_703_184_000_000), (newer, 1_703_184_000_500)):
        await queue.fail(
            wire.FailedJob(
                id=f"prefetch:{user}:{stamp}",
                userId=user,
                priority="medium",
                failedReason="Timeline service answered 503",
                attempts=3,
                timestamp=stamp,
            )
        )
    listed = (await api.call("GET", "/api/prefetch/queue/failed")).body["data"]
    assert listed["count"] == 2
    assert [job["userId"] for job in listed["jobs"]] == [newer, older]
    assert listed["jobs"][0] == {
        "id": f"prefetch:{newer}:1703184000500",
        "userId": newer,
        "priority": "medium",
        "failedReason": "Timeline service answered 503",
        "attempts": 3,
        "timestamp": 1_703_184_000_500,
    }
    assert (await api.call("GET", "/api/prefetch/queue/failed?limit=1")).body["data"]["count"] == 1

    job_id = f"prefetch:{older}:1703184000000"
    reply = await api.call("POST", f"/api/prefetch/queue/retry/{job_id}")
    assert reply.status == 200
    assert reply.body == {
        "success": True,
        "message": "Job retry initiated",
        "data": {"success": True, "jobId": job_id},
    }
    listed = (await api.call("GET", "/api/prefetch/queue/failed")).body["data"]
    assert [job["id"] for job in listed["jobs"]] == [f"prefetch:{newer}:1703184000500"]
    stats = await _stats(api)
    assert stats["waiting"] == 1 and stats["failed"] == 2
    again = await api.call("POST", f"/api/prefetch/queue/retry/{job_id}")
    assert again.status == 409 and again.body["error"] == "JOB_NOT_FAILED"


async def test_with_the_broker_down_queue_routes_are_503_and_leave_no_mark(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    down = settings.with_overrides(broker_url=f"amqp://guest:guest@127.0.0.1:{closed_port()}/")
    user = new_user()
    async with serve_api(down) as api:
        for _ in range(2):  # the first one's mark is gone: the second is no duplicate of it
            reply = await api.call("POST", f"/api/prefetch/schedule/{user}")
            assert reply.status == 503
            assert reply.body["error"] == "QUEUE_UNAVAILABLE"
            assert await redis_roles["queue"].execute("EXISTS", keys.pending_job(user)) == 0
        stats = await api.call("GET", "/api/prefetch/queue/stats")
        assert (stats.status, stats.body["error"]) == (503, "QUEUE_UNAVAILABLE")
        health = await api.call("GET", "/health", token=None)
        assert health.body["checks"]["queue"]["status"] == "disconnected"
        # Reads do not need the queue.
        assert (await api.call("GET", f"/api/cache/status/{user}")).status == 200
