"""The sizing model: from daily active users to reads/s, Redis memory and shards, processes.

    .venv/bin/python -m bench.sizing              # 1M, 10M and 100M users (= make sizing)
    .venv/bin/python -m bench.sizing --dau 5e6 --opens-per-user 20 --hit-rate 0.9
    .venv/bin/python -m bench.sizing --measure    # bytes per cached timeline, measured

The model (every input is a flag; the per-process capacities default to tuning.md's figures
from this 2-CPU machine, so re-measure them on the target hardware):

- opens/day = DAU x opens per user; average reads/s = opens/day / 86,400; peak = x peak factor.
- Reads that hit are ~40 µs of API CPU; a miss is a read-through, the same fetch-decode-encode-
  gzip work as a job (~730 µs). One API process therefore serves
  1 / (hit/hit_capacity + miss/job_capacity) reads/s: at a 95% hit rate misses take more API
  CPU than hits do. Processes are provisioned for the peak at `--utilization` of capacity.
- Prefetch jobs/s = peak reads x jobs per open (1.0: each prefetched entry is read once).
  A worker process's capacity is measured at 0 ms and 50 ms of upstream latency, linear in
  between, the 50 ms figure beyond, and never above concurrency / (latency + CPU per job).
- Upstream (timeline service) fetches/s at peak = jobs + read-through misses.
- Cached entries = min(DAU, distinct users opening within one warm TTL at peak), an upper
  bound (a user who opens twice in the window counts twice). Memory = entries x (bytes per
  cached timeline + the user's activity entry), measured with MEMORY USAGE, x headroom.
- Redis shards = the most of: memory / usable memory per shard, operations / ops per shard,
  bytes out / bandwidth per shard (each at `--utilization`). Replicas not counted.
- The queue is one Redis (BROKER_URL, never the Cluster: engine/store/keys.py), so it does
  not shard: its load at peak is given as a share of that one node's CPU, for jobs sent one
  user per message and for jobs sent in batch messages (the strategies' way), from its CPU
  per job, measured. Above `--utilization`, single messages do not fit: batch them.
"""

from __future__ import annotations

import argparse
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

SECONDS_PER_DAY = 86_400

# Measured with `python -m bench.sizing --measure` on Redis 7.0.15 (jemalloc): MEMORY USAGE
# of a stored entry (100-post sandbox timelines, 9,631 bytes of gzip at level 1) and of one
# member of the activity zset. Valkey 9.1 measured less (9,774 and 110): the larger is kept.
MEASURED_ENTRY_BYTES = 10_360
MEASURED_ACTIVITY_BYTES = 140


@dataclass(frozen=True, slots=True)
class Workload:
    """What the users do."""

    dau: float = 1e6
    opens_per_user: float = 10.0
    hit_rate: float = 0.95
    peak_factor: float = 3.0
    upstream_latency_ms: float = 50.0
    entry_bytes: float = MEASURED_ENTRY_BYTES
    activity_bytes: float = MEASURED_ACTIVITY_BYTES
    jobs_per_open: float = 1.0
    ttl_s: float = 900.0  # WARM_CACHE_TTL


@dataclass(frozen=True, slots=True)
class Capacity:
    """What one process or one Redis shard does (tuning.md; this machine, 2 CPUs)."""

    api_reads_per_s: float = 25_434.0  # cached gzip reads, one API process
    worker_jobs_per_s_0ms: float = 1_003.0  # 2,006 jobs/s for 2 worker processes
    worker_jobs_per_s_50ms: float = 724.0  # 1,448 jobs/s for 2 worker processes
    job_concurrency: int = 100
    job_cpu_ms: float = 0.73  # worker CPU per job
    redis_ops_per_shard: float = 87_681.0  # redis-benchmark GET of a 9.6 KB value
    redis_gb_per_shard: float = 25.0  # usable (maxmemory) per shard
    redis_gbit_per_shard: float = 10.0  # network out per shard
    redis_ops_per_read: float = 1.5  # hot, then warm on a hot miss
    # A job's or a miss's cache work (freshness check, guarded store), in GETs of the same
    # server CPU: 114 µs per job against 22.8 µs per 9 KB GET, measured the same day. The
    # queue's work is on the queue node, below.
    redis_ops_per_job: float = 5.0
    # The queue's one Redis, at full use of one core: jobs/s from schedule to settle, one user
    # per message and 50 per batch message (1e6 / its CPU µs per job, tuning.md "Sizing").
    queue_jobs_per_s_single: float = 9_346.0
    queue_jobs_per_s_batched: float = 62_500.0
    utilization: float = 0.6  # provision the peak at this share of capacity
    memory_headroom: float = 1.3  # fragmentation, replication and client buffers


