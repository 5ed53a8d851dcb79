"""Prefetch control: scheduling, immediate prefetch, the queue, metrics, activity and events."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
from aiohttp import web

from api import validation
from api.appkeys import ACTIVITY, AUTH, RUNTIME, SETTINGS
from api.responses import iso_now, success
from engine.errors import BadRequest
from engine.metrics import daily
from engine.store.cache import wall_clock_ms
from engine.strategies.events import EVENT_TYPES, refresh_or_invalidate
from engine.strategies.leader import leader_status


async def _authorize(request: web.Request, permission: str, user: str | None = None) -> None:
    await request.app[AUTH].authorize(request.headers.get("Authorization"), permission, user)


async def schedule(request: web.Request) -> web.Response:
    """POST /api/prefetch/schedule/{userId} {priority?, delay?}: queue one prefetch job."""
    user = validation.user_id(request.match_info["userId"])
    await _authorize(request, "write", user)
    body = await validation.json_body(request)
    priority = validation.priority(body.get("priority"))
    delay = validation.delay(body.get("delay"))
    job = await request.app[RUNTIME].jobs.schedule(user, priority, delay)
    data: dict[str, Any] = {
        "jobId": job.jobId,
        "userId": job.userId,
        "priority": job.priority,
        "delay": job.delay,
    }
    if job.deduplicated:
        data["deduplicated"] = True
    return success(data, 202, "Prefetch job scheduled")


async def immediate(request: web.Request) -> web.Response:
    """POST /api/prefetch/immediate/{userId} {priority?}: prefetch now, bypassing the queue."""
    user = validation.user_id(request.match_info["userId"])
    await _authorize(request, "write", user)
    body = await validation.json_body(request)
    priority = validation.priority(body.get("priority"))
    result = await request.app[RUNTIME].prefetcher.immediate(user, priority)
    data = dataclasses.asdict(result)
    del data["stored"]  # internal: whether an invalidation dropped the write
    return success(data)


async def queue_stats(request: web.Request) -> web.Response:
    """GET /api/prefetch/queue/stats."""
    await _authorize(request, "read")
    runtime = request.app[RUNTIME]
    data = await runtime.jobs.stats()
    data["scheduler"] = await leader_status(runtime.redis["queue"])
    return success(data)


async def queue_failed(request: web.Request) -> web.Response:
    """GET /api/prefetch/queue/failed?limit=N: the newest failed jobs."""
    await _authorize(request, "read")
    limit = validation.limit(request.query.get("limit"))
    jobs = await request.app[RUNTIME].jobs.failed(limit)
    return success({"jobs": msgspec.to_builtins(jobs), "count": len(jobs)})


async def queue_retry(request: web.Request) -> web.Response:
    """POST /api/prefetch/queue/retry/{jobId}: queue a failed job again under its id."""
    await _authorize(request, "write")
    job_id = request.match_info["jobId"]
    # NotFound (JOB_NOT_FOUND) and Conflict (JOB_NOT_FAILED) carry their codes.
    await request.app[RUNTIME].jobs.retry(job_id)
    return success({"success": True, "jobId": job_id}, message="Job retry initiated")


async def metrics(request: web.Request) -> web.Response:
    """GET /api/prefetch/metrics: lifetime counters."""
    await _authorize(request, "read")
    data = await daily.read_day(request.app[RUNTIME].redis["metrics"], None)
    data["timestamp"] = iso_now()
    return success(data)


async def metrics_day(request: web.Request) -> web.Response:
    """GET /api/prefetch/metrics/{date}: one UTC day's counters (zeros for a quiet day)."""
    await _authorize(request, "read")
    day = validation.day(request.match_info["date"])
    data = await daily.read_day(request.app[RUNTIME].redis["metrics"], day)
    data["date"] = day
    data["timestamp"] = iso_now()
    return success(data)


async def activity(request: web.Request) -> web.Response:
    """POST /api/activity {userIds: [...]}: report users as active (batched to Redis).

    202 means held and about to be written (the last write landed); while Redis takes no
    writes, 503 with the reason (api.activity).
    """
    await _authorize(request, "write")
    body = await validation.json_body(request)
    users = validation.user_ids(body.get("userIds"), "userIds")
    recorded = request.app[ACTIVITY].accept(users)
    return success({"recorded": recorded}, 202)


def _event_users(body: dict[str, Any]) -> list[str]:
    """The users an event affects: `affectedUserIds` when given, else its `userId`."""
    kind = body.get("type")
    if not isinstance(kind, str) or kind not in EVENT_TYPES:
        raise BadRequest(
            "type must be one of " + ", ".join(sorted(EVENT_TYPES)), code="INVALID_EVENT"
        )
    if "userId" not in body:
        raise BadRequest("userId is required", code="INVALID_BODY")
    actor = validation.user_id(body["userId"])
    affected = body.get("affectedUserIds")
    if affected is None:
        return [actor]  # for follow.* the userId is the follower, whose timeline changes
    if not isinstance(affected, list) or len(affected) > validation.MAX_USER_IDS:
        raise BadRequest(
            f"affectedUserIds must be a list of at most {validation.MAX_USER_IDS} user ids",
            code="INVALID_BODY",
        )
    return list(dict.fromkeys(validation.user_id(user) for user in affected))


async def events(request: web.Request) -> web.Response:
    """POST /api/prefetch/events: refresh wanted timelines (forced, high), drop the others.

    A wanted user keeps being served the old entry until the refresh lands (a forced job
    overwrites even a fresh hot entry); if the upstream fails, the old entry stays. Only
    users nobody will read (no entry, not active) are invalidated.
    """
    await _authorize(request, "write")
    users = _event_users(await validation.json_body(request))
    if not request.app[SETTINGS].enable_event_triggered:
        return success({"refreshed": 0, "invalidated": 0, "deferred": 0, "enabled": False}, 202)
    if not users:
        return success({"refreshed": 0, "invalidated": 0, "deferred": 0}, 202)
    runtime = request.app[RUNTIME]
    outcome = await refresh_or_invalidate(
        runtime.cache,
        runtime.jobs,
        runtime.redis["metrics"],
        runtime.settings,
        users,
        wall_clock_ms(),
        request.app[ACTIVITY].is_pending,
    )
    data = {
        "refreshed": outcome.refreshed,
        "invalidated": outcome.invalidated,
        "deferred": outcome.deferred,
    }
    return success(data, 202)


ROUTES = [
    web.post("/api/prefetch/schedule/{userId}", schedule),
    web.post("/api/prefetch/immediate/{userId}", immediate),
    web.get("/api/prefetch/queue/stats", queue_stats),
    web.get("/api/prefetch/queue/failed", queue_failed),
    web.post("/api/prefetch/queue/retry/{jobId}", queue_retry),
    web.get("/api/prefetch/metrics", metrics),
    web.get("/api/prefetch/metrics/{date}", metrics_day),
    web.post("/api/activity", activity),
    web.post("/api/prefetch/events", events),
]
