"""The pod's Prometheus multiprocess directory: who empties it, and when.

Every process of a pod writes its values to `<dir>/<kind>_<pid>.db` and `/metrics` adds the
files up. Several roles start against one directory (the API and the supervisor in `prefetch
dev`; an API or a worker container restarted in a pod whose emptyDir survives), so no role
may simply empty it. Each starting process instead removes:

- the files of pids that are no longer alive (stale: a previous incarnation of the pod's
  processes; counters that came from them restart from zero, which `rate()` reads as a reset);
- the files that carry its own pid (a previous container's process that had the same pid:
  left alone, they would make this process continue its values).

Files of live processes are never touched, whoever starts first. Children that die while
their parent runs are marked dead by that parent (`mark_process_dead`: their live gauges
drop out, their counters stay in the sums so that totals never go down while the pod runs).
The directory must be private to one pid namespace (one container, or a pod that shares its
process namespace): a pid is only meaningful there.

Nothing here imports prometheus_client, which reads PROMETHEUS_MULTIPROC_DIR when imported.
"""

from __future__ import annotations

import os
from pathlib import Path


def pid_of(name: str) -> int | None:
    """The pid in a metric file's name (`counter_123.db`, `gauge_livesum_123.db`), or None."""
    if not name.endswith(".db"):
        return None
    _, _, tail = name[:-3].rpartition("_")
    return int(tail) if tail.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists in our pid namespace."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True


def prepare(path: Path, own_pid: int | None = None) -> list[str]:
    """Create the directory and remove stale files (see the module docstring); their names."""
    path.mkdir(parents=True, exist_ok=True)
    me = os.getpid() if own_pid is None else own_pid
    removed: list[str] = []
    for entry in path.iterdir():
        pid = pid_of(entry.name)
        if pid is None or (pid != me and pid_alive(pid)):
            continue
        try:
            entry.unlink()
        except FileNotFoundError:  # another starting process removed it first
            continue
        removed.append(entry.name)
    return removed
