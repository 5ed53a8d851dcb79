"""The strategies in real processes: `prefetch worker` pods (supervisor, worker, scheduler),
the API on a loopback port, the sandbox and Redis. Leadership is tested with real signals.

Every role shares the engine tests' DBs (tests/engine_support.py); activity and metrics go
to the queue DB, which each test starts empty.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio

from engine.settings import Settings
from engine.store import keys
from engine.store.entry import decompress
from engine.strategies.leader import leader_status
from tests.conftest import ApiClient, serve_api
from tests.engine_support import (
    DB_HOT,
    DB_QUEUE,
    DB_WARM,
    Engine,
    EngineProcess,
    children_of,
    holds_for,
    user,
    wait_for,
)
from tests.strategy_support import store_at

pytestmark = pytest.mark.timeout(120)

LEASE_TTL_MS = 3_000
STRATEGY_ENV = {
    "ENABLE_ACTIVITY_BASED": "true",
    "ACTIVITY_CHECK_INTERVAL": "1000",
    "ACTIVITY_HIGH_PERCENT": "100",
    "SCHEDULER_LEASE_TTL": str(LEASE_TTL_MS),
    "REDIS_DB_METRICS": str(DB_QUEUE),
    "PREFETCH_WORKER_COUNT": "1",
}


@pytest_asyncio.fixture
async def engine(tmp_path: Path, redis_url: str, broker_url: str) -> AsyncIterator[Engine]:
    async with Engine.open(tmp_path, redis_url, broker_url) as harness:
        yield harness


def api_settings(engine: Engine, **changes: Any) -> Settings:
    assert engine.sandbox is not None
    return Settings().with_overrides(
        env="test",
        redis_url=engine.redis_url,
        redis_configured=True,
        db_hot=DB_HOT,
        db_warm=DB_WARM,
        db_queue=DB_QUEUE,
        db_metrics=DB_QUEUE,
        timeline_url=engine.sandbox.timeline_url,
        ca_url=engine.sandbox.ca_url,
        service_token="sandbox-service",
        metrics_dir="",
        broker_url=engine.broker_url,
        **changes,
    )


def scheduler_pid(pod: EngineProcess) -> int | None:
    for pid, title in children_of(pod.pid).items():
        if title == "prefetch: scheduler":
            return pid
    return None


async def ticks(engine: Engine) -> dict[str, int]:
    raw = await engine.queue.execute("HGETALL", keys.SCHEDULER_TICKS)
    return {raw[i].decode(): int(raw[i + 1]) for i in range(0, len(raw), 2)}


async def leader(engine: Engine) -> str | None:
    found: str | None = (await leader_status(engine.queue))["leader"]
    return found


async def test_activity_from_reads_and_reports_is_cached_within_two_ticks(
    engine: Engine,
) -> None:
    await engine.start_sandbox()
    # Ticks 2 s apart: a test loop stalled on a loaded machine cannot miss one.
    await engine.start_worker(**{**STRATEGY_ENV, "ACTIVITY_CHECK_INTERVAL": "2000"})
    await wait_for(lambda: leader(engine), 20, "a scheduler to lead")
    # The read-through's warm entry expires before the next tick: only the strategy puts
    # entries in hot (100% high).
    async with serve_api(api_settings(engine, warm_ttl_ms=2_000)) as api:
        reader, reported = user(), [user() for _ in range(3)]
        assert (await api.call("GET", f"/api/cache/{reader}")).status == 200
        reply = await api.call("POST", "/api/activity", json={"userIds": reported})
        assert reply.status == 202
        everyone = [reader, *reported]

        async def recorded() -> bool:
            scores = await engine.queue.pipeline(
                [("ZSCORE", keys.activity_index(keys.shard_of(u)), u) for u in everyone]
            )
            return all(score is not None for score in scores)

        await wait_for(recorded, 10, "the activity flush")
        ticks_at_record = sum((await ticks(engine)).values())

        async def ticks_when_claimed() -> int | None:
            # The tick that enqueues a user claims it, then reports (counts) itself: in one
            # snapshot, the counter is that tick's number or the one before.
            replies = await engine.queue.pipeline(
                [("ZSCORE", keys.strategy_claims(keys.shard_of(u)), u) for u in everyone]
                + [("HGETALL", keys.SCHEDULER_TICKS)]
            )
            if any(reply is None for reply in replies[:-1]):
                return None
            return sum(int(n) for n in replies[-1][1::2])

        claimed_at = await wait_for(ticks_when_claimed, 20, "every user enqueued", interval=0.02)
        assert claimed_at - ticks_at_record <= 2
        await wait_for(lambda: _all(engine.cached("hot", everyone)), 20, "every active user in hot")
        for uid in reported:
            assert await engine.fetches(uid) == 1
        status = (await api.call("GET", "/api/prefetch/queue/stats")).body["data"]
        assert status["scheduler"]["leader"] is not None
        # The last tick's report (a later tick may have had nothing left to enqueue).
        assert status["scheduler"]["lastTick"]["candidates.activity"] >= 0
        health = (await api.call("GET", "/health", token=None)).body["checks"]["scheduler"]
        assert health["status"] == "leading" and health["lastTick"]["ageMs"] >= 0


async def _all(awaitable: Any) -> bool:
    return all(await awaitable)


async def test_an_active_users_entry_is_refreshed_before_it_expires(engine: Engine) -> None:
    await engine.start_sandbox()
    hot_ttl = 5_000
    env = {**STRATEGY_ENV, "HOT_CACHE_TTL": str(hot_ttl), "ACTIVITY_REFRESH_LEAD": "2000"}
    await engine.start_worker(**env)
    async with serve_api(api_settings(engine, hot_ttl_ms=hot_ttl)) as api:
        uid = user()
        shard = keys.shard_of(uid)
        await api.call("POST", "/api/activity", json={"userIds": [uid]})

        async def expiry() -> int | None:
            score = await engine.hot.execute("ZSCORE", keys.expiry_index("hot", shard), uid)
            return int(float(score)) if score is not None else None

        first = await wait_for(expiry, 20, "the first hot entry")
        second = await wait_for(
            lambda: _when_changed(expiry(), first), 20, "the entry to be stored again"
        )
        # The new entry was stored (at its expiry minus the TTL) before the old one expired.
        assert second - hot_ttl < first
        stored = await engine.hot.get(keys.timeline("hot", uid))
        assert stored is not None
        assert orjson.loads(decompress(stored))["meta"]["fetchedAt"] <= second - hot_ttl
        assert await engine.fetches(uid) >= 2


async def _when_changed(awaitable: Any, old: int) -> int | None:
    value = await awaitable
    return value if value is not None and value != old else None


async def test_one_leader_ticks_a_paused_one_stays_out_and_a_dead_one_is_replaced(
    engine: Engine,
) -> None:
    await engine.start_sandbox()
    pods = [await engine.start_worker(**STRATEGY_ENV) for _ in range(2)]
    schedulers = {
        pod.pid: await wait_for(lambda p=pod: scheduler_pid(p), 10, "a scheduler child")
        for pod in pods
    }
    host = os.uname().nodename
    identity = {pod.pid: f"{host}:{schedulers[pod.pid]}" for pod in pods}
    first = await wait_for(lambda: leader(engine), 20, "a leader")
    leading = next(pod for pod in pods if identity[pod.pid] == first)
    standby = next(pod for pod in pods if pod is not leading)
    await wait_for(lambda: _ticked(engine, first, 2), 10, "the leader's ticks")

    async def only_the_leader_ticks() -> bool:
        return set(await ticks(engine)) == {first}

    await holds_for(only_the_leader_ticks, 3.0, "one pod ticking")

    # Paused past its lease: the other pod takes over; woken up, it neither ticks nor leads.
    os.kill(schedulers[leading.pid], signal.SIGSTOP)
    try:
        second = await wait_for(
            lambda: _other_than(leader(engine), first), 20, "the standby to take over"
        )
        assert second == identity[standby.pid]
        await wait_for(lambda: _ticked(engine, second, 1), 10, "the new leader's first tick")
    finally:
        os.kill(schedulers[leading.pid], signal.SIGCONT)
    paused_ticks = (await ticks(engine))[first]

    async def stays_out() -> bool:
        return (await ticks(engine))[first] == paused_ticks and await leader(engine) == second

    await holds_for(stays_out, 3.0, "the woken leader staying out")

    # SIGKILL the leading pod: the lease lapses and the woken pod takes over, not before.
    remaining_ms = int(await engine.queue.execute("PTTL", keys.SCHEDULER_LEASE))
    killed_at = time.monotonic()
    standby.kill()
    third = await wait_for(
        lambda: _other_than(leader(engine), second),
        (remaining_ms + 2 * LEASE_TTL_MS) / 1000 + 5,
        "the dead leader's replacement",
    )
    took_over_ms = (time.monotonic() - killed_at) * 1000
    assert third == first
    assert took_over_ms >= remaining_ms - 100, "the lease was taken before it lapsed"
    # Followers poll every quarter TTL: replaced well within one TTL of the lapse (the rest
    # of that TTL is slack for a loaded machine).
    assert took_over_ms <= remaining_ms + LEASE_TTL_MS
    await wait_for(lambda: _ticked(engine, first, paused_ticks + 1), 10, "ticks again")


async def _ticked(engine: Engine, identity: str, count: int) -> bool:
    return (await ticks(engine)).get(identity, 0) >= count


async def _other_than(awaitable: Any, old: str | None) -> str | None:
    value: str | None = await awaitable
    return value if value is not None and value != old else None


async def test_every_read_during_a_forced_refresh_is_a_hit(engine: Engine) -> None:
    await engine.start_sandbox(latency_ms=400)  # the refresh takes a while
    await engine.start_worker(ENABLE_ACTIVITY_BASED="false", REDIS_DB_METRICS=str(DB_QUEUE))
    settings = api_settings(engine, enable_activity_based=False)
    uid = user()
    redis = {"hot": engine.hot, "warm": engine.warm}
    await store_at(settings, redis, uid, "hot", int(time.time() * 1000) - 1_000)
    async with serve_api(settings) as api:
        old = await _fetched_at(api, uid)
        body = {"type": "post.updated", "userId": uid}
        reply = await api.call("POST", "/api/prefetch/events", json=body)
        assert reply.body["data"] == {"refreshed": 1, "invalidated": 0, "deferred": 0}
        reads = 0

        async def refreshed() -> bool:
            nonlocal reads
            reads += 1
            return await _fetched_at(api, uid) != old  # asserts a hit every time

        await wait_for(refreshed, 20, "the refreshed entry", interval=0.02)
        assert reads > 1  # the old entry was served while the refresh ran
        assert await engine.fetches(uid) == 1


async def _fetched_at(api: ApiClient, uid: str) -> int:
    reply = await api.call("GET", f"/api/cache/{uid}")
    assert reply.status == 200 and reply.body["meta"]["cached"] is True
    fetched: int = reply.body["meta"]["fetchedAt"]
    return fetched
