"""How many CPUs this process may really use: its affinity mask and its cgroup CPU quota.

`os.cpu_count()` counts the host's CPUs. A worker pod limited to 2 CPUs on a 64-CPU node would
fork 64 worker processes from it, each throttled by the kernel's CFS quota and each holding
~80 MB: the default of `PREFETCH_WORKER_COUNT` comes from here instead.

A quota of 1.5 CPUs counts as 2 (rounded up, as the JVM does): one process per whole CPU would
leave the half unused, and two processes sharing 1.5 CPUs lose little to throttling. Nested
cgroups are walked up to the root and the tightest quota wins, since a parent's limit binds
its children. Only the conventional mount point is read (`/sys/fs/cgroup`, with the v1 `cpu`
hierarchy at `cpu/` or `cpu,cpuacct/`); anything unreadable or malformed counts as no limit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_FS = Path("/sys/fs/cgroup")
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def available_cpus(
    *,
    proc_self_cgroup: Path = PROC_SELF_CGROUP,
    cgroup_fs: Path = CGROUP_FS,
    affinity: Callable[[], int] | None = None,
) -> int:
    """CPUs this process may use: min(affinity, ceil(cgroup quota)), at least 1."""
    count = (affinity or _affinity)()
    limit = cgroup_cpu_limit(proc_self_cgroup=proc_self_cgroup, cgroup_fs=cgroup_fs)
    if limit is not None:
        count = min(count, math.ceil(limit))
    return max(1, count)


def cgroup_cpu_limit(
    *, proc_self_cgroup: Path = PROC_SELF_CGROUP, cgroup_fs: Path = CGROUP_FS
) -> float | None:
    """The tightest CPU quota (in CPUs, e.g. 1.5) of this process's cgroups, or None."""
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            limits.extend(_quotas(_walk(cgroup_fs, path), _v2_quota))
        elif "cpu" in controllers.split(","):
            for name in _V1_CPU_DIRS:
                if (cgroup_fs / name).is_dir():
                    limits.extend(_quotas(_walk(cgroup_fs / name, path), _v1_quota))
                    break
    return min(limits) if limits else None


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _walk(mount: Path, cgroup_path: str) -> Iterator[Path]:
    """The cgroup's directory and each parent up to the mount point.

    Inside a container without a cgroup namespace, /proc/self/cgroup names the host's path,
    which does not exist under the container's mount: then only the mount point itself is
    read (the container's own cgroup is mounted there).
    """
    directory = mount / cgroup_path.strip("/")
    if not directory.is_dir():
        directory = mount
    while True:
        yield directory
        if directory == mount or mount not in directory.parents:
            return
        directory = directory.parent


def _quotas(directories: Iterator[Path], read: Callable[[Path], float | None]) -> list[float]:
    return [quota for d in directories if (quota := read(d)) is not None]


def _v2_quota(directory: Path) -> float | None:
    """cgroup v2 `cpu.max`: "<quota> <period>" in µs, or "max <period>" for no limit."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()
        if quota == "max":
            return None
        return _ratio(int(quota), int(period))
    except (OSError, ValueError):
        return None


def _v1_quota(directory: Path) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` (-1: no limit) over `cpu.cfs_period_us`."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _ratio(quota, period)


def _ratio(quota: int, period: int) -> float | None:
    if quota <= 0 or period <= 0:
        return None
    return quota / period
