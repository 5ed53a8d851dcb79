"""The strategies' decisions on a real Redis, driven tick by tick (`Scheduler.tick(now_ms)`)
with real and virtual clocks: indexes, selection, priorities, the lease and its fence,
predictive profiles over a virtual week. No worker runs: what a tick decided is read back
from the queue."""

from __future__ import annotations

import asyncio

import pytest

from engine.broker.jobs import JobQueue
from engine.settings import Settings
from engine.store import keys
from engine.store.cache import TimelineCache, wall_clock_ms
from engine.store.fastredis import FastRedis
from engine.strategies.activity import Candidate, record_activity, split_by_rank
from engine.strategies.events import refresh_or_invalidate
from engine.strategies.leader import LAPSE_MARGIN_S, Lease, fenced_enqueues, leader_status
from engine.strategies.runner import run_scheduler
from engine.strategies.scheduler import Scheduler
from tests.conftest import closed_port, new_user
from tests.engine_support import holds_for, wait_for
from tests.strategy_support import (
    DAY,
    DAY0,
    HOUR,
    MINUTE,
    queued_batches,
    queued_users,
    store_at,
)

pytestmark = pytest.mark.timeout(60)


def activity_settings(settings: Settings, **changes: object) -> Settings:
    return settings.with_overrides(
        enable_activity_based=True,
        activity_check_interval_ms=60_000,
        activity_window_ms=15 * MINUTE,
        activity_refresh_lead_ms=10_000,
        **changes,
    )


def scheduler_for(settings: Settings, redis: dict[str, FastRedis]) -> Scheduler:
    return Scheduler(settings, redis, JobQueue(redis["queue"]))


