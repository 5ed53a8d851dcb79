"""The replay benchmark's parts (bench/replay): the population's properties, the oracle's
accounting, virtual expiry, and small virtual-time replays on the session's Redis whose
counters must add up (the long replays stay out of the test run: `make bench-replay`)."""

from __future__ import annotations

import itertools
import statistics
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import pytest_asyncio

from bench.replay.oracle import oracle
from bench.replay.population import (
    DAY,
    HOUR,
    MINUTE,
    SECOND,
    Population,
    PopulationSpec,
    Read,
    compress,
    generate,
    is_weekend,
)
from bench.replay.simulation import simulate
from bench.replay.virtual import Latency, VirtualExpiry, key_shards
from engine.settings import Settings
from engine.store import keys
from engine.store.fastredis import FastRedis
from tests.strategy_support import store_at

pytestmark = pytest.mark.timeout(120)

SMALL = PopulationSpec(users=400, days=7, history_days=7, seed=11)


@pytest.fixture(scope="module")
def small() -> Population:
    return generate(SMALL)


def test_a_seed_makes_the_same_population_and_another_seed_another(small: Population) -> None:
    again = generate(SMALL)
    assert again.sessions == small.sessions
    assert again.posts == small.posts
    other = generate(replace(SMALL, seed=12))
    assert other.sessions != small.sessions


def test_habits_jitter_weekends_and_off_habit_opens_are_within_bounds(small: Population) -> None:
    population = small
    spec = population.spec
    users = population.users
    sessions = population.sessions
    for user in users:
        for habits in (user.habits, user.weekend_habits or user.habits):
            assert 1 <= len(habits) <= 3
            gaps = [b - a for a, b in itertools.pairwise(habits)]
            assert all(gap >= 2 * HOUR for gap in gaps)
    weekend_share = sum(u.weekend_habits is not None for u in users) / len(users)
    assert 0.23 <= weekend_share <= 0.37  # 30% of 400: three standard deviations
    habitual = [s for s in sessions if s.habitual]
    jitter_min = statistics.pstdev(s.jitter_ms for s in habitual) / MINUTE
    assert 18.5 <= jitter_min <= 21.5
    assert abs(statistics.fmean(s.jitter_ms for s in habitual)) < 2 * MINUTE
    off = sum(not s.habitual for s in sessions) / len(sessions)
    assert 0.095 <= off <= 0.105
    # Weekend habits open the app only at weekends, and weekday habits only on weekdays for
    # users who have weekend habits.
    for s in habitual:
        if users[s.user].weekend_habits is not None:
            weekend = is_weekend(spec, s.start - s.jitter_ms)
            assert s.weekend_habit == weekend


