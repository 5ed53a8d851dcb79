"""`python -m deploy.topology test | up | down`: pods as separate hosts (see __init__.py).

    test   build the topology, run the scenarios under load, audit, tear everything down;
           exit 0 only when every check passed (1 otherwise, and when namespaces cannot be
           made: this never skips)
    up     build it and leave it running; prints the hosts and the run id
    down   tear down a run (`down RUN`), or every run whose owner is gone (`down`)

A `test` run first removes the runs a killed `test` left behind. It tears down what it made
on every way out: success, a failed check, an exception, SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import uvloop

from deploy.topology import audit, netns
from deploy.topology.driver import Load, Service, Tally, session
from deploy.topology.netns import Network, TopologyError
from deploy.topology.pods import API_PORT, CA_PORT, TIMELINE_PORT, Knobs, Pods
from deploy.topology.report import print_report, verdict
from deploy.topology.scenarios import (
    READY_TIMEOUT_S,
    Run,
    ScenarioFailed,
    a_leader,
    cut_api,
    cut_worker,
    kill_leader,
    rolling_restart,
    status,
    until,
    wait_ready,
)
from engine.settings import load_settings
from engine.store.fastredis import FastRedis

HOSTS = {
    "redis": 2,
    "upstream": 3,
    "api1": 11,
    "api2": 12,
    "wrk1": 21,
    "wrk2": 22,
    "load": 100,
}
WARM_UP_S = 3.0
DRAIN_TIMEOUT_S = 120.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.topology", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    test = sub.add_parser("test", help="run the scenarios and tear down")
    test.add_argument("--lease-ttl", type=int, default=3_000, help="SCHEDULER_LEASE_TTL, ms")
    test.add_argument("--cut", type=float, default=10.0, help="seconds each cut lasts")
    test.add_argument("--read-rate", type=float, default=50.0, help="reads per second")
    test.add_argument("--schedule-rate", type=float, default=10.0, help="schedules per second")
    test.add_argument("--json", type=Path, help="also write the result here")
    sub.add_parser("up", help="build the topology and leave it running")
    down = sub.add_parser("down", help="tear down a run, or every run whose owner is gone")
    down.add_argument("run", nargs="?", help="the run id that `up` printed")
    args = parser.parse_args(argv)
    try:
        if args.command == "down":
            return command_down(args.run)
        return command_test(args) if args.command == "test" else command_up()
    except TopologyError as exc:
        print(f"topology: {exc}", file=sys.stderr)
        return 1


def command_down(run_id: str | None) -> int:
    runs = netns.recorded_runs() if run_id else netns.stale_runs()
    chosen = [run for run in runs if run_id in (None, run.get("run"))]
    if run_id and not chosen:
        raise TopologyError(f"no recorded run {run_id} (in {netns.STATE_DIR})")
    worst = 0
    for run in chosen:
        problems = netns.remove_run(run)
        print(f"run {run.get('run')}: {'; '.join(problems) or 'removed'}")
        worst = worst or (1 if problems else 0)
    return worst


def _sweep_stale() -> None:
    for run in netns.stale_runs():
        if run.get("owner") is not None:  # a killed `test`; runs left `up` are left alone
            problems = netns.remove_run(run)
            print(f"removed run {run.get('run')} left by a dead owner {problems or ''}")


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that tears down


def command_test(args: argparse.Namespace) -> int:
    _sweep_stale()
    network = Network(HOSTS)
    run_dir = Path(tempfile.mkdtemp(prefix=f"prefetch-topology-{network.run_id}-"))
    knobs = Knobs(lease_ttl_ms=args.lease_ttl)
    signal.signal(signal.SIGTERM, _on_signal)
    result: dict[str, Any] = {}
    print(f"topology run {network.run_id}: logs in {run_dir}", flush=True)
    try:
        network.create(owner=os.getpid())
        netns.enter(network.hosts["load"].netns)  # the driver is a host of its own
        pods = Pods(network, run_dir, knobs)
        result = uvloop.run(_test(network, pods, knobs, args))
    finally:
        problems = network.teardown()
        left = [ns for ns in network.namespaces() if (netns.NETNS_DIR / ns).exists()]
        print(f"teardown: {'; '.join(problems) or 'every namespace and process removed'}")
    result["teardown"] = {"problems": problems, "namespacesLeft": left}
    ok = bool(result.get("passed")) and not problems and not left
    result["passed"] = ok
    out = run_dir / "result.json"
    text = json.dumps(result, indent=2, default=str)
    out.write_text(text)
    if args.json:
        args.json.write_text(text)
    print(f"verdict: {'PASS' if ok else 'FAIL'} (result in {out})")
    return 0 if ok else 1


async def _bring_up(run: Run) -> None:
    pods = run.pods
    pods.start("redis")
    client = FastRedis(pods.redis_url)
    try:

        async def pings() -> bool:
            try:
                return bool(await client.execute("PING"))
            except Exception:
                return False

        await until(pings, 30, "the Redis host answering", interval=0.1)
    finally:
        await client.close()
    pods.start("upstream")
    upstream = run.network.hosts["upstream"].address

    async def upstreams() -> bool:
        answers = [
            await status(run, f"http://{upstream}:{port}/health", 1.0)
            for port in (TIMELINE_PORT, CA_PORT)
        ]
        return answers == [200, 200]

    await until(upstreams, READY_TIMEOUT_S, "the sandbox upstreams", interval=0.2)
    for name in ("api1", "api2", "wrk1", "wrk2"):
        pods.start(name)
    for name in ("api1", "api2", "wrk1", "wrk2"):
        await wait_ready(run, name)
    token, holder = await a_leader(run)
    run.note(f"every pod ready; {holder} leads (lease {token})")


def _redis(pods: Pods) -> audit.Redis:
    """Connections to the DBs the pods use (their settings' defaults)."""
    dbs = load_settings({"REDIS_URL": pods.redis_url})
    return audit.Redis.open(pods.redis_url, (dbs.db_hot, dbs.db_warm, dbs.db_queue))


async def _test(
    network: Network, pods: Pods, knobs: Knobs, args: argparse.Namespace
) -> dict[str, Any]:
    async with session() as client:
        redis = _redis(pods)
        apis = {
            name: f"http://{network.hosts[name].address}:{API_PORT}" for name in ("api1", "api2")
        }
        service = Service(client, apis)
        probes = asyncio.create_task(service.probe_forever())
        tally = Tally()
        run = Run(network, pods, service, tally, redis, client, knobs)
        stop = asyncio.Event()
        load_task: asyncio.Task[None] | None = None
        try:
            await _bring_up(run)
            load = Load(
                client,
                service,
                tally,
                read_rate=args.read_rate,
                schedule_rate=args.schedule_rate,
                activity_rate=2.0,
            )
            load_task = asyncio.create_task(load.run(stop))
            run.note(f"load starts: {args.read_rate} reads/s, {args.schedule_rate} schedules/s")
            await asyncio.sleep(WARM_UP_S)
            try:
                await rolling_restart(run)
                await kill_leader(run)
                await cut_worker(run, args.cut)
                await cut_api(run, "api1", args.cut)
                run.check("every scenario ran to its end", True)
            except ScenarioFailed as exc:
                run.check("every scenario ran to its end", False, str(exc))
            tally.phase = "steady"
            await asyncio.sleep(WARM_UP_S)
            stop.set()
            await load_task
            run.note("load stopped; waiting for the queue to drain")
            drain_s = await audit.drained(redis.queue, DRAIN_TIMEOUT_S)
            found = {
                "drainS": None if drain_s is None else round(drain_s, 1),
                "jobs": await audit.jobs(
                    redis, tally.accepted, tally.failing, tally.activity_users
                ),
                "leases": await audit.leases(redis.queue),
            }
        finally:
            stop.set()
            probes.cancel()
            if load_task is not None and not load_task.done():
                load_task.cancel()
            await redis.close()
    verdict(run, found)
    print_report(run, found)
    return {
        "run": network.run_id,
        "knobs": {k: v for k, v in vars(args).items() if k not in ("command", "json")}
        | {"leaseTtlMs": knobs.lease_ttl_ms, "tickMs": knobs.tick_ms},
        "figures": run.figures,
        "found": found,
        "reads": dict(tally.reads),
        "readsByPhase": {k: dict(v) for k, v in tally.reads_by_phase.items()},
        "schedules": dict(tally.schedules),
        "schedulesByPhase": {k: dict(v) for k, v in tally.schedules_by_phase.items()},
        "activity": dict(tally.activity),
        "attempts": {k: dict(v) for k, v in tally.attempts.items()},
        "retries": dict(tally.retries),
        "unexpected": tally.unexpected,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in run.checks],
        "events": run.events,
        "passed": all(c.ok for c in run.checks),
        "startedAt": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def command_up() -> int:
    _sweep_stale()
    network = Network(HOSTS)
    run_dir = Path(tempfile.mkdtemp(prefix=f"prefetch-topology-{network.run_id}-"))
    try:
        network.create(owner=os.getpid())
        netns.enter(network.hosts["load"].netns)
        pods = Pods(network, run_dir, Knobs())
        uvloop.run(_up(network, pods))
    except BaseException:
        network.teardown()
        raise
    network.record(owner=None)  # nobody owns it now: `down` removes it
    for host in network.hosts.values():
        print(f"  {host.name:9} {host.address:12} ip netns exec {host.netns} ...")
    print(
        f"run {network.run_id} is up (logs in {run_dir}); "
        f"`python -m deploy.topology down {network.run_id}` removes it"
    )
    return 0


async def _up(network: Network, pods: Pods) -> None:
    async with session() as client:
        apis = {n: f"http://{network.hosts[n].address}:{API_PORT}" for n in ("api1", "api2")}
        service = Service(client, apis)
        probes = asyncio.create_task(service.probe_forever())
        run = Run(network, pods, service, Tally(), _redis(pods), client, pods.knobs)
        try:
            await _bring_up(run)
        finally:
            probes.cancel()
            await run.redis.close()


if __name__ == "__main__":
    sys.exit(main())
