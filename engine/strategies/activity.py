"""Activity-based prefetch: keep the timelines of users active right now ready.

Activity (a cache read, or `POST /api/activity`) is recorded by `record_activity` into two
per-shard indexes in the metrics DB: a zset user -> last active time and a hash user -> how
many activity flushes saw the user since its session began (its frequency). A user idle for a
whole ACTIVITY_WINDOW starts a new session at its next activity: that is an *app open*, which
also teaches the predictive profile (predictive.py) when ENABLE_PREDICTIVE is on.

Each tick, `ActivityStrategy.select` reads every shard's active users in one pipelined round
trip, trimming the idle ones in the same script, so its cost grows with active users only.
The scheduler keeps those whose entry is missing or expires before the next tick (plus
ACTIVITY_REFRESH_LEAD); `split` gives the ACTIVITY_HIGH_PERCENT with the highest rank
(frequency, discounted by how long ago the user was last active) `high`, the rest `medium`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from engine.settings import Settings
from engine.store import keys
from engine.store.client import RedisClient
from engine.store.fastredis import Script
from engine.strategies.shards import by_shard, commands, eval_many

_SELECT = Script.load(__file__, "select_active.lua")
_RECORD = Script.load(__file__, "profile.lua", "record.lua")  # the library first


@dataclass(frozen=True, slots=True)
class Candidate:
    """A user a strategy wants covered, and how strongly (higher ranks first)."""

    user: str
    rank: float


def split_by_rank(candidates: list[Candidate], high_percent: int) -> dict[str, list[str]]:
    """The top `high_percent` of `candidates` by rank as `high`, the rest as `medium`."""
    ordered = sorted(candidates, key=lambda c: c.rank, reverse=True)
    cut = math.ceil(len(ordered) * high_percent / 100)
    return {
        "high": [c.user for c in ordered[:cut]],
        "medium": [c.user for c in ordered[cut:]],
    }


class ActivityStrategy:
    """Selects active users each tick (see the module docstring)."""

    origin = "activity"

    def __init__(self, settings: Settings, metrics: RedisClient) -> None:
        self._settings = settings
        self._metrics = metrics

    async def select(self, now_ms: int, horizon_ms: int) -> list[Candidate]:
        """Every user active within the window (trimming the idle ones), ranked."""
        since = now_ms - self._settings.activity_window_ms
        replies = await eval_many(
            self._metrics,
            _SELECT,
            [
                ([keys.activity_index(shard), keys.activity_frequency(shard)], [since])
                for shard in range(keys.SHARDS)
            ],
        )
        interval = self._settings.activity_check_interval_ms
        out: list[Candidate] = []
        for reply in replies:
            for i in range(0, len(reply), 3):
                idle_intervals = max(0.0, now_ms - float(reply[i + 1])) / interval
                out.append(Candidate(reply[i].decode(), int(reply[i + 2]) / (1 + idle_intervals)))
        return out

    def split(self, selected: list[Candidate]) -> dict[str, list[str]]:
        """Most recent and most frequent `high`, the rest `medium`."""
        return split_by_rank(selected, self._settings.activity_high_percent)


def profile_args(s: Settings) -> list[float | int]:
    """The predictive profile's settings as profile.lua's `read_params` takes them, in its
    order (the recording here and the tick's predict_due.lua both pass them)."""
    return [
        s.predictive_lead_ms,
        s.predictive_hold_ms,
        s.predictive_coverage,
        s.predictive_half_life_ms,
        s.predictive_threshold,
        s.predictive_hour_ms,
        s.predictive_day_offset_ms,
    ]


@dataclass(frozen=True, slots=True)
class Recorded:
    """What one recording saw: how many app opens, and which of the opening users had a
    refresh deferred by an event (engine.strategies.events: due now, at the open)."""

    opens: int
    changed: list[str]


async def record_activity(
    metrics: RedisClient, settings: Settings, users: Iterable[str], now_ms: int
) -> Recorded:
    """Record users as active at `now_ms` (one script per shard, one round trip).

    An app open is a user's first activity after a full window idle.
    """
    args_head = [
        now_ms,
        settings.activity_window_ms,
        1 if settings.enable_predictive else 0,
        *profile_args(settings),
    ]
    calls = [
        (
            [
                keys.activity_index(shard),
                keys.activity_frequency(shard),
                keys.predict_profile(shard),
                keys.predict_index(shard),
                keys.changed_index(shard),
            ],
            [*args_head, *group],
        )
        for shard, group in by_shard(users).items()
    ]
    opens, changed = 0, []
    for reply in await eval_many(metrics, _RECORD, calls):
        opens += int(reply[0])
        changed += [user.decode() for user in reply[1]]
    return Recorded(opens, changed)


async def active_since(metrics: RedisClient, users: list[str], since_ms: int) -> list[bool]:
    """For each user: was it active at or after `since_ms`? One pipelined round trip."""
    if not users:
        return []
    scores = await commands(
        metrics, [("ZSCORE", keys.activity_index(keys.shard_of(u)), u) for u in users]
    )
    return [score is not None and float(score) >= since_ms for score in scores]