@dataclass(frozen=True, slots=True)
class Plan:
    """What a workload needs."""

    avg_reads_per_s: float
    peak_reads_per_s: float
    peak_jobs_per_s: float
    peak_upstream_per_s: float
    api_reads_per_process: float
    worker_jobs_per_process: float
    api_processes: int
    worker_processes: int
    cached_entries: float
    redis_gb: float
    redis_ops_per_s: float
    redis_gbit_out: float
    shards_for_memory: int
    shards_for_ops: int
    shards_for_bandwidth: int
    queue_load_single: float  # share of the queue node's CPU at peak, one user per message
    queue_load_batched: float  # the same, with batch messages

    @property
    def shards(self) -> int:
        return max(1, self.shards_for_memory, self.shards_for_ops, self.shards_for_bandwidth)


def worker_capacity(latency_ms: float, capacity: Capacity) -> float:
    """Jobs/s of one worker process at this upstream latency."""
    fast, slow = capacity.worker_jobs_per_s_0ms, capacity.worker_jobs_per_s_50ms
    cpu_bound = fast + (slow - fast) * min(max(latency_ms, 0.0), 50.0) / 50.0
    in_flight_bound = capacity.job_concurrency / ((latency_ms + capacity.job_cpu_ms) / 1000)
    return min(cpu_bound, in_flight_bound)


def plan(workload: Workload, capacity: Capacity) -> Plan:
    """Apply the model of the module docstring."""
    w, c = workload, capacity
    avg_reads = w.dau * w.opens_per_user / SECONDS_PER_DAY
    peak_reads = avg_reads * w.peak_factor
    misses = peak_reads * (1 - w.hit_rate)
    jobs = peak_reads * w.jobs_per_open
    per_job = worker_capacity(w.upstream_latency_ms, c)
    per_api = 1 / (w.hit_rate / c.api_reads_per_s + (1 - w.hit_rate) / per_job)
    entries = min(w.dau, peak_reads * w.ttl_s)
    redis_bytes = entries * (w.entry_bytes + w.activity_bytes) * c.memory_headroom
    redis_ops = peak_reads * c.redis_ops_per_read + (jobs + misses) * c.redis_ops_per_job
    gbit_out = peak_reads * w.hit_rate * w.entry_bytes * 8 / 1e9
    return Plan(
        avg_reads_per_s=avg_reads,
        peak_reads_per_s=peak_reads,
        peak_jobs_per_s=jobs,
        peak_upstream_per_s=jobs + misses,
        api_reads_per_process=per_api,
        worker_jobs_per_process=per_job,
        api_processes=_need(peak_reads, per_api * c.utilization),
        worker_processes=_need(jobs, per_job * c.utilization),
        cached_entries=entries,
        redis_gb=redis_bytes / 1e9,
        redis_ops_per_s=redis_ops,
        redis_gbit_out=gbit_out,
        shards_for_memory=_need(redis_bytes / 1e9, c.redis_gb_per_shard),
        shards_for_ops=_need(redis_ops, c.redis_ops_per_shard * c.utilization),
        shards_for_bandwidth=_need(gbit_out, c.redis_gbit_per_shard * c.utilization),
        queue_load_single=jobs / c.queue_jobs_per_s_single,
        queue_load_batched=jobs / c.queue_jobs_per_s_batched,
    )


def _need(demand: float, per_unit: float) -> int:
    """Units needed to carry `demand` (at least 1)."""
    return max(1, math.ceil(demand / per_unit - 1e-9))


# --- measuring ------------------------------------------------------------------------------


def measure(redis_url: str | None, users: int = 200) -> dict[str, Any]:
    """Store `users` timelines as a worker does and read MEMORY USAGE of each.

    Uses DB 4 (a bench DB) and deletes only the keys it wrote: never a FLUSHDB, since the
    Redis may be shared.
    """
    import redis

    from bench.common import redis_info, redis_target
    from engine.store import keys
    from engine.store.entry import compress
    from engine.wire import cached_body
    from sandbox import generate_posts

    with redis_target(redis_url) as url:
        client = redis.Redis.from_url(url, db=4)
        activity_key = f"sizing:activity:{uuid.uuid4()}"
        ids = [str(uuid.uuid4()) for _ in range(users)]
        try:
            now = int(time.time() * 1000)
            values = {
                uid: compress(cached_body(generate_posts(uid, 100), now, "warm", cached=True))
                for uid in ids
            }
            pipe = client.pipeline(transaction=False)
            for uid, value in values.items():
                pipe.set(keys.timeline("warm", uid), value, px=900_000)
            pipe.zadd(activity_key, {uid: now for uid in ids})
            pipe.execute()
            usage = [client.memory_usage(keys.timeline("warm", uid), samples=0) or 0 for uid in ids]
            activity = client.memory_usage(activity_key, samples=0) or 0
            server = redis_info(url)
        finally:
            client.delete(activity_key, *(keys.timeline("warm", uid) for uid in ids))
            client.close()
    return {
        "users": users,
        "value_bytes": sum(len(v) for v in values.values()) / users,
        "entry_bytes": sum(usage) / users,
        "activity_bytes_per_user": activity / users,
        "server": f"{server['version']}",
    }


# --- the command ----------------------------------------------------------------------------


def _table(rows: list[tuple[float, Plan]]) -> str:
    def n(value: float) -> str:
        return f"{value:,.0f}"

    header = (
        "| daily active users | avg reads/s | peak reads/s | peak jobs/s | upstream fetches/s "
        "| cached entries | Redis memory | Redis ops/s | Redis out | shards (mem/ops/net) "
        "| API processes | worker processes | queue node CPU (single / batched) |"
    )
    lines = [header, "|" + "---:|" * 13]
    for dau, p in rows:
        lines.append(
            f"| {n(dau)} | {n(p.avg_reads_per_s)} | {n(p.peak_reads_per_s)} | "
            f"{n(p.peak_jobs_per_s)} | {n(p.peak_upstream_per_s)} | {n(p.cached_entries)} | "
            f"{p.redis_gb:,.1f} GB | {n(p.redis_ops_per_s)} | {p.redis_gbit_out:.2f} Gbit/s | "
            f"**{p.shards}** ({p.shards_for_memory}/{p.shards_for_ops}/"
            f"{p.shards_for_bandwidth}) | **{p.api_processes}** | **{p.worker_processes}** | "
            f"{p.queue_load_single:.0%} / {p.queue_load_batched:.0%} |"
        )
    return "\n".join(lines)


def _add_flags(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, type=float, default=f.default, help=f"(default {f.default})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sizing",
        description="Sizing model: reads/s, Redis memory and shards, API and worker processes.",
    )
    parser.add_argument(
        "--dau", type=float, nargs="+", default=[1e6, 1e7, 1e8], help="daily active users"
    )
    parser.add_argument(
        "--measure", action="store_true", help="measure bytes per cached timeline and exit"
    )
    parser.add_argument("--redis-url", default=None, help="for --measure (default: embedded)")
    _add_flags(parser, Workload, skip=("dau",))
    _add_flags(parser, Capacity)
    args = parser.parse_args(argv)
    if args.measure:
        for key, value in measure(args.redis_url).items():
            print(f"{key}: {value:,.1f}" if isinstance(value, float) else f"{key}: {value}")
        return 0
    values = vars(args)
    workload = Workload(**{f.name: values[f.name] for f in fields(Workload) if f.name != "dau"})
    capacity = Capacity(**{f.name: values[f.name] for f in fields(Capacity)})
    capacity = replace(capacity, job_concurrency=int(capacity.job_concurrency))
    rows = [(dau, plan(replace(workload, dau=dau), capacity)) for dau in args.dau]
    first = rows[0][1]
    print(
        f"inputs: {asdict(workload) | {'dau': args.dau}}\ncapacities: {asdict(capacity)}\n"
        f"per process at this mix: API {first.api_reads_per_process:,.0f} reads/s, "
        f"worker {first.worker_jobs_per_process:,.0f} jobs/s (provisioned at "
        f"{capacity.utilization:.0%})\n"
    )
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
