"""Events keep serving the old entry, and the usefulness counters (prefetches by origin, read
before expiry, wasted) through the real API, a real Runtime (as a worker has) and Redis."""

from __future__ import annotations

import time
from typing import Any

import dramatiq
import pytest
from prometheus_client import REGISTRY

from engine.broker.actors import run_job
from engine.broker.jobs import ORIGINS
from engine.runtime import open_runtime
from engine.settings import Settings
from engine.store.cache import wall_clock_ms
from engine.store.fastredis import FastRedis
from engine.strategies import usefulness
from sandbox.timeline import UNAVAILABLE_PREFIX
from tests.conftest import ApiClient, eventually, new_user
from tests.strategy_support import DAY, queued_batches, store_at

pytestmark = pytest.mark.timeout(60)


async def _metrics(api: ApiClient) -> dict[str, Any]:
    reply = await api.call("GET", "/api/prefetch/metrics")
    assert reply.status == 200
    data: dict[str, Any] = reply.body["data"]
    return data


async def test_an_event_keeps_the_old_entry_readable_when_the_refresh_fails(
    api: ApiClient, settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    user = new_user(UNAVAILABLE_PREFIX)  # the sandbox answers 503 to every fetch
    await store_at(settings, redis_roles, user, "hot", wall_clock_ms())
    before = await api.call("GET", f"/api/cache/{user}")
    assert before.status == 200

    body = {"type": "post.created", "userId": new_user(), "affectedUserIds": [user]}
    reply = await api.call("POST", "/api/prefetch/events", json=body)
    assert reply.body["data"] == {"refreshed": 1, "invalidated": 0, "deferred": 0}
    [job] = [b for b in await queued_batches(redis_roles["queue"]) if user in b.users]
    assert job.actor == "prefetch_high" and job.origin == "event" and job.force

    # The job's attempt runs as a worker runs it, and fails (the engine's middleware decides
    # between a retry and the failed list: tests/test_engine_jobs.py covers that part).
    async with open_runtime(settings) as runtime:
        with pytest.raises(dramatiq.Retry):
            await run_job(runtime, "high", user, "prefetch:x:1", origin="event", force=True)
    after = await api.call("GET", f"/api/cache/{user}")
    assert after.status == 200 and after.raw == before.raw


def _prometheus(name: str, origin: str) -> float:
    return REGISTRY.get_sample_value(name, {"origin": origin}) or 0.0


async def test_usefulness_counters_match_a_scripted_sequence(
    api: ApiClient, settings: Settings
) -> None:
    read_name, wasted_name = (
        "prefetch_prefetched_entries_read_total",
        "prefetch_prefetched_entries_wasted_total",
    )
    read_before = {o: _prometheus(read_name, o) for o in ORIGINS}
    wasted_before = {o: _prometheus(wasted_name, o) for o in ORIGINS}
    by_activity, by_prediction, by_event, by_read, by_immediate = (new_user() for _ in range(5))
    async with open_runtime(settings) as worker:  # a worker's own Runtime and stats
        prefetch = worker.prefetcher.prefetch
        for user, priority, origin in (
            (by_activity, "high", "activity"),
            (by_prediction, "medium", "predictive"),
            (by_event, "high", "event"),
            (by_event, "high", "event"),  # replaces the first, unread: wasted
        ):
            started = time.perf_counter()
            await prefetch(user, priority, force=True, origin=origin)
            worker.prefetcher.record(True, started, origin)
        for _ in range(2):  # one read uses the prefetch; the second finds no mark
            assert (await api.call("GET", f"/api/cache/{by_activity}")).status == 200
        for _ in range(2):  # a read-through, then a hit on an entry nobody prefetched
            assert (await api.call("GET", f"/api/cache/{by_read}")).status == 200
        assert (await api.call("POST", f"/api/prefetch/immediate/{by_immediate}")).status == 200
        assert (await api.call("GET", f"/api/cache/{by_immediate}")).status == 200

        async def reads_counted() -> bool:
            return bool((await _metrics(api))["usefulness"]["readBeforeExpiry"] == 2)

        await eventually(reads_counted)
        # A day later every entry expired: the unread ones are wasted.
        wasted = await usefulness.sweep(worker.redis, wall_clock_ms() + DAY, worker.stats)
        assert wasted == 2
        await worker.stats.flush()

    data = await _metrics(api)
    assert data["prefetch"]["byOrigin"] == {
        "schedule": 0,
        "immediate": 1,
        "read-through": 1,
        "activity": 1,
        "event": 2,
        "predictive": 1,
    }
    assert data["prefetch"]["totalJobs"] == 6
    use = data["usefulness"]
    assert (use["readBeforeExpiry"], use["wasted"], use["precision"]) == (2, 3, 0.4)
    by_origin = use["byOrigin"]
    assert by_origin["activity"] == {"readBeforeExpiry": 1, "wasted": 0, "precision": 1.0}
    assert by_origin["immediate"] == {"readBeforeExpiry": 1, "wasted": 0, "precision": 1.0}
    assert by_origin["event"] == {"readBeforeExpiry": 0, "wasted": 2, "precision": 0.0}
    assert by_origin["predictive"] == {"readBeforeExpiry": 0, "wasted": 1, "precision": 0.0}
    assert by_origin["read-through"] == {"readBeforeExpiry": 0, "wasted": 0, "precision": None}
    read_delta = {o: _prometheus(read_name, o) - read_before[o] for o in ORIGINS}
    wasted_delta = {o: _prometheus(wasted_name, o) - wasted_before[o] for o in ORIGINS}
    assert {o: n for o, n in read_delta.items() if n} == {"activity": 1, "immediate": 1}
    assert {o: n for o, n in wasted_delta.items() if n} == {"event": 2, "predictive": 1}
