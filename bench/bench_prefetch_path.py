"""The prefetch path's own CPU per user: `Prefetcher.prefetch` against the plain steps.

    .venv/bin/python -m bench.bench_prefetch_path --users 10000 --rounds 3

In this process on uvloop, against a real `prefetch sandbox` and Redis (REDIS_URL, else an
embedded Valkey; the bench's DBs, flushed), with `--concurrency` coroutines as a worker has
jobs in flight, each over fresh users:

- engine: `Prefetcher.prefetch` of a scheduled job, what an actor awaits: the freshness and
  generation read before the fetch, the fetch and decode, the body, gzip and stamp, the
  guarded store and its expiry index;
- plain:  the fetch, decode, body, gzip and a SET with PX: bench_prefetch's plain loop's own
          step (`prefetch_baseline.plain_prefetch`).

The two alternate within one process, the order flipped every round, so that the machine's
drift falls on both. Their difference is what the cache's guarantees cost per user beyond the
unit of work, without Dramatiq's message path (bench_engine_overhead) or a worker process
around it (bench_prefetch).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import uvloop

from bench.common import (
    BENCH_DBS,
    Services,
    flush_bench_dbs,
    machine,
    print_table,
    redis_target,
    save_result,
    start_sandbox,
)
from bench.prefetch_baseline import plain_prefetch, timelines_at
from engine.runtime import open_runtime
from engine.settings import load_settings

WARMUP_USERS = 1_000

Step = Callable[[str], Awaitable[object]]


async def _cpu_per_user(step: Step, users: int, concurrency: int) -> float:
    """CPU µs per user of `step` over `users` fresh users, `concurrency` at a time."""
    waiting = [str(uuid.uuid4()) for _ in range(users)]

    async def lane() -> None:
        while waiting:
            await step(waiting.pop())

    started = time.process_time()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return (time.process_time() - started) / users * 1e6


async def measure(
    url: str, upstreams: dict[str, str], users: int, rounds: int, concurrency: int
) -> dict[str, list[float]]:
    env = {"REDIS_URL": url, **{k: str(v) for k, v in BENCH_DBS.items()}, **upstreams}
    settings = load_settings(env)
    async with open_runtime(settings) as runtime:
        warm = runtime.redis["warm"]
        prefix = timelines_at(upstreams["TIMELINE_SERVICE_URL"])

        async def engine(user: str) -> object:
            return await runtime.prefetcher.prefetch(user, "medium", origin="schedule")

        async def plain(user: str) -> object:
            return await plain_prefetch(runtime.session, warm, prefix, user, gzip=True)

        steps: dict[str, Step] = {"engine": engine, "plain": plain}
        for step in steps.values():  # connections, tokens, scripts loaded
            await _cpu_per_user(step, WARMUP_USERS, concurrency)
        found: dict[str, list[float]] = {name: [] for name in steps}
        for n in range(rounds):
            for name in sorted(steps, reverse=n % 2 == 1):
                cpu = await _cpu_per_user(steps[name], users, concurrency)
                found[name].append(cpu)
                print(f"  round {n + 1}/{rounds}, {name}: {cpu:.1f} µs/user", flush=True)
        return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    with redis_target(args.redis_url) as url, Services("prefetch-path") as services:
        flush_bench_dbs(url)
        upstreams = start_sandbox(services, url)
        found = uvloop.run(measure(url, upstreams, args.users, args.rounds, args.concurrency))
    engine, plain = statistics.median(found["engine"]), statistics.median(found["plain"])
    print(f"\nCPU µs per user, medians of {args.rounds} alternated rounds of {args.users}")
    print_table(
        ["engine", "plain", "engine - plain", "engine / plain"],
        [[f"{engine:.1f}", f"{plain:.1f}", f"{engine - plain:.1f}", f"{engine / plain:.3f}"]],
    )
    result = {"machine": machine(), "users": args.users, "rounds": found}
    print(f"saved {save_result('prefetch-path', result)}")


if __name__ == "__main__":
    main()
