"""The scheduler as a child of the supervisor: `prefetch: scheduler`, one per pod.

`SchedulerChild` is all the supervisor needs (engine/supervisor.py calls it from a handful
of clearly marked lines): it forks the child, is told when the supervisor reaps a pid,
restarts a dead child (after 1 s, backing off while it keeps dying at start), forwards
signals and says whether it still runs. Whether the pod's scheduler leads is decided by the
lease, not here, so every pod may run one.
"""

from __future__ import annotations

import logging
import os
import time

from engine.process import fork_child, set_title, stop_on_signals
from engine.settings import Settings

log = logging.getLogger(__name__)

RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 30.0
CRASH_WINDOW_S = 5.0


def scheduler_wanted(settings: Settings) -> bool:
    """A scheduler runs when a strategy that ticks is enabled (events need none)."""
    return settings.enable_activity_based or settings.enable_predictive


def run_scheduler_process(settings: Settings) -> int:
    """Body of the forked child: tick under the lease until SIGTERM/SIGINT."""
    import uvloop

    from engine.strategies.runner import run_scheduler

    set_title("prefetch: scheduler")

    async def main() -> None:
        with stop_on_signals() as stop:
            await run_scheduler(settings, stop)

    uvloop.run(main())
    return 0


class SchedulerChild:
    """The supervisor's handle on its scheduler child."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.enabled = scheduler_wanted(settings)
        self.pid: int | None = None
        self._started = 0.0
        self._restart_at: float | None = None
        self._crashes = 0

    @property
    def running(self) -> bool:
        """Whether the child lives (the supervisor waits for it before exiting)."""
        return self.pid is not None

    def start(self) -> None:
        """Fork the child (when a strategy is enabled)."""
        if not self.enabled:
            return
        self._restart_at = None
        self._started = time.monotonic()
        self.pid = fork_child("scheduler", lambda: run_scheduler_process(self._settings))
        log.info("scheduler (pid %d) started", self.pid)

    def reaped(self, pid: int, code: int, stopping: bool) -> bool:
        """The supervisor reaped `pid`: True if it was the scheduler (restart it later)."""
        if pid != self.pid:
            return False
        self.pid = None
        if stopping:
            return True
        lived = time.monotonic() - self._started
        self._crashes = self._crashes + 1 if lived < CRASH_WINDOW_S else 0
        delay = min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2 ** max(0, self._crashes - 1))
        log.warning("scheduler (pid %d) died with %d; restarting in %.1fs", pid, code, delay)
        self._restart_at = time.monotonic() + delay
        return True

    def poll(self, stopping: bool) -> None:
        """Restart a dead child once its delay passed."""
        if stopping or self._restart_at is None or time.monotonic() < self._restart_at:
            return
        self.start()

    def signal(self, signum: int) -> None:
        """Forward a signal (SIGTERM drains: the lease is released)."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass
