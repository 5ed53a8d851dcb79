"""The predictive strategy: habits learnt from app opens, windows around them, in virtual time.

No worker runs: what a tick decided is read back from the queue (tests.strategy_support), and
one test runs a predictive job as a worker would, to check the entry's TTL.
"""

from __future__ import annotations

import pytest

from engine.broker.actors import run_job
from engine.broker.jobs import JobQueue
from engine.runtime import open_runtime
from engine.settings import Settings
from engine.store import keys
from engine.store.fastredis import FastRedis
from engine.strategies.activity import record_activity
from engine.strategies.scheduler import Scheduler
from tests.conftest import new_user
from tests.strategy_support import DAY, DAY0, HOUR, MINUTE, queued_batches, queued_users

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def few_key_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sixteen key shards, as the replay runs: a tick visits every shard, and these tests tick
    through hours minute by minute (the selection is the same at any count: test_replay)."""
    monkeypatch.setattr(keys, "SHARDS", 16)


JITTER = [-4, 3, 0, 5, -2, 1, -3]  # minutes around 08:00, a week from Monday DAY0


def predictive(settings: Settings, **changes: object) -> Settings:
    values: dict[str, object] = {
        "enable_activity_based": True,
        "enable_predictive": True,
        "activity_check_interval_ms": MINUTE,
        "activity_window_ms": 5 * MINUTE,
        "predictive_lead_ms": 10 * MINUTE,
        "predictive_hold_ms": 10 * MINUTE,
    }
    values.update(changes)
    return settings.with_overrides(**values)


async def opens(metrics: FastRedis, s: Settings, user: str, times: list[int]) -> None:
    """App opens, each a session of three reads two minutes apart."""
    for at in times:
        for read in range(3):
            await record_activity(metrics, s, [user], at + read * 2 * MINUTE)


def week_of_habit(hour: float, jitter: list[int] = JITTER, day0: int = DAY0) -> list[int]:
    return [day0 + d * DAY + int(hour * HOUR) + j * MINUTE for d, j in enumerate(jitter)]


async def first_pick(
    scheduler: Scheduler,
    queue: FastRedis,
    start: int,
    minutes: range,
    user: str | None = None,
    k: int = 1,
) -> int | None:
    """The first minute (virtual, from `start`) at which a tick enqueued a predictive job
    (for `user`, when given)."""
    for minute in minutes:
        report = await scheduler.tick(start + minute * MINUTE // k)
        if report.selected.get("predictive"):
            if user is None:
                return minute
            chosen = queued_users(await queued_batches(queue))
            if user in chosen:
                return minute
    return None


def scheduler_for(s: Settings, redis: dict[str, FastRedis]) -> Scheduler:
    return Scheduler(s, redis, JobQueue(redis["queue"]))


async def day8_pick(s: Settings, redis: dict[str, FastRedis], minutes: range) -> int | None:
    """The first minute of the eighth day (after a week of history) with a predictive pick."""
    return await first_pick(scheduler_for(s, redis), redis["queue"], DAY0 + 7 * DAY, minutes)


async def test_a_daily_habit_is_prefetched_before_the_open_on_the_eighth_day(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    s = predictive(settings)
    habit, once = new_user(), new_user()
    metrics = redis_roles["metrics"]
    await opens(metrics, s, habit, week_of_habit(8))
    # One open, months ago: faded below the threshold long since.
    await record_activity(metrics, s, [once], DAY0 + 7 * DAY + 8 * HOUR - 16 * 7 * DAY)

    picked = await day8_pick(s, redis_roles, range(6 * 60, 8 * 60 + 1))
    assert picked is not None, "the habit was never prefetched"
    # The window opens three standard deviations of the habit's start before its mean (about
    # 08:00), at least the lead time: after 07:00, and at least 10 minutes early.
    assert 7 * 60 <= picked <= 7 * 60 + 50
    chosen = queued_users(await queued_batches(redis_roles["queue"]))
    assert set(chosen) == {habit}
    assert chosen[habit].origin == "predictive"
    assert chosen[habit].actor == "prefetch_batch_medium"
    assert await metrics.execute("HGET", keys.predict_profile(keys.shard_of(once)), once) is None


async def test_without_coverage_the_window_opens_the_lead_time_before_the_mean(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    s = predictive(settings, predictive_coverage=0.0)
    habit = new_user()
    await opens(redis_roles["metrics"], s, habit, week_of_habit(8))
    picked = await day8_pick(s, redis_roles, range(7 * 60, 8 * 60 + 1))
    # The weekday mean is 08:00 give or take the jitters' mean: picked 10 minutes before.
    assert picked is not None and 7 * 60 + 45 <= picked <= 7 * 60 + 52


async def test_a_habit_with_more_jitter_gets_a_wider_window(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    s = predictive(settings)
    tight, loose = new_user(), new_user()
    metrics = redis_roles["metrics"]
    await opens(metrics, s, tight, week_of_habit(8, [1, -1, 0, 1, -1, 0, 1]))
    await opens(metrics, s, loose, week_of_habit(8, [-40, 35, -5, 45, -30, 10, -15]))
    scheduler = scheduler_for(s, redis_roles)
    day8 = DAY0 + 7 * DAY
    loose_at = await first_pick(
        scheduler, redis_roles["queue"], day8, range(5 * 60, 8 * 60 + 1), loose
    )
    tight_at = await first_pick(
        scheduler, redis_roles["queue"], day8, range(5 * 60, 8 * 60 + 1), tight
    )
    assert loose_at is not None and tight_at is not None
    assert loose_at < tight_at - 20


async def test_a_single_open_predicts_the_next_days_only_while_its_weight_holds(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    s = predictive(settings)  # threshold 0.9, half-life 14 days: about two days
    once, also = new_user(), new_user()
    metrics = redis_roles["metrics"]
    await opens(metrics, s, once, [DAY0 + 8 * HOUR])  # a Monday
    await opens(metrics, s, also, [DAY0 + 8 * HOUR])
    scheduler, queue = scheduler_for(s, redis_roles), redis_roles["queue"]
    hours = range(6 * 60, 10 * 60)
    assert await first_pick(scheduler, queue, DAY0 + DAY, hours, once) is not None  # Tuesday
    # On Thursday the single open weighs 0.86: nothing, and the faded profile is forgotten.
    assert await first_pick(scheduler, queue, DAY0 + 3 * DAY, hours, also) is None
    assert await metrics.execute("HGET", keys.predict_profile(keys.shard_of(also)), also) is None


async def test_an_open_inside_the_window_uses_it_up(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    s = predictive(settings, predictive_coverage=0.0, predictive_hold_ms=40 * MINUTE)
    habit = new_user()
    metrics = redis_roles["metrics"]
    await opens(metrics, s, habit, week_of_habit(8))
    scheduler = scheduler_for(s, redis_roles)
    day8 = DAY0 + 7 * DAY
    assert (
        await first_pick(scheduler, redis_roles["queue"], day8, range(7 * 60, 8 * 60)) is not None
    )
    await opens(metrics, s, habit, [day8 + 8 * HOUR])  # the user came
    # Its session ends, the user goes idle; the rest of the window fetches nothing more.
    for minute in range(8 * 60 + 6, 8 * 60 + 50):
        report = await scheduler.tick(day8 + minute * MINUTE)
        assert not report.selected.get("predictive"), minute
    index = keys.predict_index(keys.shard_of(habit))
    due = float(await metrics.execute("ZSCORE", index, habit))
    assert day8 + DAY + 7 * HOUR <= due < day8 + DAY + 8 * HOUR  # the ninth day's window


async def test_weekend_habits_are_their_own(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    s = predictive(settings)
    user = new_user()
    metrics = redis_roles["metrics"]
    times = [
        DAY0 + d * DAY + (8 if d < 5 else 11) * HOUR + j * MINUTE for d, j in enumerate(JITTER)
    ]
    await opens(metrics, s, user, times)
    scheduler = scheduler_for(s, redis_roles)
    saturday = DAY0 + 12 * DAY  # the second Saturday
    hours = range(6 * 60, 11 * 60 + 1)
    picked = await first_pick(scheduler, redis_roles["queue"], saturday, hours)
    # The weekend habit's window (two opens: a wide one), not the weekday's of 08:00.
    assert picked is not None and 9 * 60 <= picked < 11 * 60


async def test_a_profile_stays_bounded_and_new_habits_replace_old_ones(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    s = predictive(settings)
    user = new_user()
    metrics = redis_roles["metrics"]
    # Twelve opens on weekdays, each at another time of day, two hours apart from the others.
    weekdays = [d for d in range(20) if d % 7 < 5][:12]
    times = [DAY0 + d * DAY + i * 2 * HOUR for i, d in enumerate(weekdays)]
    await opens(metrics, s, user, times)
    packed = await metrics.execute("HGET", keys.predict_profile(keys.shard_of(user)), user)
    habits = packed.split(b";")
    assert len(habits) == 8
    means = {round(float(h.split(b",")[3])) for h in habits}
    assert 22 * 60 in means and 0 not in means  # the newest kept, the oldest forgotten


async def test_a_habit_is_predicted_the_same_way_with_time_compressed_sixty_times(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    # The replay's real-time run divides every time setting by its factor, the profile's
    # hour (PREDICTIVE_HOUR) included: the eighth-day prediction must scale with it.
    k = 60
    s = predictive(
        settings,
        activity_check_interval_ms=MINUTE // k,
        activity_window_ms=5 * MINUTE // k,
        activity_refresh_lead_ms=10_000 // k,
        predictive_lead_ms=10 * MINUTE // k,
        predictive_hold_ms=10 * MINUTE // k,
        predictive_half_life_ms=14 * DAY // k,
        predictive_hour_ms=HOUR // k,
        predictive_ttl_ms=90 * MINUTE // k,
        # The compressed days keep DAY0's weekdays: local time = clock + offset.
        predictive_day_offset_ms=(DAY0 // k - DAY0) % (7 * DAY // k),
    )
    habit = new_user()
    metrics = redis_roles["metrics"]
    for at in week_of_habit(8):
        await record_activity(metrics, s, [habit], DAY0 + (at - DAY0) // k)
    scheduler = scheduler_for(s, redis_roles)
    start = DAY0 + 7 * DAY // k
    picked = await first_pick(
        scheduler, redis_roles["queue"], start, range(6 * 60, 8 * 60 + 1), k=k
    )
    assert picked is not None and 7 * 60 <= picked <= 7 * 60 + 50


async def test_a_predictive_entry_lives_its_own_ttl_in_warm(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    s = settings.with_overrides(predictive_ttl_ms=3_600_000, warm_ttl_ms=900_000)
    predicted, scheduled = new_user(), new_user()
    async with open_runtime(s) as runtime:
        await run_job(runtime, "medium", predicted, "prefetch:p:1", origin="predictive")
        await run_job(runtime, "medium", scheduled, "prefetch:s:1", origin="schedule")
    warm = redis_roles["warm"]
    long = await warm.execute("PTTL", keys.timeline("warm", predicted))
    short = await warm.execute("PTTL", keys.timeline("warm", scheduled))
    assert 900_000 < long <= 3_600_000
    assert 0 < short <= 900_000
