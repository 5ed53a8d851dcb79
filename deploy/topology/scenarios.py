"""The scenarios, run one after the other under load, each measuring and checking itself.

1. `rolling_restart`: every pod in turn is stopped as Kubernetes stops a pod (an API pod
   leaves the Service's endpoints, a preStop pause, SIGTERM; a worker pod gets SIGTERM),
   started again and waited for until ready.
2. `kill_leader`: the strategy leader's worker pod is SIGKILLed, every process of it at
   once; the other worker pod must hold the lease within one lease TTL.
3. `cut_worker`: the leader's worker pod loses Redis (its packets to and from the Redis host
   dropped). Its `/ready` must turn 503, the other pod must take the lease, and when the
   link is back the cut pod must stay a follower: no tick of its own counted after the cut.
4. `cut_api`: an API pod loses Redis: `/health/ready` 503, `/health/live` 200 throughout,
   the Service stops routing to it, the reads go on.

The load (driver.Load) runs through all of them; the final verdict on jobs and on the
leases' enqueues is in audit.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from deploy.topology.audit import Redis, redis_time_ms
from deploy.topology.driver import Service, Tally
from deploy.topology.netns import Network
from deploy.topology.pods import Knobs, Pods
from engine.store import keys

PRESTOP_S = 1.0  # the preStop pause of deploy/k8s (5 s there), shortened for a test run
SETTLE_S = 2.0  # steady load between two disruptions
READY_TIMEOUT_S = 90.0  # a loaded two-core box starts Python slowly
STOP_TIMEOUT_S = 45.0  # terminationGracePeriodSeconds of deploy/k8s
POLL_S = 0.05
# A follower wakes when the held lease lapses; this covers its wake-up and one round trip on
# a loaded machine. Handover is checked against the lease TTL plus this.
HANDOVER_SLACK_MS = 500


class ScenarioFailed(Exception):
    """A step could not complete (a pod never became ready, no leader appeared)."""


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Run:
    """Everything a scenario needs, and what the scenarios found."""

    network: Network
    pods: Pods
    service: Service
    tally: Tally
    redis: Redis
    session: aiohttp.ClientSession
    knobs: Knobs
    started: float = field(default_factory=time.monotonic)
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        line = f"{time.monotonic() - self.started:7.1f}s  {text}"
        self.events.append(line)
        print(line, flush=True)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, detail))
        if not ok:
            self.note(f"! check failed: {name}: {detail}")
        return ok


async def until(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = POLL_S
) -> float:
    """Seconds until `condition` holds; ScenarioFailed if it does not within `timeout`."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > timeout:
            raise ScenarioFailed(f"{what}: not within {timeout:.0f}s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def status(run: Run, url: str, timeout: float) -> int | None:
    """The HTTP status of a GET, or None when there was no answer."""
    try:
        async with run.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as rsp:
            await rsp.read()
            return rsp.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def leader(run: Run) -> tuple[int, str] | None:
    """The lease's (token, pod name) now; the pod is the scheduler's hostname."""
    value = await run.redis.queue.execute("GET", keys.SCHEDULER_LEASE)
    if value is None:
        return None
    token, _, identity = value.decode().partition(":")
    return int(token), identity.partition(":")[0]


async def ticks_of(run: Run, pod: str) -> int:
    """Ticks counted for `pod`'s schedulers (all its identities)."""
    ticks = await run.redis.queue.execute("HGETALL", keys.SCHEDULER_TICKS)
    return sum(
        int(ticks[i + 1])
        for i in range(0, len(ticks), 2)
        if ticks[i].decode().startswith(f"{pod}:")
    )


async def completed(run: Run) -> int:
    """Jobs completed so far, by every worker (the lifetime counter)."""
    return int(await run.redis.queue.execute("GET", keys.JOBS_COMPLETED) or 0)


async def wait_ready(run: Run, name: str) -> float:
    """Seconds until `name` is ready (an API pod: by a Service probe sent from now on)."""
    pod = run.pods[name]
    since = time.monotonic()
    if pod.role == "api":

        async def in_service() -> bool:
            return run.service.ready_since(name, since)

        return await until(in_service, READY_TIMEOUT_S, f"{name} ready")

    async def answers_ready() -> bool:
        return await status(run, pod.url("/ready"), 2.0) == 200

    return await until(answers_ready, READY_TIMEOUT_S, f"{name} ready")


async def a_leader(run: Run) -> tuple[int, str]:
    found: tuple[int, str] | None = None

    async def leads() -> bool:
        nonlocal found
        found = await leader(run)
        return found is not None

    await until(leads, READY_TIMEOUT_S, "a scheduler leader")
    assert found is not None
    return found


async def new_leader(run: Run, old_token: int, timeout: float) -> tuple[float, tuple[int, str]]:
    """Seconds until a lease other than `old_token` is held, and who holds it."""
    found: tuple[int, str] | None = None

    async def moved() -> bool:
        nonlocal found
        found = await leader(run)
        return found is not None and found[0] != old_token

    took = await until(moved, timeout, "a new leader", interval=0.02)
    assert found is not None
    return took, found


# --- 1. rolling restart ---------------------------------------------------------------------


async def rolling_restart(run: Run) -> None:
    run.tally.phase = "rolling restart"
    restarts: list[dict[str, Any]] = []
    for name in ("api1", "api2", "wrk1", "wrk2"):
        pod = run.pods[name]
        entry: dict[str, Any] = {"pod": name}
        was_leader = await leader(run)
        if pod.role == "api":
            run.service.drain(name)
            await asyncio.sleep(PRESTOP_S)  # the preStop pause: in-flight requests finish
        run.note(f"SIGTERM {name} (pid {pod.pid})")
        started = time.monotonic()
        code = await asyncio.to_thread(run.pods.stop, name, STOP_TIMEOUT_S)
        entry["stopS"] = round(time.monotonic() - started, 2)
        entry["exit"] = code
        run.check(f"{name} exits 0 on SIGTERM", code == 0, f"exit {code}")
        if was_leader is not None and was_leader[1] == name:
            # A clean stop releases the lease: the other pod's next poll takes it.
            took, now = await new_leader(run, was_leader[0], 3 * run.knobs.lease_ttl_ms / 1000)
            entry["leaseHandoverAfterSigtermMs"] = round((took + entry["stopS"]) * 1000)
            entry["newLeader"] = now[1]
        run.pods.start(name)
        entry["readyS"] = round(await wait_ready(run, name), 2)
        if pod.role == "api":
            run.service.admit(name)
        run.note(f"{name} back and ready in {entry['readyS']}s")
        restarts.append(entry)
        await asyncio.sleep(SETTLE_S)
    run.figures["rollingRestart"] = restarts


# --- 2. the leader's pod killed -------------------------------------------------------------


async def kill_leader(run: Run) -> None:
    run.tally.phase = "leader killed"
    ttl_ms = run.knobs.lease_ttl_ms
    token, name = await a_leader(run)
    left_ms = int(await run.redis.queue.execute("PTTL", keys.SCHEDULER_LEASE))
    killed_at = time.monotonic()
    pids = await asyncio.to_thread(run.pods.kill, name)
    run.note(f"SIGKILL every process of {name}, the leader ({len(pids)} processes)")
    _, (_, successor) = await new_leader(run, token, 3 * ttl_ms / 1000 + 10)
    handover_ms = round((time.monotonic() - killed_at) * 1000)
    figures = {
        "killed": name,
        "processes": len(pids),
        "leaseLeftAtKillMs": left_ms,
        "handoverMs": handover_ms,
        "afterLapseMs": handover_ms - left_ms,
        "newLeader": successor,
        "leaseTtlMs": ttl_ms,
    }
    run.note(f"{successor} leads {handover_ms} ms after the kill (lease had {left_ms} ms left)")
    run.check("the other worker pod takes the lease", successor != name, successor)
    run.check(
        "leadership moves within one lease TTL",
        handover_ms <= ttl_ms + HANDOVER_SLACK_MS,
        f"{handover_ms} ms, TTL {ttl_ms} ms (+{HANDOVER_SLACK_MS} ms slack)",
    )
    run.check(
        "the lease is not taken before it lapses",
        handover_ms >= left_ms - 100,
        f"taken {handover_ms - left_ms} ms after the lapse",
    )
    await asyncio.sleep(SETTLE_S)
    run.pods.start(name)
    figures["restartReadyS"] = round(await wait_ready(run, name), 2)
    run.figures["leaderKilled"] = figures


# --- 3. a worker pod cut off from Redis -----------------------------------------------------


async def _first_status(run: Run, url: str, wanted: int, timeout: float) -> float:
    async def answered() -> bool:
        return await status(run, url, 3.0) == wanted

    return await until(answered, timeout, f"{url} answering {wanted}", interval=0.1)


async def cut_worker(run: Run, cut_s: float) -> None:
    run.tally.phase = "worker cut"
    ttl_ms = run.knobs.lease_ttl_ms
    token, name = await a_leader(run)
    pod = run.pods[name]
    cut_at_ms = await redis_time_ms(run.redis.queue)
    done_at_cut = await completed(run)
    cut_at = time.monotonic()
    await asyncio.to_thread(run.network.cut, name, "redis")
    run.note(f"{name} (the leader) cut off from Redis")
    unready = asyncio.create_task(_first_status(run, pod.url("/ready"), 503, 30))
    took, (_, successor) = await new_leader(run, token, 3 * ttl_ms / 1000 + 10)
    handover_ms = round(took * 1000)
    moved_at_ms = await redis_time_ms(run.redis.queue)
    unready_ms = round(await unready * 1000)
    run.note(f"{name} /ready 503 after {unready_ms} ms; {successor} leads after {handover_ms} ms")
    # From here on the cut pod's lease is gone: no report (tick) of it may be accepted, not
    # even one sent before the cut and delivered when the link is back.
    ticks_at_cut = await ticks_of(run, name)
    await asyncio.sleep(max(0.0, cut_at + cut_s - time.monotonic()))
    ticks_before_restore = await ticks_of(run, name)
    done_while_cut = await completed(run) - done_at_cut
    await asyncio.to_thread(run.network.restore, name, "redis")
    restored_at = time.monotonic()
    run.note(f"{name} reconnected")
    ready_again_ms = round(await _first_status(run, pod.url("/ready"), 200, 60) * 1000)

    async def stays_follower() -> bool:
        now = await leader(run)
        return now is not None and now[1] == successor

    # Rejoined as a follower: for two lease TTLs the successor keeps the lease.
    held = time.monotonic()
    while time.monotonic() - held < 2 * ttl_ms / 1000:
        if not await stays_follower():
            run.check(f"{name} rejoins as a follower", False, f"lease now {await leader(run)}")
            break
        await asyncio.sleep(0.1)
    else:
        run.check(f"{name} rejoins as a follower", True)
    ticks_after = await ticks_of(run, name)
    log = pod.log.read_text(errors="replace")
    run.figures["workerCut"] = {
        "pod": name,
        "wasLeader": True,
        "cutAtRedisMs": cut_at_ms,
        "leaseMovedAtRedisMs": moved_at_ms,
        "cutS": round(restored_at - cut_at, 1),
        "unreadyAfterMs": unready_ms,
        "handoverMs": handover_ms,
        "newLeader": successor,
        "readyAgainAfterMs": ready_again_ms,
        "jobsCompletedWhileCut": done_while_cut,
        "cutPodTicks": {"atCut": ticks_at_cut, "atRestore": ticks_before_restore},
        "cutPodTicksAfterRejoin": ticks_after,
        "leaseTokenCut": token,
        # Ticks of the cut pod that reached Redis after the lease moved and were refused.
        "fencedInItsLog": log.count("an enqueue was fenced"),
    }
    run.check(f"{name} /ready answers 503 while cut", True, f"after {unready_ms} ms")
    run.check("the other worker pod takes the lease", successor != name, successor)
    run.check(
        "jobs complete while a worker pod is cut off", done_while_cut > 0, str(done_while_cut)
    )
    run.check(
        "leadership moves within one lease TTL of the cut",
        handover_ms <= ttl_ms + HANDOVER_SLACK_MS,
        f"{handover_ms} ms",
    )
    run.check(
        f"{name} runs no tick once cut and rejoined",
        ticks_after == ticks_before_restore == ticks_at_cut,
        f"ticks at cut {ticks_at_cut}, at restore {ticks_before_restore}, after {ticks_after}",
    )


# --- 4. an API pod cut off from Redis -------------------------------------------------------


async def cut_api(run: Run, name: str, cut_s: float) -> None:
    run.tally.phase = "api cut"
    pod = run.pods[name]
    live: Counter[str] = Counter()
    stop = asyncio.Event()

    async def watch_live() -> None:
        while not stop.is_set():
            live[str(await status(run, pod.url("/health/live"), 2.0))] += 1
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch_live())
    done_at_cut = await completed(run)
    cut_at = time.monotonic()
    await asyncio.to_thread(run.network.cut, name, "redis")
    run.note(f"{name} cut off from Redis")

    async def out_of_service() -> bool:
        return name not in run.service.ready

    removed = asyncio.create_task(until(out_of_service, 30, f"{name} out of the Service"))
    unready_ms = round(await _first_status(run, pod.url("/health/ready"), 503, 30) * 1000)
    out_ms = round(await removed * 1000)
    run.note(
        f"{name} /health/ready 503 after {unready_ms} ms, out of the Service after {out_ms} ms"
    )
    await asyncio.sleep(max(0.0, cut_at + cut_s - time.monotonic()))
    done_while_cut = await completed(run) - done_at_cut
    await asyncio.to_thread(run.network.restore, name, "redis")
    back_ms = round(await wait_ready(run, name) * 1000)
    stop.set()
    await watcher
    run.figures["apiCut"] = {
        "pod": name,
        "unreadyAfterMs": unready_ms,
        "outOfServiceAfterMs": out_ms,
        "readyAgainAfterMs": back_ms,
        "liveStatuses": dict(live),
        "jobsCompletedWhileCut": done_while_cut,
    }
    run.check(f"{name} /health/ready answers 503 while cut", True, f"after {unready_ms} ms")
    run.check("jobs complete while an API pod is cut off", done_while_cut > 0, str(done_while_cut))
    run.check(
        f"{name} /health/live stays 200 while cut",
        set(live) == {"200"},
        str(dict(live)),
    )
