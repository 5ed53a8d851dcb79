"""Rate-limited warnings: one line per kind of event per interval, however often it happens.

A flood of malformed requests, slow clients or failing requests during an outage must not
flood the log in turn: the first event of a kind is logged, the next ones within the
interval are counted, and the count rides along with the next line that is logged.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Final

LOG_INTERVAL_S: Final = 10.0


class LogThrottle:
    """At most one log line per kind every `interval_s`, counting the lines it held back."""

    def __init__(self, logger: logging.Logger, interval_s: float = LOG_INTERVAL_S) -> None:
        self._logger = logger
        self._interval = interval_s
        self._state: dict[str, tuple[float, int]] = {}

    def warning(self, kind: str, message: str, *args: object) -> bool:
        """Log `message % args` unless `kind` was logged within the interval; True if logged."""
        now = time.monotonic()
        last, held = self._state.get(kind, (-math.inf, 0))
        if now - last < self._interval:
            self._state[kind] = (last, held + 1)
            return False
        if held:
            message += f" ({held} more like it since the last report)"
        self._logger.warning(message, *args)
        self._state[kind] = (now, 0)
        return True
