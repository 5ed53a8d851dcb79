"""The BullMQ peer: the same unit of work as a prefetch job, run by BullMQ on Node.

    .venv/bin/python -m bench.bench_peers --jobs 20000 --latency-ms 0 50 --rounds 3

`bench/peers/bullmq/` holds a small Node project (package.json with pinned versions,
`worker.js`, `enqueue.js`); it is copied to a temporary directory and `npm install`ed there
at every run (nothing vendored, no node_modules in the tree). Without node/npm, or when the
registry install fails, the peer is skipped with the reason in the result.

Per latency and round, on a fresh `prefetch sandbox` (SANDBOX_LATENCY_MS) and an embedded
Valkey of the peer's own (BullMQ needs `noeviction`; DBs 5 for entries, 6 for the queue):
`--workers` Node processes start with `--concurrency` jobs in flight each and warm up (100
units of work each, outside the queue), `--jobs` fresh users are enqueued first (one job per
user, 3 attempts, exponential backoff from 2 s, the user id as job id, completed jobs
removed), then the workers are told to go and the clock runs until every user's entry is
stored. Reported: jobs/s, worker CPU µs per job (utime + stime of the Node processes, libuv
threads included), the sandbox's and Valkey's CPU per job, peak RSS per worker (VmHWM).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

import redis

from bench.common import (
    ROOT,
    SERVICE_TOKEN,
    Services,
    local_redis_pid,
    machine,
    print_table,
    save_result,
    start_sandbox,
)
from bench.prefetch_run import Run, summary
from bench.procfs import cpu_seconds, memory_kb, system_busy_seconds

PEER_DIR = ROOT / "bench" / "peers" / "bullmq"
ENTRIES_DB = 5
QUEUE_DB = 6
NPM_TIMEOUT_S = 300
READY_TIMEOUT_S = 90
POLL_S = 0.05
STALL_S = 30.0


def install(target: Path) -> str | None:
    """Copy the peer's project into `target` and `npm install` it; the reason if it failed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return "node and npm are not installed"
    for name in ("package.json", "worker.js", "enqueue.js", "common.js"):
        shutil.copy(PEER_DIR / name, target / name)
    argv = [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"]
    try:
        done = subprocess.run(
            argv, cwd=target, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return f"npm install timed out after {NPM_TIMEOUT_S} s"
    if done.returncode != 0:
        return f"npm install failed ({done.returncode}): {(done.stderr or done.stdout)[-500:]}"
    return None


class NodeWorker:
    """One `node worker.js` process: stdin for go/stop, stdout lines read by a thread."""

    def __init__(self, project: Path, env: dict[str, str], log: Path) -> None:
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            ["node", "worker.js"],
            cwd=project,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            self.lines.put(raw.decode(errors="replace").strip())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_line(self, expected: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node worker exited with {self.proc.returncode}")
            try:
                if self.lines.get(timeout=0.2) == expected:
                    return
            except queue.Empty:
                continue
        raise RuntimeError(f"node worker did not say {expected!r} within {timeout:g}s")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.send("stop")
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


def _dbsize(client: redis.Redis) -> int:
    return int(client.dbsize())


def run_round(project: Path, redis_url: str, latency_ms: int, args: argparse.Namespace) -> Run:
    """One round on a fresh sandbox: start, warm up, enqueue, go, wait, measure, stop."""
    run = Run(f"BullMQ, {latency_ms} ms", jobs=args.jobs)
    entries = redis.Redis.from_url(redis_url, db=ENTRIES_DB)
    queue_db = redis.Redis.from_url(redis_url, db=QUEUE_DB)
    entries.flushdb()
    queue_db.flushdb()
    with Services(f"peer-bullmq-{latency_ms}ms") as services:
        upstreams = start_sandbox(services, redis_url, latency_ms)
        env = {
            **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")},
            "REDIS_URL": redis_url,
            "ENTRIES_DB": str(ENTRIES_DB),
            "QUEUE_DB": str(QUEUE_DB),
            "TIMELINE_URL": upstreams["TIMELINE_SERVICE_URL"],
            "SERVICE_TOKEN": SERVICE_TOKEN,
            "CONCURRENCY": str(args.concurrency),
            "WARMUP": "100",
            "UV_THREADPOOL_SIZE": str(args.uv_threads),
        }
        workers = [
            NodeWorker(project, env, services.logs / f"node-worker-{n + 1}.log")
            for n in range(args.workers)
        ]
        try:
            for worker in workers:
                worker.wait_line("ready", READY_TIMEOUT_S)
            users_file = services.logs / "users.txt"
            users_file.write_text("\n".join(str(uuid.uuid4()) for _ in range(args.jobs)) + "\n")
            subprocess.run(
                ["node", "enqueue.js", str(users_file)],
                cwd=project,
                env=env,
                check=True,
                capture_output=True,
                timeout=600,
            )
            base = _dbsize(entries)
            sandbox_pid = services.pid_of("sandbox")
            redis_pid = local_redis_pid(redis_url)
            roles = {
                "workers": [w.pid for w in workers],
                "sandbox": [sandbox_pid] if sandbox_pid else [],
                "redis": [redis_pid] if redis_pid else [],
            }
            before = {r: sum(cpu_seconds(p) for p in pids) for r, pids in roles.items() if pids}
            busy0 = system_busy_seconds()
            self0 = time.process_time()
            started = time.perf_counter()
            for worker in workers:
                worker.send("go")
            last_change, last_done = time.monotonic(), -1
            while True:
                run.done = _dbsize(entries) - base
                if run.done >= args.jobs:
                    break
                if run.done != last_done:
                    last_change, last_done = time.monotonic(), run.done
                if time.monotonic() - last_change > STALL_S:
                    run.notes.append(f"stalled at {run.done}/{args.jobs}")
                    break
                time.sleep(POLL_S)
            run.seconds = time.perf_counter() - started
            busy = system_busy_seconds() - busy0
            run.cpu_s = {r: sum(cpu_seconds(p) for p in roles[r]) - before[r] for r in before}
            run.cpu_s["bench"] = time.process_time() - self0
            run.account_others(busy)
            run.peak_rss_mb = [memory_kb(w.pid, "VmHWM") / 1024 for w in workers]
            run.failed = int(queue_db.zcard("bull:prefetch-peer:failed"))
        finally:
            for worker in workers:
                worker.stop()
        errors = [
            line
            for n in range(args.workers)
            for line in (services.logs / f"node-worker-{n + 1}.log").read_text().splitlines()
            if line.strip()
        ]
        if errors:
            run.notes.append(f"worker stderr: {len(errors)} lines, first: {errors[0][:200]}")
    entries.close()
    queue_db.close()
    return run


class Peer:
    """The peer, installed once, with its own Valkey: `with Peer() as peer: peer.round(...)`.

    `skipped` holds the reason when it cannot run (no node/npm, a failed install); rounds are
    then not run. The harness interleaves the peer's rounds with the engine's (bench/harness.py).
    """

    def __init__(self) -> None:
        self.skipped: str | None = None
        self.versions: dict[str, str] = {}
        self.node = ""
        self._stack = contextlib.ExitStack()
        self._project = Path()
        self._url = ""

    def __enter__(self) -> Peer:
        from prefetch.embedded import EmbeddedRedis

        try:
            self._project = Path(
                self._stack.enter_context(tempfile.TemporaryDirectory(prefix="prefetch-bullmq-"))
            )
            print(f"BullMQ peer: npm install in {self._project} ...")
            self.skipped = install(self._project)
            if self.skipped is not None:
                print(f"  ! BullMQ peer skipped: {self.skipped}")
                return self
            self.versions = {n: _installed_version(self._project, n) for n in ("bullmq", "ioredis")}
            node = subprocess.run(["node", "--version"], capture_output=True, text=True)
            self.node = node.stdout.strip()
            server = self._stack.enter_context(EmbeddedRedis())
            client = redis.Redis.from_url(server.url)
            client.config_set("maxmemory-policy", "noeviction")
            client.close()
            self._url = server.url
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def round(self, latency_ms: int, args: argparse.Namespace, label: str) -> Run:
        """One measured round at this upstream latency, printed as it ends."""
        print(f"--- BullMQ, {latency_ms} ms, {label}")
        one = run_round(self._project, self._url, latency_ms, args)
        print(
            f"  {one.done}/{one.jobs} in {one.seconds:.2f}s: {one.jobs_per_s:.0f} "
            f"jobs/s, worker CPU {one.cpu_us_per_job('workers') or 0:.0f} µs/job"
        )
        return one

    def result(self, args: argparse.Namespace, rounds: dict[int, list[Run]]) -> dict[str, Any]:
        """The peer's part of a result: a cell of medians per latency."""
        if self.skipped is not None:
            return {"skipped": self.skipped}
        cells = [{"latency_ms": lat} | summary(runs) for lat, runs in rounds.items() if runs]
        return {
            "peer": "bullmq",
            "versions": self.versions,
            "node": self.node,
            "workers": args.workers,
            "concurrency": args.concurrency,
            "jobs": args.jobs,
            "cells": cells,
        }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Install the peer and run `--rounds` rounds of every latency, latencies alternating."""
    rounds: dict[int, list[Run]] = {latency: [] for latency in args.latency_ms}
    with Peer() as peer:
        if peer.skipped is None:
            for n in range(args.rounds):
                for latency in args.latency_ms:
                    rounds[latency].append(
                        peer.round(latency, args, f"round {n + 1}/{args.rounds}")
                    )
        return peer.result(args, rounds)


def _installed_version(project: Path, package: str) -> str:
    import json

    manifest = project / "node_modules" / package / "package.json"
    return str(json.loads(manifest.read_text()).get("version", "?"))


def report(found: dict[str, Any]) -> None:
    if "skipped" in found:
        print(f"BullMQ peer skipped: {found['skipped']}")
        return
    print()
    print(
        f"BullMQ {found['versions']['bullmq']} on Node {found['node']}: {found['workers']} "
        f"processes x {found['concurrency']}, {found['jobs']} jobs enqueued first, medians"
    )
    rows = [
        [
            f"{c['latency_ms']} ms",
            f"{c['jobs_per_s']:.0f}",
            f"{c['worker_cpu_us_per_job']:.0f}",
            f"{c['peak_rss_mb']:.0f}",
            f"{c['other_cpu_pct']:.0f}",
        ]
        for c in found["cells"]
    ]
    print_table(
        ["upstream", "jobs/s", "worker CPU µs/job", "peak RSS MB/worker", "other CPU %"], rows
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--latency-ms", type=int, nargs="+", default=[0, 50])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--uv-threads", type=int, default=4, help="UV_THREADPOOL_SIZE (gzip runs there)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    found = measure(args)
    report(found)
    print(f"saved {save_result('peers', {'machine': machine(), 'args': vars(args), **found})}")


if __name__ == "__main__":
    main()
