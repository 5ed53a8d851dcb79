"""End-to-end prefetch throughput: jobs/s from the first schedule to the last cached entry.

Starts `prefetch sandbox` (SANDBOX_LATENCY_MS) and `prefetch worker` on DBs 4-7, waits for
the `prefetch: worker N` processes and a 200-job warm-up, then schedules `--jobs` fresh users
(priority medium, so entries land in the warm tier) in one of three ways:

- single: JobQueue.schedule from this process, asyncio.gather in chunks of 500;
- batch:  JobQueue.schedule_batch, PREFETCH_BATCH_SIZE users per message;
- api:    POST /api/prefetch/schedule/{userId} to a `prefetch api`, `--api-concurrency` at once.

Completion is polled every 50 ms: the `completed` counter of JobQueue.stats() (a batch
message counts each of its users there; the warm DB's size would also count the strategies'
per-shard index keys that the stores create). Reports
jobs/s, the CPU time per job of the worker processes (and of the sandbox and Redis when they
run here) and each worker's peak RSS. Then, against the same sandbox, the baseline: a plain
fetch-and-SET loop in `--workers` processes (uvloop, one aiohttp session, FastRedis,
`--concurrency` tasks each) over as many other fresh users, and the ratio engine/baseline.
Prints a table, writes bench/results/prefetch-*.json. Nothing is asserted; this process and
the sandbox share the CPUs with the workers.

    .venv/bin/python -m bench.bench_prefetch --jobs 20000 --latency-ms 0 --mode single

Here: the command line, one run, `--matrix` and their reports. The parts: prefetch_engine.py
(the workers' run), prefetch_load.py (scheduling and completion), prefetch_baseline.py (the
plain loop) and prefetch_run.py (what a run records).
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from bench.common import (
    Services,
    code_fingerprint,
    flush_bench_dbs,
    machine,
    print_table,
    redis_info,
    redis_target,
    save_result,
    start_sandbox,
)
from bench.prefetch_baseline import run_baseline
from bench.prefetch_engine import run_engine
from bench.prefetch_load import queue_url
from bench.prefetch_run import Run, paired_ratios, summary


def report(args: argparse.Namespace, runs: list[Run]) -> None:
    print()
    print(
        f"{args.jobs} jobs, mode {args.mode}, upstream latency {args.latency_ms} ms, "
        f"{args.workers} workers x {args.concurrency} concurrency, CACHE_COMPRESSION="
        f"{args.compression}, {os.cpu_count()} CPUs shared with the sandbox and this process"
    )
    headers = ["run", "done", "failed", "seconds", "jobs/s", "sched/s"]
    headers += ["worker CPU µs/job", "sandbox µs/job", "Redis µs/job", "peak RSS MB/worker"]
    headers += ["other CPU %"]
    rows = []
    for run in runs:

        def us(role: str, run: Run = run) -> str:
            value = run.cpu_us_per_job(role)
            return "-" if value is None else f"{value:.0f}"

        sched = f"{run.jobs / run.schedule_seconds:.0f}" if run.schedule_seconds else "-"
        rows.append(
            [
                run.name,
                str(run.done),
                str(run.failed),
                f"{run.seconds:.2f}",
                f"{run.jobs_per_s:.0f}",
                sched,
                us("workers"),
                us("sandbox"),
                us("redis"),
                "/".join(f"{m:.0f}" for m in run.peak_rss_mb),
                f"{run.other_cpu_pct:.0f}",
            ]
        )
    print_table(headers, rows)
    if len(runs) == 2 and runs[1].jobs_per_s:
        print(f"engine / baseline: {runs[0].jobs_per_s / runs[1].jobs_per_s:.2f}")
    for run in runs:
        extra = {k: f"{v:.2f}s" for k, v in run.cpu_s.items()}
        print(f"{run.name}: CPU {extra}")
        for note in run.notes:
            print(f"  {note}")


def run_once(args: argparse.Namespace, *, baseline_first: bool = False) -> tuple[list[Run], str]:
    """One engine run and (unless --no-baseline) its baseline, on a fresh sandbox: [engine,
    baseline], whichever ran first (`baseline_first`: the matrix alternates, see `matrix`)."""
    with redis_target(args.redis_url) as url, Services(f"prefetch-{args.mode}") as services:
        flush_bench_dbs(url)
        print(
            f"Redis-compatible server {redis_info(url)['version']} at {url}, DBs 4-7 flushed; "
            f"code {code_fingerprint()}"
        )
        queue = queue_url(url)
        if queue != url:
            flush_bench_dbs(queue)
            print(f"the queue on {queue} (BROKER_URL), DBs 4-7 flushed")
        upstreams = start_sandbox(services, url, args.latency_ms)
        baseline: Run | None = None
        if not args.no_baseline and baseline_first:
            baseline = _baseline(url, upstreams, services, args)
        engine = run_engine(url, upstreams, services, args)
        if not args.no_baseline and baseline is None:
            baseline = _baseline(url, upstreams, services, args)
        logs = services.logs
    return [engine] if baseline is None else [engine, baseline], str(logs)


def _baseline(url: str, upstreams: Any, services: Services, args: argparse.Namespace) -> Run:
    print(f"baseline: {args.workers} processes x {args.concurrency} tasks ...")
    return run_baseline(url, upstreams, services, args)


def matrix(
    args: argparse.Namespace, between: Callable[[int, int], None] | None = None
) -> list[dict[str, Any]]:
    """single and batch at each of `args.latencies` (0 and 50 ms), `--rounds` rounds each:
    one cell of medians (engine, baseline, their ratios) per mode and latency.

    Rounds come first: round 1 of every cell, then round 2, and so on, so that a machine whose
    speed drifts over the minutes of a matrix slows every cell alike. `between(round,
    latency)`, when given, runs after both modes of a latency in each round: the harness runs
    the BullMQ peer's round there, beside the engine's (bench/harness.py).

    The CPU ratio is paired: each round's engine over the baseline run beside it, on the same
    sandbox seconds apart (the baseline first in every other round, so that a drift within a
    round favours neither), and the cell's is the median of those (`cpu_ratios` lists them).
    The sandbox's own CPU per job, the same work in every run, showed this machine's speed
    moving by up to 1.6x between the rounds of one matrix (tuning.md), so a ratio of the two
    medians compares runs minutes apart; it stays in the JSON as `cpu_ratio_of_medians`.
    """
    latencies = getattr(args, "latencies", None) or (0, 50)
    modes = ("single", "batch")
    rounds: dict[tuple[str, int], list[list[Run]]] = {
        (m, lat): [] for m in modes for lat in latencies
    }
    for n in range(args.rounds):
        for latency in latencies:
            for mode in modes:
                print(f"--- {mode}, {latency} ms, round {n + 1}/{args.rounds}")
                one = argparse.Namespace(**{**vars(args), "mode": mode, "latency_ms": latency})
                rounds[mode, latency].append(run_once(one, baseline_first=n % 2 == 1)[0])
            if between is not None:
                between(n, latency)
    cells: list[dict[str, Any]] = []
    for (mode, latency), done in rounds.items():
        cell: dict[str, Any] = {"mode": mode, "latency_ms": latency}
        for i, label in enumerate(("engine", "baseline")):
            runs = [r[i] for r in done if len(r) > i]
            if runs:
                cell[label] = summary(runs)
        if "baseline" in cell:
            engine_cpu = cell["engine"]["worker_cpu_us_per_job"]
            base_cpu = cell["baseline"]["worker_cpu_us_per_job"]
            cell["cpu_ratio_of_medians"] = engine_cpu / base_cpu if base_cpu else None
            cell["cpu_ratios"] = paired_ratios(
                [r[0].cpu_us_per_job("workers") for r in done if len(r) > 1],
                [r[1].cpu_us_per_job("workers") for r in done if len(r) > 1],
            )
            cell["cpu_ratio"] = (
                statistics.median(cell["cpu_ratios"]) if cell["cpu_ratios"] else None
            )
            base_rate = cell["baseline"]["jobs_per_s"]
            cell["rate_ratio"] = cell["engine"]["jobs_per_s"] / base_rate if base_rate else None
        cells.append(cell)
    return cells


def run_matrix(args: argparse.Namespace) -> None:
    """The matrix, printed as one table of medians and saved as one JSON."""
    cells = matrix(args)
    print_matrix(args, cells)
    payload = {"bench": "prefetch-matrix", "args": vars(args), "machine": machine(), "cells": cells}
    print(f"saved {save_result('prefetch-matrix', payload)}")


def print_matrix(args: argparse.Namespace, cells: list[dict[str, Any]]) -> None:
    print()
    print(
        f"medians of {args.rounds} rounds, {args.jobs} jobs each, {args.workers} workers x "
        f"{args.concurrency}, CACHE_COMPRESSION={args.compression}"
    )
    headers = ["mode", "upstream", "engine jobs/s", "baseline jobs/s", "engine/baseline"]
    headers += ["worker CPU µs/job (engine / baseline)", "CPU ratio (rounds)", "peak RSS MB"]
    headers += ["other CPU %"]
    rows = []
    for c in cells:
        e, b = c["engine"], c.get("baseline", {})
        rows.append(
            [
                c["mode"],
                f"{c['latency_ms']} ms",
                f"{e['jobs_per_s']:.0f}",
                f"{b.get('jobs_per_s', 0):.0f}",
                f"{c.get('rate_ratio') or 0:.2f}",
                f"{e['worker_cpu_us_per_job']:.0f} / {b.get('worker_cpu_us_per_job', 0):.0f}",
                f"{c.get('cpu_ratio') or 0:.2f} ("
                + " / ".join(f"{r:.2f}" for r in c.get("cpu_ratios", []))
                + ")",
                f"{e['peak_rss_mb']:.0f}",
                f"{e['other_cpu_pct']:.0f}",
            ]
        )
    print_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--latency-ms", type=int, default=0, help="SANDBOX_LATENCY_MS")
    parser.add_argument("--workers", type=int, default=2, help="PREFETCH_WORKER_COUNT")
    parser.add_argument("--concurrency", type=int, default=100, help="PREFETCH_JOB_CONCURRENCY")
    parser.add_argument("--mode", choices=("single", "batch", "api"), default="single")
    parser.add_argument("--batch-size", type=int, default=50, help="PREFETCH_BATCH_SIZE")
    parser.add_argument("--api-concurrency", type=int, default=256, help="api mode: requests")
    parser.add_argument("--compression", choices=("gzip", "none"), default="gzip")
    parser.add_argument(
        "--redis-url", default=None, help="default: $REDIS_URL, else an embedded Valkey"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the fetch+SET loop")
    parser.add_argument(
        "--matrix",
        action="store_true",
        help="single and batch at 0 and 50 ms, --rounds rounds each, medians in one table",
    )
    parser.add_argument("--rounds", type=int, default=3, help="--matrix: rounds per cell")
    parser.add_argument(
        "--enqueue-first",
        action="store_true",
        help="single/batch: enqueue every job while the workers are stopped, then time them",
    )
    args = parser.parse_args()
    if args.matrix:
        run_matrix(args)
        return
    runs, logs = run_once(args)
    report(args, runs)
    payload = {
        "bench": "prefetch",
        "args": vars(args),
        "machine": machine(),
        "logs": logs,
        "runs": [
            {
                **asdict(r),
                "jobs_per_s": r.jobs_per_s,
                "cpu_us_per_job": {role: r.cpu_us_per_job(role) for role in r.cpu_s},
            }
            for r in runs
        ],
        "ratio_engine_to_baseline": (
            runs[0].jobs_per_s / runs[1].jobs_per_s
            if len(runs) == 2 and runs[1].jobs_per_s
            else None
        ),
    }
    print(f"saved {save_result(f'prefetch-{args.mode}', payload)}")


if __name__ == "__main__":
    main()
