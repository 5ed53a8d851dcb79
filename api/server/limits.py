"""How many connections one API process takes, and how long a request head may take.

Apart from api.server.connections, which enforces them, because these touch no aiohttp
internals: the open-file limit is raised to its hard bound at start (as Go's runtime does),
and the connection cap is lowered so that client connections cannot exhaust it.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Final

# File descriptors kept free for everything but client connections: the upstream pool (200
# connections), Redis, the listening socket, logs and Prometheus files.
FD_RESERVE: Final = 256
MIN_CONNECTIONS: Final = 16


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """The bounds one API process enforces on its clients."""

    header_timeout_s: float
    max_connections: int


def raise_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (as Go's runtime does); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(wanted: int) -> int:
    """`wanted`, lowered so that client connections cannot exhaust the open-file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(MIN_CONNECTIONS, min(wanted, soft - FD_RESERVE))
