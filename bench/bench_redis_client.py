"""Compare Redis clients on GET of a large value: FastRedis, redis.asyncio and valkey-glide on
one node, and (`--cluster`) redis.asyncio's RedisCluster and glide's cluster client on a local
three-master Redis Cluster started for the run (tests/redis_servers.py).

Each client runs `--concurrency` coroutines that GET the same `--size`-byte key in a loop for
`--duration` seconds (after a short warm-up), and the script prints throughput and the CPU
time this process spent per GET, every thread included (glide's Rust core runs in threads of
this process; Redis's own CPU is not counted). Nothing is asserted.

    .venv/bin/python -m bench.bench_redis_client --loop uvloop --duration 3
    .venv/bin/python -m bench.bench_redis_client --size 9830 --cluster --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.store.fastredis import FastRedis

ALL_CLIENTS = "fastredis,redis-py,glide,cluster-redis-py,cluster-glide,cluster-ours"

Get = Callable[[str], Awaitable[object]]


@dataclass
class Result:
    name: str
    ops: int
    wall: float
    cpu: float

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.wall

    @property
    def cpu_us_per_op(self) -> float:
        return self.cpu / self.ops * 1e6


async def _drive(get: Get, key: str, expected: bytes, concurrency: int, seconds: float) -> int:
    """Run `concurrency` GET loops for `seconds`; return how many GETs completed."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def worker() -> int:
        done = 0
        while loop.time() < end:
            await get(key)
            done += 1
        return done

    if await get(key) != expected:
        raise SystemExit(f"{key!r} does not hold the expected value")
    return sum(await asyncio.gather(*(worker() for _ in range(concurrency))))


async def _measure(name: str, get: Get, key: str, value: bytes, args: argparse.Namespace) -> Result:
    await _drive(get, key, value, args.concurrency, args.warmup)
    wall, cpu = time.perf_counter(), time.process_time()
    ops = await _drive(get, key, value, args.concurrency, args.duration)
    return Result(name, ops, time.perf_counter() - wall, time.process_time() - cpu)


def _glide_address(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


async def _glide(url: str, db: int, *, cluster: bool) -> Any:
    import glide

    host, port = _glide_address(url)
    addresses = [glide.NodeAddress(host, port)]
    if cluster:
        return await glide.GlideClusterClient.create(
            glide.GlideClusterClientConfiguration(addresses, request_timeout=5000)
        )
    return await glide.GlideClient.create(
        glide.GlideClientConfiguration(addresses, database_id=db, request_timeout=5000)
    )


async def _single_node(args: argparse.Namespace, results: list[Result]) -> None:
    key = f"bench:fastredis:{os.getpid()}"
    value = os.urandom(args.size)
    fast = await FastRedis.connect(args.url, args.db)
    try:
        await fast.set(key, value, px=600_000)
        if "fastredis" in args.clients:
            results.append(await _measure("fastredis (1 conn)", fast.get, key, value, args))
        if "redis-py" in args.clients:
            pool = redis.asyncio.Redis.from_url(args.url, db=args.db)
            try:
                results.append(await _measure("redis.asyncio (pool)", pool.get, key, value, args))
            finally:
                await pool.aclose()
        if "glide" in args.clients:
            client = await _glide(args.url, args.db, cluster=False)
            try:
                results.append(await _measure("glide (1 node)", client.get, key, value, args))
            finally:
                await client.close()
    finally:
        await fast.delete(key)
        await fast.close()


async def _on_cluster(args: argparse.Namespace, url: str, results: list[Result]) -> None:
    key = f"bench:cluster:{os.getpid()}"
    value = os.urandom(args.size)
    seed = redis.asyncio.RedisCluster.from_url(url)
    try:
        await seed.set(key, value, px=600_000)
        if "cluster-redis-py" in args.clients:
            results.append(await _measure("RedisCluster (redis-py)", seed.get, key, value, args))
        if "cluster-glide" in args.clients:
            client = await _glide(url, 0, cluster=True)
            try:
                results.append(await _measure("glide cluster", client.get, key, value, args))
            finally:
                await client.close()
        if "cluster-ours" in args.clients:
            from engine.store.cluster import ClusterRedis

            ours = ClusterRedis(url)
            try:
                results.append(await _measure("ClusterRedis (glide)", ours.get, key, value, args))
            finally:
                await ours.close()
        await seed.delete(key)
    finally:
        await seed.aclose()


async def _bench(args: argparse.Namespace, cluster_url: str | None) -> list[Result]:
    results: list[Result] = []
    await _single_node(args, results)
    if cluster_url is not None:
        await _on_cluster(args, cluster_url, results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    parser.add_argument("--db", type=int, default=15)
    parser.add_argument("--size", type=int, default=45 * 1024, help="value size in bytes")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per client")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--clients", default=ALL_CLIENTS, help=f"comma list of {ALL_CLIENTS}")
    parser.add_argument(
        "--cluster", action="store_true", help="also start a 3-master cluster for cluster-*"
    )
    args = parser.parse_args()
    args.clients = set(args.clients.split(","))

    run = uvloop.run if args.loop == "uvloop" else asyncio.run
    with contextlib.ExitStack() as stack:
        cluster_url = None
        if args.cluster:
            from tests.redis_servers import LocalCluster

            cluster_url = stack.enter_context(LocalCluster(3)).url
        results = run(_bench(args, cluster_url))

    hiredis_parser = getattr(redis.utils, "HIREDIS_AVAILABLE", "?")
    print(
        f"GET of {args.size} B, concurrency {args.concurrency}, {args.duration:g} s, "
        f"loop {args.loop}, redis-py {redis.__version__} (hiredis parser: {hiredis_parser})"
    )
    header = f"{'client':<24} {'ops':>9} {'ops/s':>10} {'CPU µs/op':>10} {'CPU %':>6}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.name:<24} {r.ops:>9} {r.ops_per_s:>10.0f} {r.cpu_us_per_op:>10.1f} "
            f"{100 * r.cpu / r.wall:>6.0f}"
        )


if __name__ == "__main__":
    main()
