"""`prefetch worker`: fork N worker processes, keep them alive, stop them cleanly.

The supervisor opens nothing before forking. A child that dies is replaced within a second
(with backoff when it keeps dying at start), and the messages it had taken are handed back
to the queue at once instead of after Dramatiq's heartbeat timeout. That hand-back runs in a
thread of its own and is retried until Redis answers, so an unreachable Redis never delays a
restart. SIGTERM/SIGINT are forwarded so children drain; a second signal kills them.
"""

from __future__ import annotations

# The recovery thread below runs while the main thread forks replacement workers, and a
# module that a thread is importing at the moment of a fork stays half-imported in the child
# for good (a replacement worker once failed every connection with "unknown encoding:
# idna"). So what redis-py imports lazily on its first connection is imported here, before
# any fork; tests/test_engine_supervisor.py checks that a hand-back imports nothing more.
import encodings.idna  # noqa: F401
import hmac  # noqa: F401
import logging
import os
import queue
import secrets  # noqa: F401
import signal
import socket
import threading
import time
from dataclasses import dataclass
from types import FrameType

import redis
from prometheus_client import multiprocess

from engine.broker import dramatiq_layout as layout
from engine.broker.jobs import QUEUES
from engine.health_port import HealthPort, Pulse
from engine.process import fork_child, set_title
from engine.settings import Settings
from engine.store import keys
from engine.strategies.sidecar import SchedulerChild

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_CHILD_CRASHED = 3
EXIT_KILLED = 4

# A child that exits sooner than this after starting counts as crash-looping.
CRASH_WINDOW_S = 5.0
MAX_RESTART_DELAY_S = 30.0

# Hand-backs retry at this pace while Redis does not answer; at shutdown the supervisor waits
# this long for the last ones (Dramatiq's heartbeat maintenance does the rest, later).
RECOVER_RETRY_S = (0.5, 5.0)
RECOVER_AT_EXIT_S = 10.0


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
        self.recovery = Recovery(settings)
        self.scheduler = SchedulerChild(settings)  # strategies hook: the pod's scheduler
        self.pulse = Pulse()  # read by the health port's thread

    def run(self) -> int:
        set_title("prefetch: supervisor")
        self.pid = os.getpid()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for index in range(1, self.count + 1):
            self._spawn(index)
        self.scheduler.start()  # strategies hook
        if self.stopping:  # strategies hook: a signal during its fork
            self.scheduler.signal(signal.SIGTERM)
        log.info("supervisor %d: %d workers", os.getpid(), self.count)
        while self.children or self.scheduler.running or (self.restarts and not self.stopping):
            self.pulse.beat(len(self.children))
            self._reap()
            self.scheduler.poll(bool(self.stopping))  # strategies hook
            now = time.monotonic()
            for index, when in list(self.restarts.items()):
                if not self.stopping and now >= when:
                    del self.restarts[index]
                    self._spawn(index)
            time.sleep(0.05)
        if not self.recovery.wait_idle(RECOVER_AT_EXIT_S):
            log.warning("some stopped workers' messages were not handed back yet")
        log.info("supervisor %d: all workers stopped", os.getpid())
        return EXIT_KILLED if self.stopping > 1 else EXIT_OK

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.pid:
            # A child between fork and installing its own handlers: it has nothing to drain.
            os._exit(EXIT_OK)
        self.stopping += 1
        sig = signal.SIGTERM if self.stopping == 1 else signal.SIGKILL
        self.scheduler.signal(sig)  # strategies hook
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
        while self.children or self.scheduler.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                self.scheduler.pid = None
                return
            if pid == 0:
                return
            self._mark_dead(pid)
            child = self.children.pop(pid, None)
            if child is None:
                code = os.waitstatus_to_exitcode(status)
                self.scheduler.reaped(pid, code, bool(self.stopping))  # strategies hook
                continue
            code = os.waitstatus_to_exitcode(status)
            self.recovery.submit(child.index, child.broker_id)
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

    def _mark_dead(self, pid: int) -> None:
        """A reaped child's live gauges (jobs in flight) leave the pod's sums."""
        if self.settings.metrics_dir:
            try:
                multiprocess.mark_process_dead(pid, self.settings.metrics_dir)  # type: ignore[no-untyped-call]
            except OSError as exc:  # a full or vanished directory must not stop the supervisor
                log.warning("could not mark pid %d dead in the metrics directory: %r", pid, exc)


class Recovery:
    """Hands dead children's taken-but-unacked messages back to their queues, in a thread.

    On RabbitMQ the broker does that itself when the child's connections close; what is left
    is the child's gauge of held messages (engine/broker/rabbit_settle.py), removed here.

    Started on the first hand-back (after the forks: no thread is ever forked). A hand-back
    that fails (Redis down, or refusing writes) is retried with backoff until it succeeds.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._todo: queue.Queue[tuple[int, str]] = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, index: int, broker_id: str) -> None:
        self._todo.put((index, broker_id))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="recovery", daemon=True)
            self._thread.start()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every submitted hand-back is done; False if that took over `timeout`."""
        deadline = time.monotonic() + timeout
        while self._todo.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _run(self) -> None:
        client: redis.Redis | None = None
        while True:
            index, broker_id = self._todo.get()
            pause = RECOVER_RETRY_S[0]
            while True:
                try:
                    if client is None:
                        client = redis.Redis.from_url(
                            self._settings.queue_redis_url,
                            db=self._settings.db_queue,
                            socket_connect_timeout=2,
                            socket_timeout=5,
                        )
                    if self._settings.broker_kind == "rabbitmq":
                        client.hdel(keys.QUEUE_GAUGES, broker_id)
                        moved = 0
                    else:
                        moved = client.eval(
                            layout.RECOVER.source,
                            1,
                            layout.NAMESPACE,
                            broker_id,
                            *layout.all_queues(list(QUEUES.values())),
                        )
                    break
                except Exception as exc:
                    # Redis down or refusing, or a REDIS_URL that redis-py refuses (ValueError):
                    # the supervisor, which keeps the other children alive, must not die of it.
                    log.warning("could not requeue worker %d's messages yet: %r", index, exc)
                    if client is not None:
                        client.close()
                        client = None
                    time.sleep(pause)
                    pause = min(pause * 2, RECOVER_RETRY_S[1])
            if moved:
                log.info("requeued %d messages of worker %d", moved, index)
            self._todo.task_done()


def _worker_main(settings: Settings, index: int, broker_id: str) -> int:
    from engine.broker.worker import run_worker  # imported after fork: nothing of it in the parent

    return run_worker(settings, index, broker_id)


def run_supervisor(settings: Settings) -> int:
    """Entry point of `prefetch worker`: the supervisor, and its health port when configured."""
    supervisor = Supervisor(settings)
    with HealthPort(settings, supervisor.pulse):
        return supervisor.run()
