"""Leadership of the strategy scheduler: one Redis lease per deployment, fenced enqueues.

The lease is `SET NX PX` (in acquire.lua, under a fencing token from a counter that only
grows), renewed by compare-and-extend every third of its TTL and released by
compare-and-delete. A follower polls every quarter TTL, and wakes when the held lease is due
to lapse: a dead leader is replaced within a round trip of its lease lapsing, so within one
TTL of its last renewal. Its value, `<token>:<identity>`, is the fence of every enqueue the leader
makes (engine.broker.jobs.Fence, checked inside the enqueue script): a leader that was
paused (SIGSTOP, a long GC, a partition) past its TTL and wakes after another took over
cannot enqueue, even if it still believes it leads. Locally, a leader stops believing it
leads one TTL after the last renewal it sent, whatever Redis says, so it also stops ticking.

The lease lives in the queue DB, beside the queues, because the fence is checked there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.broker.jobs import Fence
from engine.store import keys
from engine.store.client import RedisClient
from engine.store.fastredis import Script

log = logging.getLogger(__name__)

_ACQUIRE = Script.load(__file__, "lease_acquire.lua")
_RENEW = Script.load(__file__, "lease_renew.lua")
_RELEASE = Script.load(__file__, "lease_release.lua")
_REPORT = Script.load(__file__, "report.lua")
# A follower wakes this long after the held lease was due to lapse (timer granularity).
LAPSE_MARGIN_S = 0.01


def default_identity() -> str:
    """`<host>:<pid>` of this process: who leads, as /health shows it."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Lease:
    """One contender for the scheduler lease; `keep()` runs its acquire/renew loop."""

    def __init__(
        self,
        redis: RedisClient,
        ttl_ms: int,
        identity: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self.ttl_ms = ttl_ms
        self.identity = identity or default_identity()
        self._monotonic = monotonic
        self._value: str | None = None
        self._valid_until = 0.0
        self._held_for_s: float | None = None  # what the held lease had left at the last try

    @property
    def leading(self) -> bool:
        """Whether this contender holds the lease, as far as it can know without asking."""
        return self._value is not None and self._monotonic() < self._valid_until

    @property
    def value(self) -> str | None:
        """The lease value while leading: `<fencing token>:<identity>`."""
        return self._value if self.leading else None

    def fence(self) -> Fence | None:
        """The fence for enqueues made under this lease, or None when not leading."""
        value = self.value
        return Fence(keys.SCHEDULER_LEASE, value) if value is not None else None

    async def acquire(self) -> bool:
        """Take the lease if it is free; True when this contender now leads."""
        sent = self._monotonic()
        self._held_for_s = None
        value = await self._redis.evalsha_or_eval(
            _ACQUIRE, [keys.SCHEDULER_LEASE, keys.SCHEDULER_TOKENS], [self.identity, self.ttl_ms]
        )
        if isinstance(value, int):  # held by another: the ms it has left
            self._held_for_s = value / 1000 if value >= 0 else None
            return False
        self._value = value.decode()
        self._valid_until = sent + self.ttl_ms / 1000
        log.info("scheduler lease taken: %s", self._value)
        return True

    async def renew(self) -> bool:
        """Extend the lease if it is still ours; on False this contender no longer leads."""
        if self._value is None:
            return False
        sent = self._monotonic()
        kept = await self._redis.evalsha_or_eval(
            _RENEW, [keys.SCHEDULER_LEASE], [self._value, self.ttl_ms]
        )
        if kept == 1:
            self._valid_until = sent + self.ttl_ms / 1000
            return True
        log.warning("scheduler lease %s lost (another leader took over)", self._value)
        self._value = None
        return False

    async def release(self) -> None:
        """Give the lease up (clean shutdown), so a successor need not wait out the TTL."""
        value, self._value = self._value, None
        if value is not None:
            await self._redis.evalsha_or_eval(_RELEASE, [keys.SCHEDULER_LEASE], [value])

    def lost(self) -> None:
        """Stop leading at once (an enqueue was fenced: someone else holds the lease)."""
        if self._value is not None:
            log.warning("scheduler lease %s lost: an enqueue was fenced", self._value)
        self._value = None

    async def report(self, fields: dict[str, int]) -> bool:
        """Publish a tick's report, fenced like the enqueues; False if no longer leading."""
        value = self.value
        if value is None:
            return False
        flat: list[str | int] = [value, self.identity, "leader", self.identity]
        for name, number in fields.items():
            flat += (name, number)
        written = await self._redis.evalsha_or_eval(
            _REPORT,
            [keys.SCHEDULER_LEASE, keys.SCHEDULER_STATUS, keys.SCHEDULER_TICKS],
            flat,
        )
        return bool(written == 1)

    async def step(self) -> float:
        """One acquire or renew; returns the seconds to wait before the next step."""
        ttl_s = self.ttl_ms / 1000
        try:
            if self._value is not None:
                await self.renew()
            else:
                await self.acquire()
        except Exception as exc:  # Redis away: `leading` lapses on its own after the TTL
            log.warning("scheduler lease: %r", exc)
            if not self.leading:
                self._value = None
        # Renew thrice per TTL. Poll a held lease four times per TTL, and right after it is
        # due to lapse: a dead leader's successor takes over within one TTL of the last renewal.
        if self._value is not None:
            return ttl_s / 3
        if self._held_for_s is not None:
            return min(ttl_s / 4, self._held_for_s + LAPSE_MARGIN_S)
        return ttl_s / 4

    async def keep(self, stop: asyncio.Event) -> None:
        """Acquire and renew until `stop` is set, then release."""
        try:
            while not stop.is_set():
                delay = await self.step()
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
        finally:
            try:
                await self.release()
            except Exception as exc:
                log.warning("scheduler lease not released: %r", exc)


@dataclass(frozen=True, slots=True)
class FencedEnqueue:
    """One enqueue made under a leader's fence (keys.FENCED_ENQUEUES)."""

    token: int
    identity: str
    at_ms: int  # Redis's clock


async def fenced_enqueues(queue: RedisClient) -> list[FencedEnqueue]:
    """The logged fenced enqueues (the newest FENCED_ENQUEUES_KEEP), oldest first."""
    found: list[FencedEnqueue] = []
    for raw in reversed(await queue.execute("LRANGE", keys.FENCED_ENQUEUES, 0, -1)):
        lease, _, at = raw.decode().rpartition(" ")
        token, _, identity = lease.partition(":")
        found.append(FencedEnqueue(int(token), identity, int(at)))
    return found


async def leader_status(queue: RedisClient) -> dict[str, Any]:
    """Who leads (from the lease) and the last tick's report, for /health and the stats."""
    lease, ttl, status = await queue.pipeline(
        [
            ("GET", keys.SCHEDULER_LEASE),
            ("PTTL", keys.SCHEDULER_LEASE),
            ("HGETALL", keys.SCHEDULER_STATUS),
        ]
    )
    for reply in (lease, ttl, status):
        if isinstance(reply, Exception):
            raise reply
    out: dict[str, Any] = {"leader": None, "token": None, "leaseExpiresIn": None}
    if lease is not None:
        token, _, identity = lease.decode().partition(":")
        out.update(leader=identity, token=int(token), leaseExpiresIn=max(0, int(ttl)))
    report = {status[i].decode(): status[i + 1].decode() for i in range(0, len(status), 2)}
    last: dict[str, Any] | None = None
    if report:
        last = {name: _number(value) for name, value in report.items()}
        last["ageMs"] = max(0, int(time.time() * 1000) - int(report.get("at", "0")))
    out["lastTick"] = last
    return out


def _number(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        return value
