"""The sizing model's arithmetic (bench/sizing.py), on inputs small enough to check by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.sizing import Capacity, Workload, main, plan, worker_capacity

WORKLOAD = Workload(
    dau=86_400,
    opens_per_user=10,
    hit_rate=0.5,
    peak_factor=2,
    upstream_latency_ms=0,
    entry_bytes=1_000,
    activity_bytes=0,
    jobs_per_open=1,
    ttl_s=100,
)
CAPACITY = Capacity(
    api_reads_per_s=1_000,
    worker_jobs_per_s_0ms=100,
    worker_jobs_per_s_50ms=50,
    job_concurrency=100,
    job_cpu_ms=1,
    redis_ops_per_shard=1_000,
    redis_gb_per_shard=0.001,
    redis_gbit_per_shard=1,
    redis_ops_per_read=1,
    redis_ops_per_job=2,
    utilization=0.5,
    memory_headroom=1,
    queue_jobs_per_s_single=40,
    queue_jobs_per_s_batched=400,
)


def test_rates_processes_memory_and_shards_by_hand() -> None:
    p = plan(WORKLOAD, CAPACITY)
    assert p.avg_reads_per_s == pytest.approx(10)  # 864,000 opens a day
    assert p.peak_reads_per_s == pytest.approx(20)
    assert p.peak_jobs_per_s == pytest.approx(20)
    assert p.peak_upstream_per_s == pytest.approx(30)  # 20 jobs + 10 read-through misses
    # Half the reads are misses at 1/100 s of CPU each, half hits at 1/1000 s.
    assert p.api_reads_per_process == pytest.approx(1 / (0.5 / 1_000 + 0.5 / 100))
    assert p.worker_jobs_per_process == pytest.approx(100)
    assert p.api_processes == 1  # 20 reads/s against 91 at 50% utilization
    assert p.worker_processes == 1  # 20 jobs/s against 50
    assert p.cached_entries == pytest.approx(2_000)  # 20/s x 100 s, under the 86,400 users
    assert p.redis_gb == pytest.approx(0.002)
    assert p.redis_ops_per_s == pytest.approx(20 * 1 + 30 * 2)
    assert p.redis_gbit_out == pytest.approx(10 * 1_000 * 8 / 1e9)
    assert (p.shards_for_memory, p.shards_for_ops, p.shards_for_bandwidth) == (2, 1, 1)
    assert p.shards == 2
    # The queue's one node: 20 jobs/s against 40 single or 400 batched at full use.
    assert (p.queue_load_single, p.queue_load_batched) == (pytest.approx(0.5), pytest.approx(0.05))


def test_processes_round_up_and_grow_with_users() -> None:
    big = plan(replace(WORKLOAD, dau=86_400 * 100), CAPACITY)
    assert big.peak_reads_per_s == pytest.approx(2_000)
    assert big.worker_processes == 40  # 2,000 jobs/s at 50 per process
    assert big.api_processes == 22  # 2,000 / 90.9 = 22.0: exactly enough is enough
    assert big.cached_entries == pytest.approx(200_000)
    assert big.shards_for_ops == 16  # 2,000 + 3,000 x 2 = 8,000 ops/s at 500 per shard


def test_cached_entries_never_exceed_the_users() -> None:
    p = plan(replace(WORKLOAD, ttl_s=1e9), CAPACITY)
    assert p.cached_entries == WORKLOAD.dau


def test_worker_capacity_follows_latency_and_concurrency() -> None:
    assert worker_capacity(0, CAPACITY) == pytest.approx(100)
    assert worker_capacity(25, CAPACITY) == pytest.approx(75)  # between the measured points
    assert worker_capacity(500, CAPACITY) == pytest.approx(50)  # the 50 ms figure beyond
    few = replace(CAPACITY, job_concurrency=2)
    assert worker_capacity(100, few) == pytest.approx(2 / 0.101)  # Little's law caps it


def test_the_command_prints_one_row_per_user_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--dau", "1e6", "1e8", "--hit-rate", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "| 1,000,000 |" in out and "| 100,000,000 |" in out
    assert "'hit_rate': 0.9" in out
