"""The load driver: clients reaching the API pods through something that acts like a Service.

`Service` keeps the endpoints a Kubernetes Service would: it probes every API pod's
`/health/ready` every PROBE_PERIOD_S (timeout PROBE_TIMEOUT_S; one failure takes the pod
out, one success puts it back) and routes each request round-robin over the ready pods that
are not terminating. A pod being stopped is first marked terminating (its endpoint removed,
as the endpoints controller does when a pod is deleted), and gets SIGTERM only after a
preStop pause, so that no new request reaches a process that is closing.

On top of that the client retries once, on another ready pod, what a load balancer retries
(Envoy `retry_on: reset,connect-failure,retriable-status-codes 503`, nginx
`proxy_next_upstream error http_503`): a request that got no answer or a 503. That is safe
for all three requests used here: a read is idempotent, a schedule is deduplicated per user
(a retry of a job that did land gets that job back), an activity report only refreshes
times. Every attempt is counted per pod and status, so a retry never hides what happened.

`Load` runs three paced streams until stopped: reads (`GET /api/cache/{userId}`, a pool of
users plus a few fresh ones: hits and read-throughs), schedules (`POST
/api/prefetch/schedule/{userId}`, fresh users, a few of them users the sandbox answers 404,
which must end in the failed list) and activity reports (`POST /api/activity`, fresh users,
which the strategy leader's ticks must prefetch).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from deploy.topology.pods import SERVICE_TOKEN
from sandbox.timeline import NOT_FOUND_PREFIX

PROBE_PERIOD_S = 0.25
PROBE_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 15.0
NO_ENDPOINT_WAIT_S = 10.0
HEADERS = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
PRIORITIES = ("high", "medium", "medium", "low")
FAILING_SHARE = 0.02
MAX_FAILING = 30  # the failed list keeps the newest 50
READ_POOL = 200
FRESH_READ_SHARE = 0.05
MAX_IN_FLIGHT = 64


class Service:
    """Ready, non-terminating API pods, round-robin (see the module docstring)."""

    def __init__(self, session: aiohttp.ClientSession, pods: dict[str, str]) -> None:
        self._session = session
        self._pods = pods  # name -> base URL
        self.ready: set[str] = set()
        self.terminating: set[str] = set()
        self._passed: dict[str, float] = {}  # pod -> when its last passing probe was sent
        self._turn = itertools.count()
        self.changes: list[tuple[float, str, bool]] = []  # (monotonic, pod, now ready)

    async def probe_forever(self) -> None:
        """Probe every pod each period, concurrently, until cancelled."""
        while True:
            await asyncio.gather(*(self._probe(name) for name in self._pods))
            await asyncio.sleep(PROBE_PERIOD_S)

    async def _probe(self, name: str) -> None:
        sent = time.monotonic()
        try:
            timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
            async with self._session.get(
                self._pods[name] + "/health/ready", timeout=timeout
            ) as rsp:
                ok = rsp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok != (name in self.ready):
            self.changes.append((time.monotonic(), name, ok))
        if ok:
            self.ready.add(name)
            self._passed[name] = sent
        else:
            self.ready.discard(name)
            self._passed.pop(name, None)

    def ready_since(self, name: str, since: float) -> bool:
        """Whether `name` is ready by a probe sent after `since` (a probe in flight when the
        pod was stopped must not vouch for its replacement)."""
        return name in self.ready and self._passed.get(name, float("-inf")) > since

    def drain(self, name: str) -> None:
        """Take `name` out of the endpoints (the pod is being deleted)."""
        self.terminating.add(name)
        self.ready.discard(name)

    def admit(self, name: str) -> None:
        """Let `name` back in once its probe passes (the pod's replacement)."""
        self.terminating.discard(name)

    def endpoints(self, exclude: str | None = None) -> list[str]:
        """Pods a request may go to now (other than `exclude`)."""
        return sorted(self.ready - self.terminating - {exclude})

    async def pick(self, exclude: str | None = None) -> str | None:
        """A ready endpoint (another than `exclude` if there is one); waits for one to be."""
        deadline = time.monotonic() + NO_ENDPOINT_WAIT_S
        while True:
            choices = self.endpoints(exclude) or self.endpoints()
            if choices:
                return choices[next(self._turn) % len(choices)]
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)

    def url(self, name: str, path: str) -> str:
        return self._pods[name] + path


