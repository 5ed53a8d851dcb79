"""The policy simulation: the replayed week in virtual time, every strategy mix at once.

Each mix is a `MixSimulation` (mix_simulation.py says what runs: the production strategy code
on a real Redis, under a virtual clock) with a DB of its own, and all of them run
concurrently. The reads before the replayed window are history: recorded once, as the API's
activity flushes would have recorded them (activity, sessions, predictive profiles), and
copied into each mix's DB, so that every mix starts from the same past.

Key shards: `keys.SHARDS` is 1,024 in production; a tick visits every shard's indexes, so a
simulated week of 10,080 ticks at 1,024 shards would spend most of its time in empty shards.
The CLI runs the simulation under `virtual.key_shards(16)`: the same scripts and the same
selection, with more users per shard (tests/test_replay.py checks that the counters are the
same at both counts).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Mapping

from bench.replay.mix_simulation import FLUSH_MS, MixSimulation
from bench.replay.population import Population, Read
from bench.replay.tally import Tally
from bench.replay.virtual import REDIS_TIMEOUT_S, Latency, calibrate
from engine.settings import Settings
from engine.store.fastredis import FastRedis
from engine.strategies.activity import record_activity

# The strategy mixes compared: (activity-based, event-triggered, predictive).
MIXES: dict[str, tuple[bool, bool, bool]] = {
    "read-through": (False, False, False),
    "activity": (True, False, False),
    "activity+events": (True, True, False),
    "activity+predictive": (True, False, True),
    "all": (True, True, True),
}


def mix_settings(base: Settings, mix: str) -> Settings:
    """`base` with the strategies of `mix` switched on and the others off."""
    activity, events, predictive = MIXES[mix]
    return base.with_overrides(
        enable_activity_based=activity,
        enable_event_triggered=events,
        enable_predictive=predictive,
    )


async def replay_history(
    metrics: FastRedis, settings: Settings, reads: list[Read], ids: list[str]
) -> int:
    """Record the history's reads as the API's flushes would (activity, sessions, profiles).

    Nothing else happens in history: no cache, no ticks. Flushes go out in time order on one
    connection (many per round trip; Redis runs them in that order). Returns the flushes.
    """
    flushes: list[tuple[int, set[str]]] = []
    for read in reads:
        at = (read.at // FLUSH_MS + 1) * FLUSH_MS
        if not flushes or flushes[-1][0] != at:
            flushes.append((at, set()))
        flushes[-1][1].add(ids[read.user])
    if not flushes:
        return 0
    first_at, first_users = flushes[0]
    await record_activity(metrics, settings, first_users, first_at)  # loads the script
    for i in range(1, len(flushes), 100):
        await asyncio.gather(
            *(record_activity(metrics, settings, users, at) for at, users in flushes[i : i + 100])
        )
    return len(flushes)


async def copy_db(source: FastRedis, target_db: int) -> int:
    """Copy every `prefetch:` key of `source`'s DB into `target_db` (COPY ... REPLACE)."""
    cursor, copied = b"0", 0
    while True:
        cursor, found = await source.execute("SCAN", cursor, "MATCH", "prefetch:*", "COUNT", 1000)
        if found:
            replies = await source.pipeline(
                [("COPY", key, key, "DB", target_db, "REPLACE") for key in found]
            )
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            copied += len(found)
        if cursor in (b"0", 0):
            return copied


def progress_printer(prefix: str = "  ") -> Callable[[str], None]:
    """Progress lines on stderr."""

    def show(line: str) -> None:
        print(prefix + line, file=sys.stderr, flush=True)

    return show


async def simulate(
    population: Population,
    base: Settings,
    mixes: list[str],
    dbs: Mapping[str, int],
    *,
    history_db: int,
    start_ms: int,
    end_ms: int,
    history_start_ms: int | None = None,
    latency: Latency | None = None,
    upstream_ms: float = 50.0,
    job_latency_ms: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Tally]:
    """Replay [start_ms, end_ms) once per mix, all mixes at once (one DB each, flushed first).

    Every read before `start_ms` is history, recorded once (predictive on) in `history_db`
    and copied into each mix's DB. `base` carries the Redis URL and every other setting.
    """
    url = base.redis_url
    history = FastRedis(url, history_db, timeout=REDIS_TIMEOUT_S)
    clients: dict[str, FastRedis] = {}
    try:
        if latency is None:
            latency = await calibrate(base, history, upstream_ms)
        for db in {history_db, *dbs.values()}:
            client = FastRedis(url, db, timeout=REDIS_TIMEOUT_S)
            await client.execute("FLUSHDB")
            await client.close()
        recorded = base.with_overrides(enable_predictive=True)
        flushes = await replay_history(
            history,
            recorded,
            population.reads_between(history_start_ms or 0, start_ms),
            [user.id for user in population.users],
        )
        if progress is not None:
            progress(f"history: {flushes} activity flushes recorded")
        runs: list[MixSimulation] = []
        for mix in mixes:
            db = dbs[mix]
            await copy_db(history, db)
            settings = mix_settings(
                base.with_overrides(db_hot=db, db_warm=db, db_queue=db, db_metrics=db), mix
            )
            client = clients[mix] = FastRedis(url, db, timeout=REDIS_TIMEOUT_S)
            roles = {"hot": client, "warm": client, "queue": client, "metrics": client}
            tally = Tally(population, start_ms, end_ms, hour_ms=settings.predictive_hour_ms)
            runs.append(
                MixSimulation(
                    mix,
                    settings,
                    roles,
                    population,
                    tally,
                    latency=latency,
                    job_latency_ms=job_latency_ms,
                    progress=progress,
                )
            )
        tallies = await asyncio.gather(*(run.run(start_ms, end_ms) for run in runs))
        return dict(zip(mixes, tallies, strict=True))
    finally:
        await history.close()
        for client in clients.values():
            await client.close()
