"""One scheduler tick: ask each strategy whom it wants, keep those not covered, enqueue them.

`Scheduler.tick(now_ms, fence)` is the whole decision, callable directly with any clock
(the replay drives it in virtual time; `runner.py` calls it on the leader every
ACTIVITY_CHECK_INTERVAL with the lease as fence):

1. each enabled strategy selects candidates (activity.py, predictive.py);
2. one pipelined look-up per connection reads, for every candidate, when its entries expire
   (the tiers' expiry indexes, written by the store script) and whether a strategy batch for
   it is still in flight (the claims index);
3. a candidate is kept if it is not claimed and its entries all expire before the horizon,
   `now + ACTIVITY_CHECK_INTERVAL + ACTIVITY_REFRESH_LEAD` (the next tick would be too late);
   the first strategy to want a user gets it (activity before predictive);
4. the strategy splits its users into priorities; users that still have an entry are sent
   with `force` (a fresh hot entry about to expire must be refetched, not skipped);
5. batches of PREFETCH_BATCH_SIZE go through the batch actor, fenced by the lease; each
   landed batch claims its users for two intervals (no re-enqueue while it is in flight; a
   batch that failed is retried after that); an entry stored after the claim was made ends
   it (the batch landed);
6. usefulness.sweep trims passed index members and counts expired unread prefetches; marks
   of deferred event refreshes older than any entry lives are dropped (events.trim_changed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.broker.jobs import Fence, JobQueue
from engine.metrics import prometheus
from engine.metrics.daily import StatsRecorder
from engine.settings import Settings
from engine.store import keys
from engine.store.client import RedisClient
from engine.strategies import usefulness
from engine.strategies.activity import ActivityStrategy, Candidate
from engine.strategies.events import trim_changed
from engine.strategies.predictive import PredictiveStrategy
from engine.strategies.shards import by_shard, commands


class Strategy(Protocol):
    """What the scheduler needs of a strategy."""

    origin: str

    async def select(self, now_ms: int, horizon_ms: int) -> list[Candidate]:
        """Users the strategy wants covered through `horizon_ms`."""
        ...

    def split(self, selected: list[Candidate]) -> dict[str, list[str]]:
        """The selected users by priority."""
        ...


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch message to enqueue."""

    origin: str
    priority: str
    force: bool
    users: list[str]


@dataclass(slots=True)
class TickReport:
    """What one tick did (the leader writes it to Redis for /health and the queue stats)."""

    at: int
    candidates: dict[str, int] = field(default_factory=dict)  # by origin, before filtering
    selected: dict[str, int] = field(default_factory=dict)  # by origin, enqueued users
    batches: int = 0
    fenced: bool = False
    wasted: int = 0
    duration_ms: int = 0

    def fields(self) -> dict[str, int]:
        """Flat fields for the status hash."""
        out = {
            "at": self.at,
            "durationMs": self.duration_ms,
            "batches": self.batches,
            "wasted": self.wasted,
        }
        # Every strategy's counts, zeros included: a tick that enqueued nothing says so.
        for origin in self.candidates.keys() | self.selected.keys():
            out[f"candidates.{origin}"] = self.candidates.get(origin, 0)
            out[f"enqueued.{origin}"] = self.selected.get(origin, 0)
        return out


def strategies_for(settings: Settings, metrics: RedisClient) -> list[Strategy]:
    """The strategies the settings enable, in precedence order."""
    chosen: list[Strategy] = []
    if settings.enable_activity_based:
        chosen.append(ActivityStrategy(settings, metrics))
    if settings.enable_predictive:
        chosen.append(PredictiveStrategy(settings, metrics))
    return chosen


