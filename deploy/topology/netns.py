"""The network of one topology run: a Linux network namespace per host, on one bridge.

Every host (the Redis host, the upstreams, each pod, the load driver) is a namespace
`pft-<run>-<host>` with its own loopback and an `eth0` at 10.77.0.<n>/24. The other end of
each `eth0` is a veth on a bridge that lives in a namespace of its own (`pft-<run>-hub`), so
a run changes nothing in the machine's own network and two runs never see each other (their
namespace names differ by the run id; the addresses may repeat, each run has its own bridge).

A run is recorded in STATE_DIR before its first namespace exists, with the pid of the
process that owns it: `teardown` finds every namespace and process of a run from there, and
`stale_runs` finds the runs whose owner died (SIGKILL) so that the next run removes them.

Cutting a host off from another takes iproute2 alone, in the host's namespace (iptables and
tc's drop action are not on every machine this runs on): in, a policy rule `from <peer>
blackhole` (with forwarding off, as in every new namespace, the kernel drops such a packet
without an ICMP answer); out, a permanent neighbour entry giving the peer's address a MAC
that no host has, so the bridge floods the frames and nobody takes them. Packets vanish as in
a real partition (no reset, no unreachable), while the host's link to everyone else stays
up, so its probes can still be asked.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "pft"
SUBNET = "10.77.0"
STATE_DIR = Path("/run/prefetch-topology")
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
# A cut: the policy rule's priority (before the main table's 32766) and a locally
# administered MAC that no veth of a run has (theirs are random, never this one).
CUT_PRIORITY = "100"
NOWHERE_MAC = "02:00:00:00:00:01"
# Processes left in a namespace get SIGTERM, then SIGKILL after this long.
TERM_GRACE_S = 5.0


class TopologyError(Exception):
    """The topology could not be built or driven (one line for the operator)."""


def ip(*args: str) -> str:
    """Run `ip ARGS...`; raise TopologyError with its stderr when it fails."""
    return _run(["ip", *args])


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TopologyError(f"{' '.join(argv)}: {exc}") from None
    if done.returncode != 0:
        raise TopologyError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


@dataclass(frozen=True, slots=True)
class Host:
    """One host of the topology: its name, address and namespace."""

    name: str
    address: str
    netns: str


class Network:
    """The namespaces, veths and bridge of one run (see the module docstring)."""

    def __init__(self, hosts: dict[str, int], run_id: str | None = None) -> None:
        self.run_id = run_id or secrets.token_hex(3)
        self.hub = f"{PREFIX}-{self.run_id}-hub"
        self.hosts = {
            name: Host(name, f"{SUBNET}.{n}", f"{PREFIX}-{self.run_id}-{name}")
            for name, n in hosts.items()
        }

    @property
    def state_file(self) -> Path:
        return STATE_DIR / f"{self.run_id}.json"

    def namespaces(self) -> list[str]:
        return [host.netns for host in self.hosts.values()] + [self.hub]

    def create(self, owner: int | None) -> None:
        """Record the run, then make the bridge and every host; TopologyError if it cannot."""
        if os.geteuid() != 0:
            raise TopologyError("network namespaces need root (run as root, or in CI as root)")
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.record(owner)
        ip("netns", "add", self.hub)
        ip("-n", self.hub, "link", "set", "lo", "up")
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        for host in self.hosts.values():
            veth = f"v-{host.name}"[:15]
            ip("netns", "add", host.netns)
            ip("-n", host.netns, "link", "set", "lo", "up")
            ip(
                "link", "add", "eth0", "netns", host.netns, "type", "veth",
                "peer", "name", veth, "netns", self.hub,
            )  # fmt: skip
            ip("-n", self.hub, "link", "set", veth, "master", "br0")
            ip("-n", self.hub, "link", "set", veth, "up")
            ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            ip("-n", host.netns, "link", "set", "eth0", "up")

    def record(self, owner: int | None) -> None:
        """Write the state file: what to remove, and who owns the run (None: nobody, `up`)."""
        body = {"run": self.run_id, "owner": owner, "namespaces": self.namespaces()}
        self.state_file.write_text(json.dumps(body))

    # --- partitions -------------------------------------------------------------------------

    def cut(self, host: str, peer: str) -> None:
        """Drop every packet between `host` and `peer`, in `host`'s namespace."""
        netns, address = self.hosts[host].netns, self.hosts[peer].address
        ip("-n", netns, "rule", "add", "from", address, "blackhole", "priority", CUT_PRIORITY)
        ip(
            "-n", netns, "neigh", "replace", address, "lladdr", NOWHERE_MAC,
            "dev", "eth0", "nud", "permanent",
        )  # fmt: skip

    def restore(self, host: str, peer: str) -> None:
        """Undo `cut` (the peer's address is resolved afresh by ARP)."""
        netns, address = self.hosts[host].netns, self.hosts[peer].address
        ip("-n", netns, "rule", "del", "from", address, "blackhole", "priority", CUT_PRIORITY)
        ip("-n", netns, "neigh", "del", address, "dev", "eth0")

    # --- processes --------------------------------------------------------------------------

    def pids(self, host: str) -> list[int]:
        """Every process in `host`'s namespace."""
        return _netns_pids(self.hosts[host].netns)

    def kill(self, host: str) -> list[int]:
        """Every process in `host`'s namespace dies at once, as on a dead node; the pids.

        All are stopped (SIGSTOP) before any is killed: otherwise a child outliving its
        parent by a moment would get its parent-death SIGTERM (engine.process) and exit
        cleanly, e.g. a scheduler releasing its lease, which a dead node never does.
        """
        killed: list[int] = []
        for _ in range(5):  # again, for a child forked while the list was being read
            pids = [pid for pid in self.pids(host) if pid not in killed]
            if not pids:
                break
            for sig in (signal.SIGSTOP, signal.SIGKILL):
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            killed += pids
        return killed

    def teardown(self) -> list[str]:
        """Stop every process of the run, delete its namespaces and state; the problems seen."""
        return teardown(self.namespaces(), self.state_file)


