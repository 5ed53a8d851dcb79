"""The job engine end to end: JobQueue → Redis → `prefetch worker` → sandbox → cache tiers.

Every test runs the real supervisor and worker processes (tests/engine_support.py) against
real Redis and the in-process sandbox, and waits on observable conditions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import pytest_asyncio

from engine import wire
from engine.broker.jobs import FAILED_KEEP, Fence, new_job_id
from engine.errors import Conflict, NotFound
from engine.store import keys
from engine.store.entry import decompress
from sandbox.timeline import MALFORMED_PREFIX, NOT_FOUND_PREFIX, UNAVAILABLE_PREFIX
from tests.engine_support import Engine, holds_for, user, wait_for

T = TypeVar("T")


@pytest_asyncio.fixture
async def engine(tmp_path: Path, redis_url: str, broker_url: str) -> AsyncIterator[Engine]:
    async with Engine.open(tmp_path, redis_url, broker_url) as harness:
        yield harness


async def failed_jobs(engine: Engine) -> dict[str, wire.FailedJob]:
    return {job.userId: job for job in await engine.jobs.failed(FAILED_KEEP)}


async def test_a_job_lands_in_the_tier_of_its_priority(engine: Engine) -> None:
    await engine.start_worker()
    users = {"high": user(), "medium": user(), "low": user()}
    scheduled = {p: await engine.jobs.schedule(u, p) for p, u in users.items()}
    assert not any(s.deduplicated for s in scheduled.values())

    await wait_for(lambda: engine.count_cached("hot", [users["high"]]), 10, "the high job in hot")
    await wait_for(
        lambda: _when(
            engine.count_cached("warm", [users["medium"], users["low"]]), lambda n: n == 2
        ),
        10,
        "the medium and low jobs in warm",
    )
    assert await engine.cached("warm", [users["high"]]) == [False]
    assert await engine.cached("hot", [users["medium"], users["low"]]) == [False, False]

    stored = await engine.hot.get(keys.timeline("hot", users["high"]))
    assert stored is not None
    body = orjson.loads(decompress(stored))
    assert body["success"] is True
    assert body["data"]["tier"] == "hot"
    assert body["data"]["postsCount"] == len(body["data"]["posts"]) == 100
    assert {post["userId"] for post in body["data"]["posts"]} == {users["high"]}

    # A job counts as completed just before Dramatiq acknowledges its message.
    stats = await wait_for(
        lambda: _when(engine.jobs.stats(), lambda s: (s["completed"], s["active"]) == (3, 0)),
        5,
        "3 completed and acknowledged",
    )
    assert (stats["failed"], stats["waiting"], stats["delayed"]) == (0, 0, 0)
    for uid in users.values():
        assert await engine.queue.execute("EXISTS", keys.pending_job(uid)) == 0
        assert await engine.fetches(uid) == 1
    assert engine.error_lines() == []


async def test_a_backlog_waiting_when_workers_start_is_served_at_once(engine: Engine) -> None:
    users = [user() for _ in range(300)]
    await asyncio.gather(*(engine.jobs.schedule(uid, "medium") for uid in users))
    await engine.start_worker(ready=False)
    await wait_for(
        lambda: _when(engine.count_cached("warm", users), lambda n: n == len(users)),
        10,
        "the backlog",
    )
    stats = await wait_for(
        lambda: _when(engine.jobs.stats(), lambda s: s["completed"] == len(users)),
        5,
        "counts",
    )
    # No job ran before the worker's resources were open (that fails and retries later).
    assert (stats["delayed"], stats["failed"], stats["waiting"]) == (0, 0, 0)
    assert (await engine.sandbox_stats())["timelineFetches"] == len(users)
    assert engine.error_lines() == []


@pytest.mark.timeout(90)
async def test_a_5xx_is_retried_twice_after_2s_then_4s_then_fails(engine: Engine) -> None:
    await engine.start_worker()
    uid = user(UNAVAILABLE_PREFIX)
    seen: dict[int, float] = {}  # fetch count -> when the sandbox was first seen at it

    async def attempts_reached(n: int, *, exactly: bool = False) -> bool:
        count = await engine.fetches(uid)
        seen.setdefault(count, time.monotonic())
        return count == n if exactly else count >= n

    start_ms = int(time.time() * 1000)
    job = await engine.jobs.schedule(uid, "medium")
    await wait_for(lambda: attempts_reached(3), 12, "three attempts", interval=0.02)
    job_failed = await wait_for(lambda: failed_jobs(engine), 5, "the failed record")

    first_gap = seen[2] - seen[1]
    second_gap = seen[3] - seen[2]
    # Lower bounds and an ordering only: a loaded machine may stretch any gap, never shorten it.
    print(f"retries after {first_gap:.2f}s and {second_gap:.2f}s")
    assert first_gap >= 1.9, f"first retry after {first_gap:.2f}s"
    assert second_gap >= 3.9, f"second retry after {second_gap:.2f}s"
    assert second_gap > first_gap + 1.5, "the backoff doubles"

    record = job_failed[uid]
    assert record.id == job.jobId
    assert record.attempts == 3
    assert "503" in record.failedReason
    assert record.timestamp - start_ms >= 6_000
    # On RabbitMQ the worker that promoted the last attempt from the delay queue may report
    # that a few ms after the failure was settled.
    await wait_for(
        lambda: _when(
            engine.jobs.stats(),
            lambda s: (s["failed"], s["completed"], s["delayed"]) == (1, 0, 0),
        ),
        2,
        "one failed job, nothing delayed",
    )
    assert await engine.queue.execute("EXISTS", keys.pending_job(uid)) == 0
    # No fourth attempt once the job is in the failed list.
    await holds_for(lambda: attempts_reached(3, exactly=True), 0.5, "three attempts in all")
    assert await engine.count_cached("warm", [uid]) == 0
    assert engine.error_lines() == []


async def test_404_and_malformed_bodies_fail_at_once_without_retry(engine: Engine) -> None:
    # A short backoff: a retry, if there were one, would come within the observation window.
    await engine.start_worker(PREFETCH_BACKOFF_MS="300")
    missing, malformed = user(NOT_FOUND_PREFIX), user(MALFORMED_PREFIX)
    start_ms = int(time.time() * 1000)
    await engine.jobs.schedule(missing, "high")
    await engine.jobs.schedule(malformed, "low")

    failed = await wait_for(
        lambda: _when(failed_jobs(engine), lambda jobs: len(jobs) == 2), 5, "two failed records"
    )
    for uid in (missing, malformed):
        assert failed[uid].attempts == 1
        assert failed[uid].timestamp >= start_ms
    assert "no such user" in failed[missing].failedReason
    assert "malformed" in failed[malformed].failedReason

    async def fetched_once() -> bool:
        by_user = (await engine.sandbox_stats())["byUser"]
        return bool(by_user.get(missing) == 1 and by_user.get(malformed) == 1)

    await holds_for(fetched_once, 1.0, "one fetch per user")
    stats = await engine.jobs.stats()
    assert (stats["failed"], stats["completed"], stats["delayed"], stats["waiting"]) == (
        2,
        0,
        0,
        0,
    )
    assert await engine.count_cached("hot", [missing]) == 0
    assert await engine.count_cached("warm", [malformed]) == 0
    assert engine.error_lines() == []


async def test_failed_list_keeps_the_newest_50_and_a_failed_job_can_be_retried(
    engine: Engine,
) -> None:
    await engine.start_worker()
    missing = [user(NOT_FOUND_PREFIX) for _ in range(FAILED_KEEP + 5)]
    await asyncio.gather(*(engine.jobs.schedule(uid, "medium") for uid in missing))
    await wait_for(
        lambda: _when(engine.jobs.stats(), lambda s: s["failed"] == len(missing)),
        15,
        "every job to fail",
    )
    assert await engine.queue.execute("LLEN", keys.FAILED_JOBS) == FAILED_KEEP
    kept = await engine.jobs.failed(FAILED_KEEP)
    assert len(kept) == FAILED_KEEP
    assert {job.userId for job in kept} <= set(missing)
    stamps = [job.timestamp for job in kept]
    assert stamps == sorted(stamps, reverse=True), "newest first"
    assert [job.id for job in await engine.jobs.failed(3)] == [job.id for job in kept[:3]]

    # A job that failed for a user who is fine now: retry puts it back under its id.
    uid = user()
    job_id = new_job_id(uid)
    await engine.jobs.fail(
        wire.FailedJob(
            id=job_id,
            userId=uid,
            priority="high",
            failedReason="Timeline service answered 503",
            attempts=3,
            timestamp=int(time.time() * 1000),
        )
    )
    assert (await engine.jobs.failed(1))[0].id == job_id
    retried = await engine.jobs.retry(job_id)
    assert (retried.jobId, retried.priority, retried.deduplicated) == (job_id, "high", False)
    await wait_for(lambda: engine.count_cached("hot", [uid]), 10, "the retried job in hot")
    assert job_id not in {job.id for job in await engine.jobs.failed(FAILED_KEEP)}
    await wait_for(
        lambda: _when(
            engine.queue.execute("EXISTS", keys.pending_job(uid)),
            lambda exists: exists == 0,
            lambda: True,
        ),
        5,
        "the pending mark to clear",
    )
    with pytest.raises(NotFound) as not_failed:
        await engine.jobs.retry(job_id)
    assert not_failed.value.code == "JOB_NOT_FOUND"
    assert await engine.fetches(uid) == 1
    assert engine.error_lines() == []


async def test_a_retry_of_a_job_that_is_pending_again_is_a_conflict(engine: Engine) -> None:
    uid = user()
    job_id = new_job_id(uid)
    failed = wire.FailedJob(
        id=job_id, userId=uid, priority="low", failedReason="x", attempts=3, timestamp=1
    )
    await engine.jobs.fail(failed)
    await engine.jobs.retry(job_id)
    with pytest.raises(Conflict) as conflict:
        await engine.jobs.retry(job_id)
    assert conflict.value.code == "JOB_NOT_FAILED"
    with pytest.raises(NotFound):
        await engine.jobs.retry("prefetch:not-a-job")


async def test_a_second_schedule_is_deduplicated_unless_it_raises_the_priority(
    engine: Engine,
) -> None:
    once, upgraded = user(), user()
    # Scheduled before any worker runs, so that all of them are pending at once.
    first = await engine.jobs.schedule(once, "medium")
    again = await engine.jobs.schedule(once, "medium")
    lower = await engine.jobs.schedule(once, "low")
    assert first.deduplicated is False
    for dup in (again, lower):
        assert (dup.jobId, dup.priority, dup.deduplicated) == (first.jobId, "medium", True)

    base = await engine.jobs.schedule(upgraded, "low")
    higher = await engine.jobs.schedule(upgraded, "high")
    assert higher.deduplicated is False
    assert higher.jobId != base.jobId, "a new job needs its own id, even in the same millisecond"
    pending = await engine.queue.execute("HGET", keys.pending_job(upgraded), "jobId")
    assert pending.decode() == higher.jobId
    assert (await engine.jobs.stats())["waiting"] == 3

    await engine.start_worker()
    await wait_for(lambda: engine.count_cached("warm", [once]), 10, "the deduplicated job")
    await wait_for(lambda: engine.count_cached("hot", [upgraded]), 10, "the upgraded job")
    await wait_for(
        lambda: _when(engine.jobs.stats(), lambda s: s["completed"] == 3),
        10,
        "three jobs done",
    )
    assert await engine.fetches(once) == 1
    for uid in (once, upgraded):
        assert await engine.queue.execute("EXISTS", keys.pending_job(uid)) == 0
    assert engine.error_lines() == []


async def test_a_delayed_job_waits_for_its_delay(engine: Engine) -> None:
    await engine.start_worker()
    uid = user()
    started = time.monotonic()
    await engine.jobs.schedule(uid, "medium", delay_ms=1_500)

    async def still_delayed() -> bool:
        stats = await engine.jobs.stats()
        return (stats["delayed"], stats["waiting"]) == (1, 0) and not await engine.count_cached(
            "warm", [uid]
        )

    # On RabbitMQ a worker holds the delayed message until its eta: it counts once the
    # worker's gauge says so, within a few tens of milliseconds.
    await wait_for(still_delayed, 1.0, "the job to count as delayed")
    held_until = started + 1.3
    await holds_for(
        still_delayed, max(0.2, held_until - time.monotonic()), "the job to stay delayed"
    )
    cached_at = await wait_for(
        lambda: _when(engine.count_cached("warm", [uid]), bool, time.monotonic),
        5,
        "the delayed job",
        interval=0.02,
    )
    waited = cached_at - started
    print(f"delayed job cached after {waited:.2f}s")
    assert waited >= 1.5, f"cached after {waited:.2f}s"
    # On RabbitMQ the delay queue's consumer hands the message on and acknowledges it in its
    # own thread, and its worker's gauge says so at its next check (GAUGE_CHECK_S): the
    # completion can land first.
    await wait_for(
        lambda: _when(
            engine.jobs.stats(),
            lambda s: (s["completed"], s["delayed"], s["waiting"]) == (1, 0, 0),
        ),
        5,
        "completion, nothing delayed or waiting",
    )
    assert await engine.fetches(uid) == 1
    assert engine.error_lines() == []


@pytest.mark.timeout(90)
async def test_a_high_priority_job_overtakes_a_backlog_of_low_ones(engine: Engine) -> None:
    await engine.start_sandbox(latency_ms=20)
    await engine.start_worker(PREFETCH_WORKER_COUNT="1", PREFETCH_JOB_CONCURRENCY="4")
    backlog = [user() for _ in range(3_000)]
    for chunk in range(0, len(backlog), 500):
        await asyncio.gather(
            *(engine.jobs.schedule(uid, "low") for uid in backlog[chunk : chunk + 500])
        )
    await wait_for(
        lambda: _when(engine.jobs.stats(), lambda s: s["completed"] >= 20),
        10,
        "the backlog to be worked on",
    )

    urgent = user()
    started = time.monotonic()
    before = (await engine.jobs.stats())["completed"]
    await engine.jobs.schedule(urgent, "high")
    await wait_for(lambda: engine.count_cached("hot", [urgent]), 10, "the high job", interval=0.02)
    took = time.monotonic() - started
    stats = await engine.jobs.stats()
    # An ordering, not a clock: while the high job waited, only a handful of the low ones
    # already fetched into the worker's memory (up to QUEUE_PREFETCH) could run before it.
    overtaken_by = stats["completed"] - before
    assert overtaken_by < 200, f"{overtaken_by} low jobs finished before the high one"
    assert stats["completed"] < len(backlog) // 2, f"backlog mostly done already: {stats}"
    assert stats["byPriority"]["low"]["waiting"] > len(backlog) // 2
    print(f"high job cached {took * 1000:.0f} ms after scheduling, {stats['completed']} done")
    assert engine.error_lines() == []


async def _when(
    awaitable: Awaitable[T],
    predicate: Callable[[T], object],
    value: Callable[[], Any] | None = None,
) -> Any:
    """`value()` (default: the awaited result) if `predicate` holds for the result, else None."""
    result = await awaitable
    if not predicate(result):
        return None
    return value() if value is not None else result


async def test_a_batch_message_prefetches_every_user_and_settles_each_failure(
    engine: Engine,
) -> None:
    await engine.start_worker(PREFETCH_JOB_CONCURRENCY="4")
    good = [user() for _ in range(120)]
    missing = user(NOT_FOUND_PREFIX)
    # 4 jobs in flight per process, so the 121 users of one message queue for their turn
    # instead of all fetching at once.
    await engine.jobs.schedule_batch([*good, missing], "high")

    await wait_for(
        lambda: _when(engine.count_cached("hot", good), lambda n: n == len(good)),
        20,
        "every user of the batch in hot",
    )
    failed = await wait_for(
        lambda: _when(failed_jobs(engine), lambda jobs: missing in jobs), 5, "the 404 user failed"
    )
    assert failed[missing].attempts == 1
    assert failed[missing].id.startswith(f"prefetch:{missing}:")
    stats = await wait_for(
        lambda: _when(engine.jobs.stats(), lambda s: s["completed"] == len(good)),
        5,
        "each user of the batch counted as a completed job",
    )
    assert stats["failed"] == 1
    for uid in good[:10]:
        assert await engine.fetches(uid) == 1
    assert engine.error_lines() == []


async def test_batches_keep_to_the_job_concurrency_and_free_their_slots(engine: Engine) -> None:
    # Three batches of 30 at once, 5 slots in one worker, an upstream that takes 100 ms: the
    # users take slots as they free, never more than 5 fetches at once, and every slot comes
    # back (a later batch still runs at full width).
    await engine.start_sandbox(latency_ms=100)
    await engine.start_worker(PREFETCH_WORKER_COUNT="1", PREFETCH_JOB_CONCURRENCY="5")
    batches = [[user() for _ in range(30)] for _ in range(3)]
    for batch in batches:
        await engine.jobs.schedule_batch(batch, "high")
    everyone = [uid for batch in batches for uid in batch]
    await wait_for(
        lambda: _when(engine.count_cached("hot", everyone), lambda n: n == len(everyone)),
        30,
        "every user of the three batches in hot",
    )
    assert (await engine.sandbox_stats())["peakInFlight"] == 5

    assert engine.sandbox is not None
    async with engine.http.post(f"{engine.sandbox.timeline_url}/__reset") as reset:
        reset.raise_for_status()
    later = [user() for _ in range(10)]
    await engine.jobs.schedule_batch(later, "high")
    await wait_for(
        lambda: _when(engine.count_cached("hot", later), lambda n: n == len(later)),
        10,
        "a later batch, with every slot given back",
    )
    assert (await engine.sandbox_stats())["peakInFlight"] == 5  # 4 if one slot had leaked


async def test_a_fenced_batch_lands_only_while_the_fence_holds(engine: Engine) -> None:
    fence = Fence("prefetch:test:fence", "leader-1:7")
    refused = await engine.jobs.schedule_batch([user()], "medium", origin="activity", fence=fence)
    assert refused is None
    assert (await engine.jobs.stats())["waiting"] == 0

    await engine.queue.execute("SET", fence.key, "leader-2:8")
    assert await engine.jobs.schedule_batch([user()], "medium", fence=fence) is None
    await engine.queue.execute("SET", fence.key, fence.value)
    landed = await engine.jobs.schedule_batch([user()], "medium", origin="activity", fence=fence)
    assert landed is not None and landed.startswith("batch:")
    assert (await engine.jobs.stats())["waiting"] == 1


async def test_a_forced_job_refreshes_a_fresh_hot_entry_and_a_plain_one_does_not(
    engine: Engine,
) -> None:
    await engine.start_worker()
    uid = user()
    await engine.jobs.schedule(uid, "high")
    await wait_for(lambda: engine.count_cached("hot", [uid]), 10, "the first fetch in hot")
    await wait_for(
        lambda: _when(engine.jobs.stats(), lambda s: s["completed"] == 1), 5, "first completion"
    )

    await engine.jobs.schedule(uid, "high")  # a fresh hot entry: a no-op
    await wait_for(
        lambda: _when(engine.jobs.stats(), lambda s: s["completed"] == 2), 5, "the no-op job"
    )
    assert await engine.fetches(uid) == 1

    await engine.jobs.schedule(uid, "high", origin="event", force=True)
    await wait_for(lambda: _when(engine.fetches(uid), lambda n: n == 2), 5, "the forced refetch")