async def test_the_store_writes_the_expiry_index_and_an_invalidation_removes_it(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    user = new_user()
    shard = keys.shard_of(user)
    at = wall_clock_ms()
    assert await store_at(settings, redis_roles, user, "warm", at, origin="activity")
    hot, warm = redis_roles["hot"], redis_roles["warm"]
    expiry = await warm.execute("ZSCORE", keys.expiry_index("warm", shard), user)
    assert int(float(expiry)) == at + settings.warm_ttl_ms
    assert await warm.execute("HGET", keys.unread_origin("warm", shard), user) == b"activity"
    assert await hot.execute("ZSCORE", keys.expiry_index("hot", shard), user) is None

    await TimelineCache(settings, hot, warm).invalidate(user)
    assert await warm.execute("EXISTS", keys.timeline("warm", user)) == 0
    assert await warm.execute("ZSCORE", keys.expiry_index("warm", shard), user) is None
    assert await warm.execute("HGET", keys.unread_origin("warm", shard), user) is None
    assert await warm.execute("ZSCORE", keys.unread_index("warm", shard), user) is None


async def test_a_tick_enqueues_active_users_whose_entry_is_missing_or_about_to_expire(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    s = activity_settings(settings, batch_size=2, activity_high_percent=0)
    now = wall_clock_ms()
    missing, expiring, covered, idle = (new_user() for _ in range(4))
    extra = [new_user() for _ in range(3)]
    await record_activity(redis_roles["metrics"], s, [missing, expiring, covered, *extra], now)
    await record_activity(redis_roles["metrics"], s, [idle], now - s.activity_window_ms - 1)
    # `expiring` ends before the next tick (+ lead); `covered` outlives it.
    horizon = now + s.activity_check_interval_ms + s.activity_refresh_lead_ms
    await store_at(s, redis_roles, expiring, "hot", horizon - 1 - s.hot_ttl_ms)
    await store_at(s, redis_roles, covered, "warm", horizon + 1 - s.warm_ttl_ms)

    report = await scheduler_for(s, redis_roles).tick(now)

    assert report.candidates == {"activity": 6}  # the idle user is not a candidate
    assert report.selected == {"activity": 5}
    batches = await queued_batches(redis_roles["queue"])
    chosen = queued_users(batches)
    assert set(chosen) == {missing, expiring, *extra}
    assert all(b.origin == "activity" and len(b.users) <= 2 for b in batches)
    assert all(b.actor == "prefetch_batch_medium" for b in batches)  # 0% high
    # The entry that still exists is refetched even if fresh: it expires before the next tick.
    assert chosen[expiring].force and not chosen[missing].force
    # The idle user left the index (and its frequency with it).
    metrics = redis_roles["metrics"]
    assert await metrics.execute("ZSCORE", keys.activity_index(keys.shard_of(idle)), idle) is None
    assert await metrics.execute("HGET", keys.activity_frequency(keys.shard_of(idle)), idle) is None


async def test_users_in_flight_are_not_enqueued_again_until_their_claim_lapses(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    s = activity_settings(settings)
    now = wall_clock_ms()
    user = new_user()
    await record_activity(redis_roles["metrics"], s, [user], now)
    scheduler = scheduler_for(s, redis_roles)
    assert (await scheduler.tick(now)).selected == {"activity": 1}
    later = now + s.activity_check_interval_ms
    assert (await scheduler.tick(later)).selected == {}  # its batch is still in flight
    # Its entry landed: covered, nothing to do even after the claim lapses.
    await store_at(s, redis_roles, user, "hot", later)
    await record_activity(redis_roles["metrics"], s, [user], later)
    assert (await scheduler.tick(now + scheduler.claim_ms + 1)).selected == {}
    # Without an entry (a failed fetch), the user is selected again once the claim lapses.
    other = new_user()
    await record_activity(redis_roles["metrics"], s, [other], later)
    assert (await scheduler.tick(later)).selected == {"activity": 1}
    assert (await scheduler.tick(later + scheduler.claim_ms + 1)).selected == {"activity": 1}


async def test_the_most_frequent_and_most_recent_users_get_high_priority(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    s = activity_settings(settings, activity_high_percent=50)
    now = wall_clock_ms()
    busy, recent, stale, once = (new_user() for _ in range(4))
    metrics = redis_roles["metrics"]
    for i in range(5):  # five activity flushes in one session
        await record_activity(metrics, s, [busy], now - 10 * MINUTE + i * 1000)
    await record_activity(metrics, s, [stale], now - 14 * MINUTE)
    await record_activity(metrics, s, [stale], now - 13 * MINUTE)
    await record_activity(metrics, s, [recent], now - 1000)
    await record_activity(metrics, s, [recent], now)
    await record_activity(metrics, s, [once], now - 12 * MINUTE)

    await scheduler_for(s, redis_roles).tick(now)
    chosen = queued_users(await queued_batches(redis_roles["queue"]))
    assert {u for u, b in chosen.items() if b.actor == "prefetch_batch_high"} == {busy, recent}
    assert {u for u, b in chosen.items() if b.actor == "prefetch_batch_medium"} == {stale, once}


def test_split_by_rank_rounds_the_high_share_up() -> None:
    ranked = [Candidate(str(i), float(i)) for i in range(10)]
    assert split_by_rank(ranked, 25)["high"] == ["9", "8", "7"]
    assert split_by_rank(ranked, 0)["high"] == []
    assert len(split_by_rank(ranked, 100)["medium"]) == 0


async def test_a_stale_leaders_enqueue_is_refused_by_the_fence(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    s = activity_settings(settings)
    queue = redis_roles["queue"]
    now = wall_clock_ms()
    await record_activity(redis_roles["metrics"], s, [new_user()], now)
    first = Lease(queue, 1_000, "pod-a")
    second = Lease(queue, 1_000, "pod-b")
    assert await first.acquire()
    assert not await second.acquire()
    assert await first.renew()
    scheduler = scheduler_for(s, redis_roles)
    batches = await scheduler.plan(now)  # `first` decided what to enqueue...
    fence = first.fence()
    assert fence is not None and batches
    # ...and paused until its lease expired and `second` took over.
    await wait_for(second.acquire, 10, "the second contender to take the expired lease")

    report = await scheduler.enqueue(batches, now, fence)
    assert report.fenced and report.batches == 0
    assert await queued_batches(queue) == []
    assert not await first.renew() and not first.leading
    assert not await first.report({"at": now})  # nor can it publish a tick
    status = await leader_status(queue)
    assert status["leader"] == "pod-b"
    assert int(str(second.value).split(":")[0]) > int(str(fence.value).split(":")[0])
    # The new leader's fence lets the same batches through.
    assert (await scheduler.enqueue(batches, now, second.fence())).batches == len(batches)
    await second.release()
    assert (await leader_status(queue))["leader"] is None


async def test_a_follower_wakes_when_the_held_lease_is_due_to_lapse(
    redis_roles: dict[str, FastRedis],
) -> None:
    queue = redis_roles["queue"]
    leader = Lease(queue, 10_000, "pod-a")
    follower = Lease(queue, 10_000, "pod-b")
    assert await leader.acquire()
    # The leader died just after renewing: a quarter TTL (2.5 s) would be the follower's
    # poll. Here the lease has 300 ms left, and the follower wakes right after them.
    await queue.execute("PEXPIRE", keys.SCHEDULER_LEASE, 300)
    delay = await follower.step()
    assert not follower.leading
    assert 0 < delay <= 0.3 + LAPSE_MARGIN_S
    await asyncio.sleep(delay)  # what Lease.keep waits between steps
    assert await follower.step() == 10 / 3 and follower.leading  # it leads: it renews
    assert (await leader_status(queue))["leader"] == "pod-b"
    await follower.release()


async def test_every_fenced_enqueue_is_logged_under_its_lease_and_a_refused_one_is_not(
    redis_roles: dict[str, FastRedis],
) -> None:
    queue = redis_roles["queue"]
    await queue.execute("DEL", keys.FENCED_ENQUEUES)
    jobs = JobQueue(queue)
    first = Lease(queue, 1_000, "pod-a")
    second = Lease(queue, 1_000, "pod-b")
    assert await first.acquire()
    stale = first.fence()
    assert stale is not None
    assert await jobs.schedule_batch([new_user()], "medium", origin="activity", fence=stale)
    assert await jobs.schedule_batch([new_user()], "medium") is not None  # not fenced: no note
    await wait_for(second.acquire, 10, "the second contender to take the expired lease")
    assert await jobs.schedule_batch([new_user()], "low", origin="activity", fence=stale) is None
    assert await jobs.schedule_batch([new_user()], "low", origin="activity", fence=second.fence())

    log = await fenced_enqueues(queue)
    assert [(entry.identity, entry.token) for entry in log] == [
        ("pod-a", int(stale.value.split(":")[0])),
        ("pod-b", int(str(second.value).split(":")[0])),
    ]
    # Oldest first, on Redis's clock: the newer lease enqueued later.
    assert log[0].token < log[1].token and log[0].at_ms < log[1].at_ms
    now = int((await queue.execute("TIME"))[0]) * 1000
    assert now - 10_000 < log[0].at_ms <= now + 1_000
    await second.release()


async def test_the_scheduler_outlives_an_unreachable_redis(settings: Settings) -> None:
    down = settings.with_overrides(
        redis_url=f"redis://127.0.0.1:{closed_port()}", scheduler_lease_ttl_ms=1_000
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_scheduler(down, stop, identity="lonely"))
    # Several lease attempts (every 250 ms) fail against the closed port: it keeps trying.
    await holds_for(lambda: not task.done(), 1.0, "the scheduler running without Redis")
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_a_forced_schedule_is_not_swallowed_by_a_pending_plain_job(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    jobs = JobQueue(redis_roles["queue"])
    user = new_user()
    plain = await jobs.schedule(user, "high")
    forced = await jobs.schedule(user, "high", origin="event", force=True)
    assert not forced.deduplicated and forced.jobId != plain.jobId
    # A pending forced job covers later ones, forced or not, of equal or lower priority.
    assert (await jobs.schedule(user, "high", origin="event", force=True)).deduplicated
    assert (await jobs.schedule(user, "medium")).jobId == forced.jobId
    assert (await jobs.stats())["byPriority"]["high"]["waiting"] == 2


async def test_an_entry_stored_after_the_claim_ends_it(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    s = activity_settings(settings, hot_ttl_ms=30_000)  # shorter than a tick's horizon
    now = wall_clock_ms()
    user = new_user()
    await record_activity(redis_roles["metrics"], s, [user], now)
    scheduler = scheduler_for(s, redis_roles)
    assert (await scheduler.tick(now)).selected == {"activity": 1}
    # Stored before the claim was made (an older entry): the batch is still in flight.
    await store_at(s, redis_roles, user, "hot", now - 1)
    assert (await scheduler.tick(now + 1_000)).selected == {}
    # Stored after: the batch landed, and its entry expires before the next tick's horizon.
    await store_at(s, redis_roles, user, "hot", now + 1_000)
    report = await scheduler.tick(now + 2_000)
    assert report.selected == {"activity": 1}
    batches = [b for b in await queued_batches(redis_roles["queue"]) if b.force]
    assert [b.users for b in batches] == [[user]]


async def test_an_event_refreshes_wanted_users_and_invalidates_the_rest_at_a_given_time(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    s = activity_settings(settings)
    now = DAY0 + 10 * HOUR  # virtual: the decision reads no clock of its own
    cached, active, pending, idle, gone, predicted = (new_user() for _ in range(6))
    await store_at(s, redis_roles, cached, "warm", now - MINUTE)
    await store_at(s, redis_roles, predicted, "warm", now - MINUTE, origin="predictive")
    await store_at(s, redis_roles, gone, "warm", now - DAY)  # no longer wanted by the index
    await redis_roles["warm"].execute("DEL", keys.timeline("warm", gone))  # expired
    metrics = redis_roles["metrics"]
    await record_activity(metrics, s, [active], now - s.activity_window_ms + 1)
    await record_activity(metrics, s, [idle], now - s.activity_window_ms - 1)
    cache = TimelineCache(s, redis_roles["hot"], redis_roles["warm"], clock=lambda: now)
    outcome = await refresh_or_invalidate(
        cache,
        JobQueue(redis_roles["queue"]),
        metrics,
        s,
        [cached, active, pending, idle, gone, predicted],
        now,
        {pending}.__contains__,
    )
    assert (outcome.refreshed, outcome.invalidated, outcome.deferred) == (2, 2, 2)
    chosen = queued_users(await queued_batches(redis_roles["queue"]))
    assert set(chosen) == {active, pending}
    assert all(
        b.origin == "event" and b.force and b.actor == "prefetch_high" for b in chosen.values()
    )
    # The old entry stays until the refresh lands; the others' generations moved.
    # Entries of users not reading now are kept as they are, neither refetched nor dropped,
    # and marked changed (refreshed at their next app open) until no entry could be left.
    for user in (cached, predicted):
        assert await redis_roles["warm"].execute("EXISTS", keys.timeline("warm", user)) == 1
        assert await redis_roles["warm"].execute("GET", keys.generation("warm", user)) is None
        changed = keys.changed_index(keys.shard_of(user))
        assert await metrics.execute("ZSCORE", changed, user) == str(now).encode()
    ticking = s.with_overrides(enable_event_triggered=True)
    await scheduler_for(ticking, redis_roles).tick(now + s.predictive_ttl_ms)
    assert await metrics.execute("ZSCORE", keys.changed_index(keys.shard_of(cached)), cached)
    await scheduler_for(ticking, redis_roles).tick(now + s.predictive_ttl_ms + 1)
    assert not await metrics.execute("ZSCORE", keys.changed_index(keys.shard_of(cached)), cached)
    for user in (idle, gone):
        assert await redis_roles["warm"].execute("GET", keys.generation("warm", user)) == b"1"
