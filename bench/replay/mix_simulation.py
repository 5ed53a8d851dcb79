"""One strategy mix over one period in virtual time, on the production strategy code.

A mix runs against a real Redis (one DB, every role in it), driven by a virtual clock that
jumps from one thing to do to the next. What runs is production code:

- reads: `TimelineCache.read` (hot, then warm), and on a miss `Prefetcher.read_through`
  (fetch, store in warm); latency is modelled (virtual.calibrate);
- the API's activity flush, once a virtual second: `record_activity` (activity index,
  sessions, the predictive profile), `usefulness.count_reads` and, with events, the refreshes
  deferred to an app open (`events.refresh_at_open`), as `api.activity` does;
- the leader's tick every ACTIVITY_CHECK_INTERVAL: `Scheduler.tick(now_ms)`, which selects,
  enqueues batch messages on the real queue and sweeps;
- events: `refresh_or_invalidate` (engine.strategies.events) for the poster's followers, as
  `POST /api/prefetch/events` does;
- jobs: the messages the tick and the events left on the queue are taken off it `job_latency`
  after they were enqueued and run by the worker's own actor functions (`run_batch`,
  `run_job`) with a simulated upstream that answers at once; they store through the real
  guarded store with the virtual clock (`TimelineCache(clock=...)`).

Redis TTLs run in real time, which the virtual clock outruns by far: an entry stored an hour
ago in virtual time may still exist. Every decision that reads coverage reads the expiry
index (scores written with the virtual clock), and before any production call that looks at
a user's keys (a read, a job, an event) `virtual.VirtualExpiry` deletes the entries whose
virtual expiry has passed, which is what Redis's own expiry would have done by then.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import dramatiq

from bench.replay.population import DAY, Population, Read
from bench.replay.tally import Tally
from bench.replay.virtual import Latency, SimUpstream, VirtualExpiry
from engine.broker import dramatiq_layout as layout
from engine.broker.actors import RuntimeHolder, register_actors, run_batch, run_job
from engine.broker.jobs import QUEUES, JobQueue
from engine.metrics.daily import StatsRecorder, read_day
from engine.prefetcher import Prefetcher
from engine.runtime import Runtime
from engine.settings import Settings
from engine.store import keys
from engine.store.cache import TimelineCache, wall_clock_ms
from engine.store.entry import unstamp
from engine.store.fastredis import FastRedis
from engine.strategies.activity import Recorded, record_activity
from engine.strategies.events import refresh_at_open, refresh_or_invalidate
from engine.strategies.scheduler import Scheduler
from engine.strategies.usefulness import count_reads

FLUSH_MS = 1_000  # the API's activity flush interval (api.activity.ActivityBatcher)
_NEVER = 2**62


@dataclass(frozen=True, slots=True)
class _Post:
    at: int
    user: int


@dataclass(slots=True)
class _Flush:
    """One flush of the API's activity batcher: who was seen, and which tier served whom."""

    at: int
    users: set[str]
    served: dict[str, set[str]]


