"""Predictive prefetch: have a timeline ready shortly before the hour a user habitually opens
the app.

Each user's profile (a field of a per-shard hash in the metrics DB) holds at most 24 hour-of-
week buckets, each with a weight (app opens seen in that hour, halved every
PREDICTIVE_HALF_LIFE, so habits can change) and the weighted mean minute of those opens.
`record_activity` (activity.py) updates it at every app open and puts the user in the
per-shard predictive index at `predicted open - PREDICTIVE_LEAD_TIME`. A predicted open is
the next occurrence of a bucket's mean minute whose decayed weight is at least
PREDICTIVE_THRESHOLD then. The math is Lua (profile.lua), shared by the recording and the
tick, so both run it atomically next to the data.

Each tick reads only the index members due before the tick's horizon (cost: users about to
open the app, not all users). A user is wanted from `open - lead` until `open + hold`
(PREDICTIVE_HOLD_TIME): the scheduler keeps the entry covered through that window, in warm
(`medium`), whose TTL outlasts the lead. Then the user is re-indexed at its next open.
"""

from __future__ import annotations

from engine.settings import Settings
from engine.store import keys
from engine.store.client import RedisClient
from engine.strategies.activity import Candidate
from engine.strategies.shards import eval_many, load_with

_DUE = load_with(__file__, "profile.lua", "predict_due.lua")


class PredictiveStrategy:
    """Selects users whose predicted open window reaches the tick's horizon."""

    origin = "predictive"

    def __init__(self, settings: Settings, metrics: RedisClient) -> None:
        self._settings = settings
        self._metrics = metrics

    async def select(self, now_ms: int, horizon_ms: int) -> list[Candidate]:
        """Users predicted to open the app soon; the earliest predicted open ranks first."""
        s = self._settings
        args = [
            now_ms,
            horizon_ms,
            s.predictive_lead_ms,
            s.predictive_hold_ms,
            s.predictive_half_life_ms,
            s.predictive_threshold,
            s.predictive_hour_ms,
        ]
        replies = await eval_many(
            self._metrics,
            _DUE,
            [
                ([keys.predict_index(shard), keys.predict_profile(shard)], args)
                for shard in range(keys.SHARDS)
            ],
        )
        out: list[Candidate] = []
        for reply in replies:
            for i in range(0, len(reply), 2):
                out.append(Candidate(reply[i].decode(), -float(reply[i + 1])))
        return out

    def split(self, selected: list[Candidate]) -> dict[str, list[str]]:
        """All `medium` (warm): the entry must outlive the lead time before the open."""
        return {"high": [], "medium": [c.user for c in selected]}
