"""`prefetch worker`: fork N worker processes, keep them alive, stop them cleanly.

The supervisor opens nothing before forking. A child that dies is replaced within a second
(with backoff when it keeps dying at start), and the messages it had taken are handed back
to the queue at once instead of after Dramatiq's heartbeat timeout. SIGTERM/SIGINT are
forwarded so children drain; a second signal kills them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from types import FrameType

import redis

from engine.broker.jobs import QUEUES
from engine.health_port import HealthPort, Pulse
from engine.process import fork_child, set_title
from engine.settings import Settings
from engine.store import keys
from engine.store.fastredis import Script

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_CHILD_CRASHED = 3
EXIT_KILLED = 4

# A child that exits sooner than this after starting counts as crash-looping.
CRASH_WINDOW_S = 5.0
MAX_RESTART_DELAY_S = 30.0

_RECOVER = Script.load(__file__, "recover_acks.lua")


@dataclass(slots=True)
class Child:
    index: int
    broker_id: str
    started: float
    crashes: int = 0


class Supervisor:
    """Owns the worker children of one pod."""

    def __init__(self, settings: Settings, count: int | None = None) -> None:
        self.settings = settings
        self.count = count or settings.worker_count
        self.children: dict[int, Child] = {}
        self.restarts: dict[int, float] = {}  # index -> when to respawn
        self.crashes: dict[int, int] = {}
        self.stopping = 0
        self.generation = 0
        self.pid = os.getpid()
        self.pulse = Pulse()  # read by the health port's thread

    def run(self) -> int:
        set_title("prefetch: supervisor")
        self.pid = os.getpid()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for index in range(1, self.count + 1):
            self._spawn(index)
        log.info("supervisor %d: %d workers", os.getpid(), self.count)
        while self.children or (self.restarts and not self.stopping):
            self.pulse.beat(len(self.children))
            self._reap()
            now = time.monotonic()
            for index, when in list(self.restarts.items()):
                if not self.stopping and now >= when:
                    del self.restarts[index]
                    self._spawn(index)
            time.sleep(0.05)
        log.info("supervisor %d: all workers stopped", os.getpid())
        return EXIT_KILLED if self.stopping > 1 else EXIT_OK

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.pid:
            # A child between fork and installing its own handlers: it has nothing to drain.
            os._exit(EXIT_OK)
        self.stopping += 1
        sig = signal.SIGTERM if self.stopping == 1 else signal.SIGKILL
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _spawn(self, index: int) -> None:
        self.generation += 1
        broker_id = f"{socket.gethostname()}:{os.getpid()}:{index}:{self.generation}"
        pid = fork_child(f"worker {index}", lambda: _worker_main(self.settings, index, broker_id))
        self.children[pid] = Child(index, broker_id, time.monotonic())
        if self.stopping:
            # The signal came during the fork, before this child was known to _on_signal.
            os.kill(pid, signal.SIGTERM if self.stopping == 1 else signal.SIGKILL)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            self._recover(child)
            if self.stopping:
                log.info("worker %d (pid %d) exited %d", child.index, pid, code)
                continue
            lived = time.monotonic() - child.started
            crashes = self.crashes.get(child.index, 0) + 1 if lived < CRASH_WINDOW_S else 0
            self.crashes[child.index] = crashes
            delay = 0.0 if crashes == 0 else min(MAX_RESTART_DELAY_S, 0.5 * 2 ** (crashes - 1))
            log.warning(
                "worker %d (pid %d) died with %d after %.1fs; restarting in %.1fs",
                child.index,
                pid,
                code,
                lived,
                delay,
            )
            self.restarts[child.index] = time.monotonic() + delay

    def _recover(self, child: Child) -> None:
        """Hand the dead child's taken-but-unacked messages back to their queues."""
        queues = [q for name in QUEUES.values() for q in (name, f"{name}.DQ")]
        try:
            client = redis.Redis.from_url(
                self.settings.redis_url,
                db=self.settings.db_queue,
                socket_connect_timeout=2,  # an unreachable host must not stall restarts
                socket_timeout=2,
            )
            try:
                moved = client.eval(
                    _RECOVER.source, 1, keys.QUEUE_NAMESPACE, child.broker_id, *queues
                )
            finally:
                client.close()
        except Exception as exc:
            # Redis down (Dramatiq's heartbeat maintenance moves them once it is back), or a
            # REDIS_URL that redis-py refuses (ValueError): either way the supervisor, which
            # keeps the other children alive, must not die of it.
            log.warning("could not requeue worker %d's messages now: %r", child.index, exc)
            return
        if moved:
            log.info("requeued %d messages of worker %d", moved, child.index)


def _worker_main(settings: Settings, index: int, broker_id: str) -> int:
    from engine.broker.worker import run_worker  # imported after fork: nothing of it in the parent

    return run_worker(settings, index, broker_id)


def run_supervisor(settings: Settings) -> int:
    """Entry point of `prefetch worker`: the supervisor, and its health port when configured."""
    supervisor = Supervisor(settings)
    with HealthPort(settings, supervisor.pulse):
        return supervisor.run()
