"""Predictive prefetch: have a timeline ready before the moment a user habitually opens the
app, and keep it until the habit's window has passed or the user came.

Each user's profile (a field of a per-shard hash in the metrics DB) holds at most 8 habits:
a time of day on a kind of day (weekdays, weekend days), with a weight (the app opens it saw,
halved every PREDICTIVE_HALF_LIFE, so habits change), the weighted mean minute of those opens
and their variance (how much this user's start moves from day to day). Days of a kind pool
their opens, so a week of history has seen a weekday habit five times, and its mean is
known to a fraction of its jitter. `record_activity` (activity.py) teaches the profile at
every app open and puts the user in the per-shard predictive index at the start of its next
window. The math is Lua (profile.lua), shared by the recording and the tick, so both run it
atomically next to the data.

A habit's window opens PREDICTIVE_COVERAGE standard deviations of its start before its mean
(at least PREDICTIVE_LEAD_TIME) and closes as far after it (at least PREDICTIVE_HOLD_TIME);
a habit predicts only while its decayed weight is at least PREDICTIVE_THRESHOLD (with the
defaults one open predicts the next two days of its kind: a newcomer is served from its
second day, and a stray open costs at most two unread fetches). An app open inside a window
uses it up: the user is re-indexed at its next window, and nothing more is fetched for it.

Each tick reads only the index members due before the tick's horizon (cost: users about to
open the app, not all users). A wanted user's entry is stored in the warm tier with a TTL of
PREDICTIVE_TTL (2 h; engine.settings.Settings.entry_ttl_ms): one fetch covers most of a
habit's window, where 15-minute warm entries would need eight.
"""

from __future__ import annotations

from engine.settings import Settings
from engine.store import keys
from engine.store.client import RedisClient
from engine.store.fastredis import Script
from engine.strategies.activity import Candidate, profile_args
from engine.strategies.shards import eval_many

_DUE = Script.load(__file__, "profile.lua", "predict_due.lua")  # the library first


class PredictiveStrategy:
    """Selects users whose predicted open window reaches the tick's horizon."""

    origin = "predictive"

    def __init__(self, settings: Settings, metrics: RedisClient) -> None:
        self._settings = settings
        self._metrics = metrics

    async def select(self, now_ms: int, horizon_ms: int) -> list[Candidate]:
        """Users predicted to open the app soon; the earliest predicted open ranks first."""
        args = [now_ms, horizon_ms, *profile_args(self._settings)]
        replies = await eval_many(
            self._metrics,
            _DUE,
            [
                (
                    [
                        keys.predict_index(shard),
                        keys.predict_profile(shard),
                        keys.activity_index(shard),
                    ],
                    args,
                )
                for shard in range(keys.SHARDS)
            ],
        )
        out: list[Candidate] = []
        for reply in replies:
            for i in range(0, len(reply), 2):
                out.append(Candidate(reply[i].decode(), -float(reply[i + 1])))
        return out

    def split(self, selected: list[Candidate]) -> dict[str, list[str]]:
        """All `medium`: warm, where a predictive entry lives PREDICTIVE_TTL."""
        return {"high": [], "medium": [c.user for c in selected]}