@dataclass
class Tally:
    """What the clients saw, in all and per phase of the run."""

    phase: str = "warm-up"
    reads: Counter[str] = field(default_factory=Counter)  # final answer of each read
    reads_by_phase: dict[str, Counter[str]] = field(default_factory=dict)
    # Every attempt, per phase: "<request> <pod> <status>".
    attempts: dict[str, Counter[str]] = field(default_factory=dict)
    retries: Counter[str] = field(default_factory=Counter)
    schedules: Counter[str] = field(default_factory=Counter)
    schedules_by_phase: dict[str, Counter[str]] = field(default_factory=dict)
    accepted: dict[str, str] = field(default_factory=dict)  # user -> priority
    failing: set[str] = field(default_factory=set)  # accepted users the sandbox answers 404
    activity: Counter[str] = field(default_factory=Counter)
    activity_users: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)

    def note(self, what: str, status: str) -> None:
        if what == "read":
            self.reads[status] += 1
            self.reads_by_phase.setdefault(self.phase, Counter())[status] += 1
        elif what == "schedule":
            self.schedules[status] += 1
            self.schedules_by_phase.setdefault(self.phase, Counter())[status] += 1
        else:
            self.activity[status] += 1

    def oddity(self, text: str) -> None:
        if len(self.unexpected) < 30:
            self.unexpected.append(f"[{self.phase}] {text}")


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes


class Load:
    """The three paced request streams (see the module docstring)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        service: Service,
        tally: Tally,
        *,
        read_rate: float,
        schedule_rate: float,
        activity_rate: float,
    ) -> None:
        self._session = session
        self._service = service
        self.tally = tally
        self._rates = (read_rate, schedule_rate, activity_rate)
        self._rng = random.Random(7)
        self._pool = [str(uuid.uuid4()) for _ in range(READ_POOL)]
        self._failing = 0
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def run(self, stop: asyncio.Event) -> None:
        """Run every stream until `stop` is set, then wait for the requests in flight."""
        read_rate, schedule_rate, activity_rate = self._rates
        await asyncio.gather(
            self._paced(read_rate, self._read, stop),
            self._paced(schedule_rate, self._schedule, stop),
            self._paced(activity_rate, self._activity, stop),
        )

    async def _paced(
        self, rate: float, one: Callable[[], Awaitable[None]], stop: asyncio.Event
    ) -> None:
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()
        next_at = loop.time()
        while not stop.is_set():
            await self._slots.acquire()
            task = asyncio.create_task(self._bounded(one))
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at = max(next_at + 1 / rate, loop.time() - 1.0)  # no burst after a stall
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))
            except TimeoutError:
                pass
        if pending:
            await asyncio.wait(pending)

    async def _bounded(self, one: Callable[[], Awaitable[None]]) -> None:
        try:
            await one()
        finally:
            self._slots.release()

    async def _read(self) -> None:
        rng = self._rng
        user = str(uuid.uuid4()) if rng.random() < FRESH_READ_SHARE else rng.choice(self._pool)
        answer = await self._call("read", "GET", f"/api/cache/{user}")
        if answer is not None and answer.status != 200:
            self.tally.oddity(f"read {answer.status}: {answer.body[:160]!r}")

    async def _schedule(self) -> None:
        rng = self._rng
        user = str(uuid.uuid4())
        if self._failing < MAX_FAILING and rng.random() < FAILING_SHARE:
            self._failing += 1
            user = NOT_FOUND_PREFIX + user[len(NOT_FOUND_PREFIX) :]
        priority = rng.choice(PRIORITIES)
        answer = await self._call(
            "schedule", "POST", f"/api/prefetch/schedule/{user}", {"priority": priority}
        )
        if answer is not None and answer.status == 202:
            self.tally.accepted[user] = priority
            if user.startswith(NOT_FOUND_PREFIX):
                self.tally.failing.add(user)
        elif answer is not None:
            self.tally.oddity(f"schedule {answer.status}: {answer.body[:160]!r}")

    async def _activity(self) -> None:
        users = [str(uuid.uuid4()) for _ in range(4)]
        answer = await self._call("activity", "POST", "/api/activity", {"userIds": users})
        if answer is not None and answer.status == 202:
            self.tally.activity_users.update(users)
        elif answer is not None:
            self.tally.oddity(f"activity {answer.status}: {answer.body[:160]!r}")

    async def _call(
        self, what: str, method: str, path: str, body: dict[str, Any] | None = None
    ) -> Answer | None:
        """One request, retried once on another pod after no answer or a 503."""
        tried: str | None = None
        answer: Answer | None = None
        status = "no-endpoint"
        for attempt in range(2):
            pod = await self._service.pick(exclude=tried)
            if pod is None:
                status = "no-endpoint"
                break
            if attempt:
                self.tally.retries[what] += 1
            tried = pod
            try:
                async with self._session.request(
                    method, self._service.url(pod, path), json=body, headers=HEADERS
                ) as rsp:
                    answer = Answer(rsp.status, await rsp.read())
                status = str(answer.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                answer, status = None, type(exc).__name__
            self.tally.attempts.setdefault(self.tally.phase, Counter())[
                f"{what} {pod} {status}"
            ] += 1
            if answer is not None and answer.status != 503:
                break
        self.tally.note(what, status)
        if answer is None:
            self.tally.oddity(f"{what} {path}: {status}")
        return answer


def session(limit: int = MAX_IN_FLIGHT + 16) -> aiohttp.ClientSession:
    """The driver's one client session."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
    )