def test_sessions_reads_joiners_leavers_and_posts_are_within_bounds(small: Population) -> None:
    population = small
    spec = population.spec
    users = population.users
    sessions = population.sessions
    for s in sessions:
        assert 1 <= len(s.reads) <= 5
        gaps = [b - a for a, b in itertools.pairwise(s.reads)]
        assert all(30 * SECOND <= gap <= 180 * SECOND for gap in gaps)
        user = users[s.user]
        assert user.active_at(s.start), "a session before joining or after leaving"
    joined = [u for u in users if u.joined_at is not None]
    stopped = [u for u in users if u.stopped_at is not None]
    assert len(joined) == len(stopped) == 20  # 5% of 400 each, never the same user
    assert not {u.id for u in joined} & {u.id for u in stopped}
    for u in joined + stopped:
        changed = u.joined_at if u.joined_at is not None else u.stopped_at
        assert spec.start_ms + DAY <= changed < spec.end_ms - DAY  # mid-week
    assert all(r.at >= spec.start_ms for r in population.measured_reads())
    # No history for joiners: nothing of theirs before the measured week.
    joined_ids = {i for i, u in enumerate(users) if u.joined_at is not None}
    assert not any(r.user in joined_ids for r in population.history_reads())
    # About one post per user and day (Poisson, mean 1), only on days the user read.
    user_days = {(r.user, (r.at - spec.start_ms) // DAY) for r in population.measured_reads()}
    per_day = len(population.posts) / len(user_days)
    assert 0.9 <= per_day <= 1.1
    for at, poster in population.posts:
        assert (poster, (at - spec.start_ms) // DAY) in user_days
    for i, user in enumerate(users):
        assert len(set(user.followers)) == 50 and i not in user.followers


def test_compressing_time_keeps_order_and_scales_gaps(small: Population) -> None:
    population = small
    spec = population.spec
    fast = compress(population, 60.0, spec.start_ms, 1_000_000)
    first = population.measured_reads()[0]
    moved = fast.reads_between(1_000_000, 1_000_000 + DAY)
    assert (
        moved[0].user == first.user and moved[0].at == 1_000_000 + (first.at - spec.start_ms) // 60
    )
    assert [r.at for r in fast.reads] == sorted(r.at for r in fast.reads)


def test_the_oracle_fetches_at_the_first_read_no_entry_covers() -> None:
    ttl = 15 * MINUTE
    reads = [
        Read(0, 1, 0, True),
        Read(5 * MINUTE, 1, 0, False),
        Read(14 * MINUTE, 1, 0, False),  # still covered by the fetch at 0
        Read(15 * MINUTE, 1, 1, True),  # the entry expired just now: a second fetch
        Read(20 * MINUTE, 2, 2, True),
        Read(29 * MINUTE, 1, 1, False),  # covered by the fetch at 15 min
        Read(40 * MINUTE, 2, 3, True),  # the fetch at 20 min expired at 35 min
    ]
    result = oracle(reads, ttl)
    assert (result.opens, result.reads, result.fetches) == (4, 7, 4)
    summary = result.summary()
    assert summary["openHitRate"] == summary["readHitRate"] == 1.0
    assert summary["fetchesPerOpen"] == summary["jobsPerOpen"] == 1.0


async def test_virtual_expiry_deletes_entries_whose_virtual_time_passed(
    settings: Settings, redis_roles: dict[str, FastRedis]
) -> None:
    at = 1_800_000_000_000
    gone, live = "00000000-0000-4000-8000-00000000e001", "00000000-0000-4000-8000-00000000e002"
    assert await store_at(settings, redis_roles, gone, "hot", at)
    assert await store_at(settings, redis_roles, live, "warm", at)
    now = at + settings.hot_ttl_ms  # hot's expiry, exactly; warm lives longer
    result = await VirtualExpiry(redis_roles).apply([(gone, now), (live, now)])
    assert result == [{}, {"warm": float(at + settings.warm_ttl_ms)}]
    assert await redis_roles["hot"].execute("EXISTS", keys.timeline("hot", gone)) == 0
    assert await redis_roles["warm"].execute("EXISTS", keys.timeline("warm", live)) == 1


TINY = PopulationSpec(users=60, days=1, history_days=7, seed=5)
FIXED = Latency(hit_ms=1.0, miss_ms=51.0)


@pytest_asyncio.fixture
async def replay_settings(redis_url: str, redis_dbs: dict[str, int]) -> AsyncIterator[Settings]:
    yield Settings().with_overrides(redis_url=redis_url, redis_configured=True, metrics_dir="")


async def _replay(settings: Settings, mixes: list[str], hours: float, shards: int) -> dict:
    population = generate(TINY)
    start = TINY.start_ms + 6 * HOUR
    dbs = dict(zip(mixes, (10, 11), strict=False))
    with key_shards(shards):
        tallies = await simulate(
            population,
            settings,
            mixes,
            dbs,
            history_db=12,
            start_ms=start,
            end_ms=start + round(hours * HOUR),
            latency=FIXED,
        )
    return {"population": population, "start": start, "tallies": tallies}


async def test_a_tiny_replay_adds_up_and_all_beats_read_through(replay_settings: Settings) -> None:
    run = await _replay(replay_settings, ["read-through", "all"], 12, 16)
    population, start = run["population"], run["start"]
    measured = population.reads_between(start, start + 12 * HOUR)
    opens = sum(r.first for r in measured)
    assert opens > 50
    for mix, tally in run["tallies"].items():
        s = tally.summary()
        assert (s["reads"], s["opens"]) == (len(measured), opens), mix
        assert sum(s["servedBy"].values()) == opens
        assert tally.open_hits == opens - s["servedBy"]["miss"]
        assert sum(s["hourlyOpens"]) == opens and len(s["hourlyOpens"]) == 12
        assert sum(v["opens"] for v in s["byKind"].values()) == opens
        assert sorted(tally.open_latency_ms) == sorted(
            [FIXED.hit_ms] * tally.open_hits + [FIXED.miss_ms] * (opens - tally.open_hits)
        )
    plain = run["tallies"]["read-through"]
    # Nothing but read-throughs: one fetch per miss, no job, no queue.
    assert plain.fetches == plain.reads - plain.read_hits
    assert plain.jobs_by_origin == Counter({"read-through": plain.fetches})
    assert plain.peak_queue == 0
    both = run["tallies"]["all"]
    assert both.open_hits > plain.open_hits
    assert both.summary()["openHitRate"] > plain.summary()["openHitRate"]
    assert both.jobs_by_origin["predictive"] > 0 and both.jobs_by_origin["event"] > 0
    assert both.served["predictive"] > 0
    # Every fetch is one prefetch operation (no upstream failures in the simulation), and
    # read-throughs are exactly the reads that missed.
    assert both.fetches <= sum(both.jobs_by_origin.values())
    assert both.jobs_by_origin["read-through"] == both.reads - both.read_hits
    useful = both.usefulness["byOrigin"]["predictive"]
    assert useful["readBeforeExpiry"] >= both.served["predictive"]


async def test_the_key_shard_count_does_not_change_what_the_replay_decides(
    replay_settings: Settings,
) -> None:
    few = await _replay(replay_settings, ["all"], 1, 16)
    production = await _replay(replay_settings, ["all"], 1, keys.SHARDS)
    a, b = few["tallies"]["all"].summary(), production["tallies"]["all"].summary()
    assert a["opens"] > 0
    assert a == b