class Scheduler:
    """The tick over the strategies of `settings` (or the given ones)."""

    def __init__(
        self,
        settings: Settings,
        redis: Mapping[str, RedisClient],
        jobs: JobQueue,
        stats: StatsRecorder | None = None,
        strategies: Sequence[Strategy] | None = None,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._jobs = jobs
        self._stats = stats
        self.strategies = (
            list(strategies)
            if strategies is not None
            else strategies_for(settings, redis["metrics"])
        )

    @property
    def claim_ms(self) -> int:
        """How long an enqueued user is not selected again unless its entry lands."""
        return 2 * self._settings.activity_check_interval_ms

    def horizon(self, now_ms: int) -> int:
        """Entries must outlive this, or this tick refreshes them."""
        s = self._settings
        return now_ms + s.activity_check_interval_ms + s.activity_refresh_lead_ms

    async def tick(self, now_ms: int, fence: Fence | None = None) -> TickReport:
        """Select, filter, enqueue (fenced), then sweep; see the module docstring."""
        started = time.perf_counter()
        report = TickReport(at=now_ms)
        batches = await self.plan(now_ms, report)
        await self.enqueue(batches, now_ms, fence, report)
        await commands(
            self._redis["queue"],
            [
                ("ZREMRANGEBYSCORE", keys.strategy_claims(shard), "-inf", f"({now_ms}")
                for shard in range(keys.SHARDS)
            ],
        )
        if self._settings.enable_event_triggered:
            await trim_changed(self._redis["metrics"], self._settings, now_ms)
        report.wasted = await usefulness.sweep(self._redis, now_ms, self._stats)
        report.duration_ms = round((time.perf_counter() - started) * 1000)
        prometheus.SCHEDULER_TICKS.inc()
        prometheus.SCHEDULER_TICK_DURATION.observe(report.duration_ms / 1000)
        return report

    async def plan(self, now_ms: int, report: TickReport | None = None) -> list[Batch]:
        """Steps 1-4: the batches this tick would enqueue."""
        report = report or TickReport(at=now_ms)
        horizon = self.horizon(now_ms)
        wanted = await asyncio.gather(*(s.select(now_ms, horizon) for s in self.strategies))
        every = {c.user for candidates in wanted for c in candidates}
        covered, stored, claimed = await self._coverage(every)
        claim_ms = self.claim_ms
        taken: set[str] = set()
        batches: list[Batch] = []
        size = self._settings.batch_size
        for strategy, candidates in zip(self.strategies, wanted, strict=True):
            report.candidates[strategy.origin] = len(candidates)
            keep = []
            for c in candidates:
                if c.user in taken:
                    continue
                until = claimed.get(c.user, 0)
                if until > now_ms and stored.get(c.user, 0) < until - claim_ms:
                    continue  # its batch is still in flight
                if covered.get(c.user, 0) >= horizon:
                    continue
                taken.add(c.user)
                keep.append(c)
            for priority, users in strategy.split(keep).items():
                for force in (False, True):
                    group = [u for u in users if (covered.get(u, 0) > now_ms) == force]
                    for i in range(0, len(group), size):
                        batches.append(Batch(strategy.origin, priority, force, group[i : i + size]))
        return batches

    async def enqueue(
        self,
        batches: list[Batch],
        now_ms: int,
        fence: Fence | None,
        report: TickReport | None = None,
    ) -> TickReport:
        """Step 5: enqueue the batches (fenced) and claim their users."""
        report = report or TickReport(at=now_ms)
        landed = await asyncio.gather(
            *(
                self._jobs.schedule_batch(
                    b.users, b.priority, origin=b.origin, force=b.force, fence=fence
                )
                for b in batches
            )
        )
        done = [b for b, batch_id in zip(batches, landed, strict=True) if batch_id is not None]
        report.fenced = len(done) < len(batches)
        report.batches = len(done)
        until = now_ms + self.claim_ms
        claims: dict[int, list[Any]] = {}
        for batch in done:
            report.selected[batch.origin] = report.selected.get(batch.origin, 0) + len(batch.users)
            prometheus.SCHEDULER_SELECTED.labels(origin=batch.origin, priority=batch.priority).inc(
                len(batch.users)
            )
            for shard, users in by_shard(batch.users).items():
                members = claims.setdefault(shard, [])
                for user in users:
                    members += (until, user)
        if claims:
            await commands(
                self._redis["queue"],
                [("ZADD", keys.strategy_claims(s), *members) for s, members in claims.items()],
            )
        return report

    async def _coverage(
        self, users: set[str]
    ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """For each user, epoch ms: until when its entries cover it, when the newest of them
        was stored (expiry minus its tier's TTL) and until when it is claimed."""
        groups = list(by_shard(users).items())
        if not groups:
            return {}, {}, {}

        async def scores(role: str, key_of: Any) -> list[Any]:
            return await commands(
                self._redis[role], [("ZMSCORE", key_of(s), *members) for s, members in groups]
            )

        hot, warm, claims = await asyncio.gather(
            scores("hot", lambda s: keys.expiry_index("hot", s)),
            scores("warm", lambda s: keys.expiry_index("warm", s)),
            scores("queue", keys.strategy_claims),
        )
        hot_ttl, warm_ttl = self._settings.hot_ttl_ms, self._settings.warm_ttl_ms
        covered: dict[str, float] = {}
        stored: dict[str, float] = {}
        claimed: dict[str, float] = {}
        for (_, members), h, w, c in zip(groups, hot, warm, claims, strict=True):
            for user, hs, ws, cs in zip(members, h, w, c, strict=True):
                if hs is not None or ws is not None:
                    until_hot = float(hs) if hs is not None else 0.0
                    until_warm = float(ws) if ws is not None else 0.0
                    covered[user] = max(until_hot, until_warm)
                    stored[user] = max(
                        until_hot - hot_ttl if hs is not None else 0.0,
                        until_warm - warm_ttl if ws is not None else 0.0,
                    )
                if cs is not None:
                    claimed[user] = float(cs)
        return covered, stored, claimed
