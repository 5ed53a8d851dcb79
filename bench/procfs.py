"""/proc readings of the benches: CPU time, memory and titles of processes, and busy CPUs.

Every bench reports CPU per request or per job by role (workers, API, sandbox, Redis) and
what else ran on the machine meanwhile; these read it straight from /proc (Linux only), so
no process has to measure itself. Services.stop uses `group_members` to find the children
left in a service's process group.
"""

from __future__ import annotations

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def command_name(pid: int) -> str | None:
    """The process's executable name (/proc/<pid>/comm); None if it is gone."""
    return _read(f"/proc/{pid}/comm")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def system_busy_seconds() -> float:
    """CPU time all CPUs spent busy since boot (/proc/stat), in seconds."""
    fields = (_read("/proc/stat") or "cpu 0").splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def memory_kb(pid: int, field: str = "VmRSS") -> int:
    """A Vm* line of /proc/<pid>/status (VmRSS now, VmHWM the peak), in kB."""
    status = _read(f"/proc/{pid}/status") or ""
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _ppid(pid: int) -> int | None:
    stat = _read(f"/proc/{pid}/stat")
    return int(stat.rsplit(")", 1)[1].split()[1]) if stat else None


def titled(prefix: str, ancestor: int | None = None) -> dict[int, str]:
    """Processes whose title (cmdline) starts with `prefix`, optionally below `ancestor`."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        cmdline = _read(f"/proc/{entry}/cmdline")
        if not cmdline:
            continue
        title = cmdline.replace("\x00", " ").strip()
        if not title.startswith(prefix):
            continue
        pid = int(entry)
        if ancestor is None or pid == ancestor or _descends(pid, ancestor):
            found[pid] = title
    return found


def group_members(pgid: int) -> list[int]:
    """The processes still in process group `pgid` (field 5 of /proc/<pid>/stat)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read(f"/proc/{entry}/stat")
            if stat and int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                members.append(int(entry))
    return members


def _descends(pid: int, ancestor: int) -> bool:
    for _ in range(16):
        parent = _ppid(pid)
        if parent is None or parent <= 1:
            return False
        if parent == ancestor:
            return True
        pid = parent
    return False