class MixSimulation:
    """One strategy mix over one period, in virtual time (see the module docstring).

    Everything happens in time order. Reads between two *barriers* (a tick, a drain of the
    queue, an event) depend on nothing but the cache and run concurrently, each with its own
    virtual time (no user twice in one batch); activity flushes are deferred to the next
    barrier and sent in order in one round trip. The results are those of running one by
    one, in a few round trips per barrier instead of several per read.
    """

    def __init__(
        self,
        name: str,
        settings: Settings,
        redis: dict[str, FastRedis],
        population: Population,
        tally: Tally,
        *,
        latency: Latency | None = None,
        job_latency_ms: int = 0,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.redis = redis
        self.population = population
        self.tally = tally
        self.latency = latency or Latency()
        self.job_latency_ms = job_latency_ms
        self.progress = progress
        self.now = 0
        self.ids = [user.id for user in population.users]
        self.upstream = SimUpstream()
        self.cache = TimelineCache(settings, redis["hot"], redis["warm"], clock=lambda: self.now)
        self.stats = StatsRecorder(redis["metrics"], settings.metrics_retention_days)
        self.prefetcher = Prefetcher(self.cache, cast(Any, self.upstream), self.stats)
        self.jobs = JobQueue(redis["queue"])
        # The actor functions need a Runtime; the simulation has no HTTP session or CA.
        self.runtime = Runtime(
            settings=settings,
            redis=cast(Any, redis),
            session=cast(Any, None),
            timeline=cast(Any, self.upstream),
            ca=cast(Any, None),
            cache=self.cache,
            stats=self.stats,
            prefetcher=self.prefetcher,
            jobs=self.jobs,
            batch_slots=asyncio.Semaphore(settings.job_concurrency),
        )
        # The broker only builds messages (a retry the batch actor sends is recorded in the
        # job's ledger and dropped: the simulated upstream never fails).
        holder = RuntimeHolder()
        holder.runtime = self.runtime
        self.broker = layout.encoder_broker()
        register_actors(self.broker, holder)
        ticking = settings.enable_activity_based or settings.enable_predictive
        self.scheduler = Scheduler(settings, redis, self.jobs, self.stats) if ticking else None
        self.expiry = VirtualExpiry(redis)
        self.flushes: list[_Flush] = []
        self.drain_at = _NEVER
        self.last_post_for = [0] * len(self.ids)  # newest post in each user's timeline
        self.ticks = 0

    async def run(self, start_ms: int, end_ms: int) -> Tally:
        """Replay [start_ms, end_ms); returns the tally (usefulness and jobs filled in)."""
        population = self.population
        actions: list[tuple[int, int, Read | _Post]] = [
            (r.at, 1, r) for r in population.reads_between(start_ms, end_ms)
        ]
        actions += [(at, 0, _Post(at, u)) for at, u in population.posts_between(start_ms, end_ms)]
        actions.sort(key=lambda a: (a[0], a[1]))
        events = self.settings.enable_event_triggered
        interval = self.settings.activity_check_interval_ms
        next_tick = start_ms if self.scheduler is not None else _NEVER
        next_report = start_ms + DAY
        started = time.perf_counter()
        fetches_before = self.upstream.fetches
        batch: list[tuple[Read, int]] = []
        batch_users: set[int] = set()
        i, count = 0, len(actions)
        while True:
            barrier = min(next_tick, self.drain_at, end_ms)
            if (
                self.progress is not None
                and min(barrier, actions[i][0] if i < count else barrier) >= next_report
            ):
                took = time.perf_counter() - started
                self.progress(
                    f"{self.name}: day {(next_report - start_ms) // DAY} done ({took:.0f} s)"
                )
                next_report += DAY
            if i < count and actions[i][0] < barrier:
                action = actions[i][2]
                i += 1
                if isinstance(action, Read):
                    if action.user in batch_users:
                        await self._reads(batch)
                        batch, batch_users = [], set()
                    batch.append((action, self.last_post_for[action.user]))
                    batch_users.add(action.user)
                    continue
                for follower in population.users[action.user].followers:
                    self.last_post_for[follower] = action.at
                if events:
                    await self._reads(batch)
                    batch, batch_users = [], set()
                    self.now = action.at
                    await self._flush_until(action.at)
                    await self._post(action)
                continue
            await self._reads(batch)
            batch, batch_users = [], set()
            if barrier >= end_ms:
                break
            self.now = barrier
            await self._flush_until(barrier)
            if self.drain_at == barrier:
                await self._drain()
            else:
                assert self.scheduler is not None
                report = await self.scheduler.tick(barrier)
                self.ticks += 1
                if report.batches:
                    self.drain_at = min(self.drain_at, barrier + self.job_latency_ms)
                next_tick += interval
        await self._flush_until(_NEVER)
        await self.stats.flush()
        totals = await read_day(self.redis["metrics"], None)
        self.tally.fetches += self.upstream.fetches - fetches_before
        self.tally.jobs_by_origin.update(
            {o: n for o, n in totals["prefetch"]["byOrigin"].items() if n}
        )
        self.tally.usefulness = totals["usefulness"]
        return self.tally

    def _note(self, user: str, at: int, tier: str | None) -> None:
        """The API's ActivityBatcher.add: flushed at the next whole virtual second."""
        flush_at = (at // FLUSH_MS + 1) * FLUSH_MS
        if not self.flushes or self.flushes[-1].at != flush_at:
            self.flushes.append(_Flush(flush_at, set(), {"hot": set(), "warm": set()}))
        group = self.flushes[-1]
        group.users.add(user)
        if tier is not None:
            group.served[tier].add(user)

    def _pending(self, user: str) -> bool:
        """Seen by a read and not flushed yet (ActivityBatcher.is_pending)."""
        return any(user in group.users for group in self.flushes)

    async def _flush_until(self, at: int) -> None:
        """The API's ActivityBatcher.flush for every flush due by `at`, in order."""
        due = [group for group in self.flushes if group.at <= at]
        if not due:
            return
        self.flushes = self.flushes[len(due) :]
        replies = await asyncio.gather(
            *(
                record_activity(self.redis["metrics"], self.settings, group.users, group.at)
                for group in due
            ),
            *(count_reads(self.redis, group.served, self.stats) for group in due),
        )
        recorded = cast(list[Recorded], replies[: len(due)])
        if self.settings.enable_event_triggered:
            for group, done in zip(due, recorded, strict=True):
                served = group.served["hot"] | group.served["warm"]
                if await refresh_at_open(self.jobs, done.changed, served):
                    self.drain_at = min(self.drain_at, group.at + self.job_latency_ms)

    async def _reads(self, batch: list[tuple[Read, int]]) -> None:
        """GET /api/cache/{userId} (api/views_cache.py) for distinct users, without HTTP."""
        if not batch:
            return
        users = [self.ids[read.user] for read, _ in batch]
        lives = await self.expiry.apply([(u, r.at) for u, (r, _) in zip(users, batch, strict=True)])
        outcomes = await asyncio.gather(
            *(self._read(user, read) for user, (read, _) in zip(users, batch, strict=True))
        )
        for user, (read, newest_post), live, (tier, served, ttl) in zip(
            users, batch, lives, outcomes, strict=True
        ):
            self._note(user, read.at, tier)
            if tier is None:
                self.tally.read(read, False, self.latency.miss_ms, "miss")
                continue
            stored_at = live.get(tier, read.at) - ttl
            self.tally.read(read, True, self.latency.hit_ms, served, newest_post > stored_at)
        # Flushes due by now need no barrier to happen (a mix without ticks has none).
        await self._flush_until(batch[-1][0].at)

    def _ttl_of(self, tier: str, stored: bytes) -> int:
        """The TTL an entry was stored with: its tier's, or PREDICTIVE_TTL for a predictive
        warm entry. Told apart by the wall-clock expiry in its stamp: the simulation runs
        through an entry's virtual life in seconds, so its remaining wall-clock life is close
        to its whole TTL."""
        s = self.settings
        if tier == "hot":
            return s.hot_ttl_ms
        remaining = unstamp(stored).expires_at - wall_clock_ms()
        return s.entry_ttl_ms("warm", "predictive") if remaining > s.warm_ttl_ms else s.warm_ttl_ms

    async def _read(self, user: str, read: Read) -> tuple[str | None, str, int]:
        """One read at its own virtual time: (tier that served it or None, origin served, the
        entry's TTL)."""
        found = await self.cache.read(user)
        if found is not None:
            tier = found[0]
            ttl = self._ttl_of(tier, found[1])
            self.stats.hit(tier)
            served = "read"
            if read.first:  # which prefetch stored it (its unread mark), before the flush
                origin = await self.redis[tier].execute(
                    "HGET", keys.unread_origin(tier, keys.shard_of(user)), user
                )
                served = origin.decode() if origin else "read"
            return tier, served, ttl
        self.stats.miss()
        at = read.at
        cache = TimelineCache(
            self.settings, self.redis["hot"], self.redis["warm"], clock=lambda: at
        )
        await Prefetcher(cache, cast(Any, self.upstream), self.stats).read_through(user)
        return None, "miss", 0

    async def _post(self, post: _Post) -> None:
        """POST /api/prefetch/events for the poster's followers (post.created)."""
        users = [self.ids[f] for f in self.population.users[post.user].followers]
        if not users:
            return
        await self.expiry.apply([(user, post.at) for user in users])
        outcome = await refresh_or_invalidate(
            self.cache,
            self.jobs,
            self.redis["metrics"],
            self.settings,
            users,
            post.at,
            self._pending,
        )
        if outcome.refreshed:
            self.drain_at = min(self.drain_at, post.at + self.job_latency_ms)

    async def _drain(self) -> None:
        """Take every waiting message off the queue and run it as a worker would."""
        self.drain_at = _NEVER
        queue = self.redis["queue"]
        messages: list[dramatiq.Message[Any]] = []
        for name in QUEUES.values():  # high first, as the workers' priorities do
            key, msgs = layout.queue_key(name), layout.messages_key(name)
            ids, bodies, _ = await queue.pipeline(
                [("LRANGE", key, 0, -1), ("HGETALL", msgs), ("DEL", key, msgs)]
            )
            by_id = {bodies[j]: bodies[j + 1] for j in range(0, len(bodies), 2)}
            messages += [dramatiq.Message.decode(by_id[mid]) for mid in ids if mid in by_id]
        self.tally.queue_depth(len(messages))
        users: list[str] = []
        for message in messages:
            first = message.args[0]
            users += first if isinstance(first, list) else [first]
        await self.expiry.apply([(user, self.now) for user in dict.fromkeys(users)])

        async def run(message: dramatiq.Message[Any]) -> None:
            priority = message.actor_name.rsplit("_", 1)[1]
            with layout.deferred() as ledger:  # as the worker's executor runs it
                if message.actor_name.startswith("prefetch_batch_"):
                    await run_batch(
                        self.runtime, self.broker, priority, *message.args, **message.kwargs
                    )
                else:
                    await run_job(self.runtime, priority, *message.args, **message.kwargs)
            for counted in ledger.on_settled:  # the settle "landed": count it as a worker does
                counted()

        await asyncio.gather(*(run(m) for m in messages))