def _netns_pids(netns: str) -> list[int]:
    try:
        out = ip("netns", "pids", netns)
    except TopologyError:
        return []
    own = os.getpid()
    return [int(pid) for pid in out.split() if pid.isdigit() and int(pid) != own]


def teardown(namespaces: list[str], state_file: Path) -> list[str]:
    """SIGTERM, then SIGKILL, every process in `namespaces`; delete them and `state_file`."""
    problems: list[str] = []
    existing = [ns for ns in namespaces if (NETNS_DIR / ns).exists()]
    for sig, grace in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 2.0)):
        pids = [pid for ns in existing for pid in _netns_pids(ns)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [pid for pid in pids if _alive(pid)]
    left = [pid for ns in existing for pid in _netns_pids(ns) if _alive(pid)]
    if left:
        problems.append(f"processes still alive after SIGKILL: {left}")
    for ns in existing:
        try:
            ip("netns", "del", ns)
        except TopologyError as exc:
            problems.append(str(exc))
    if not problems:
        state_file.unlink(missing_ok=True)
    return problems


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent, maybe this process, reaps it later).
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def recorded_runs() -> list[dict[str, object]]:
    """Every run recorded in STATE_DIR (with its `file`)."""
    runs: list[dict[str, object]] = []
    for path in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            runs.append({**json.loads(path.read_text()), "file": str(path)})
    return runs


def stale_runs() -> list[dict[str, object]]:
    """Recorded runs whose owner is gone, or that nobody owns (left up by `up`)."""
    return [run for run in recorded_runs() if not _owner_alive(run.get("owner"))]


def _owner_alive(owner: object) -> bool:
    return isinstance(owner, int) and _alive(owner)


def remove_run(run: dict[str, object]) -> list[str]:
    """Tear down one recorded run."""
    names = run.get("namespaces")
    listed = names if isinstance(names, list) else []
    namespaces = [str(ns) for ns in listed if str(ns).startswith(f"{PREFIX}-")]
    return teardown(namespaces, Path(str(run["file"])))


def enter(netns: str) -> None:
    """Move the calling thread (and the threads and processes it starts) into `netns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise TopologyError(f"setns({netns}): {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
