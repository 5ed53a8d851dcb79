"""The processes of the topology: a Redis host, the upstreams, API pods and worker pods.

Each runs in its host's namespace (`ip netns exec`) and UTS namespace (`unshare --uts`), with
the host's name as its hostname, so a scheduler's identity reads `wrk1:<pid>` as it would on
a real node. `ip netns exec`, `unshare` and `sh -c 'exec ...'` all exec in place: the pid
this module holds is the role's own process (the supervisor of a worker pod), which is what
a kubelet signals. Every process starts from a small clean environment and an empty working
directory (no `.env`), with its log in the run directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.topology.netns import Host, Network, TopologyError
from prefetch.embedded import server_binary

PREFETCH = Path(sys.executable).with_name("prefetch")
REDIS_PORT = 6379
API_PORT = 3005
HEALTH_PORT = 3006
TIMELINE_PORT = 3004
CA_PORT = 3000
SERVICE_TOKEN = "sandbox-service"
_KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")


@dataclass(frozen=True, slots=True)
class Knobs:
    """The settings the run gives its pods (short lease and tick so a run takes minutes)."""

    lease_ttl_ms: int = 3_000
    tick_ms: int = 1_000
    latency_ms: int = 20
    workers_per_pod: int = 1
    concurrency: int = 50
    shutdown_timeout_ms: int = 15_000


@dataclass
class Pod:
    """One role on one host, restartable."""

    name: str
    role: str  # redis | upstream | api | worker
    host: Host
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    exits: list[int | None] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def url(self, path: str) -> str:
        port = HEALTH_PORT if self.role == "worker" else API_PORT
        return f"http://{self.host.address}:{port}{path}"

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Pods:
    """Every process of one run, by name (`redis`, `upstream`, `api1`, `wrk1`, ...)."""

    def __init__(self, network: Network, run_dir: Path, knobs: Knobs) -> None:
        self.network = network
        self.run_dir = run_dir
        self.knobs = knobs
        self.cwd = run_dir / "cwd"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.pods: dict[str, Pod] = {}
        redis_host, upstream = network.hosts["redis"], network.hosts["upstream"]
        self.redis_url = f"redis://{redis_host.address}:{REDIS_PORT}"
        self._upstreams = {
            "TIMELINE_SERVICE_URL": f"http://{upstream.address}:{TIMELINE_PORT}",
            "CA_URL": f"http://{upstream.address}:{CA_PORT}",
        }
        for name, host in network.hosts.items():
            role = _role(name)
            if role is not None:
                self.pods[name] = self._define(name, role, host)

    def __getitem__(self, name: str) -> Pod:
        return self.pods[name]

    def of_role(self, role: str) -> list[Pod]:
        return [pod for pod in self.pods.values() if pod.role == role]

    def _define(self, name: str, role: str, host: Host) -> Pod:
        log = self.run_dir / f"{name}.log"
        if role == "redis":
            data = self.run_dir / "redis-data"
            data.mkdir(exist_ok=True)
            argv = [
                server_binary(), "--bind", host.address, "127.0.0.1", "--port", str(REDIS_PORT),
                "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", str(data),
            ]  # fmt: skip
            return Pod(name, role, host, argv, self._env({}), log)
        k = self.knobs
        common = {
            **self._upstreams,
            "REDIS_URL": self.redis_url,
            "SERVICE_CERTIFICATE_TOKEN": SERVICE_TOKEN,
            "PREFETCH_METRICS_DIR": str(self.run_dir / f"metrics-{name}"),
            "HOT_CACHE_TTL": "3600000",  # entries outlive the run: the audit finds them
            "WARM_CACHE_TTL": "3600000",
            "ENABLE_ACTIVITY_BASED": "true",
            "ACTIVITY_CHECK_INTERVAL": str(k.tick_ms),
            "SCHEDULER_LEASE_TTL": str(k.lease_ttl_ms),
            "PREFETCH_SERVICE_HOST": "0.0.0.0",
            "LOG_LEVEL": "info",
        }
        if role == "upstream":
            env = {**common, "SANDBOX_LATENCY_MS": str(k.latency_ms), "LOG_LEVEL": "warning"}
            return Pod(name, role, host, [str(PREFETCH), "sandbox"], self._env(env), log)
        if role == "api":
            env = {**common, "PREFETCH_SERVICE_PORT": str(API_PORT), "API_WORKERS": "1"}
            return Pod(name, role, host, [str(PREFETCH), "api"], self._env(env), log)
        env = {
            **common,
            "PREFETCH_HEALTH_PORT": str(HEALTH_PORT),
            "PREFETCH_WORKER_COUNT": str(k.workers_per_pod),
            "PREFETCH_JOB_CONCURRENCY": str(k.concurrency),
            "PREFETCH_SHUTDOWN_TIMEOUT": str(k.shutdown_timeout_ms),
        }
        return Pod(name, role, host, [str(PREFETCH), "worker"], self._env(env), log)

    def _env(self, ours: dict[str, str]) -> dict[str, str]:
        env = {name: os.environ[name] for name in _KEPT_ENV if name in os.environ}
        env.update(ours, PYTHONUNBUFFERED="1")
        return env

    # --- lifetimes --------------------------------------------------------------------------

    def start(self, name: str) -> Pod:
        """Start the pod's process in its namespace, named after its host."""
        pod = self.pods[name]
        if pod.alive:
            raise TopologyError(f"{name} is already running (pid {pod.pid})")
        pod.starts += 1
        argv = [
            "ip", "netns", "exec", pod.host.netns, "unshare", "--uts",
            "sh", "-c", 'hostname "$0" && exec "$@"', name, *pod.argv,
        ]  # fmt: skip
        with pod.log.open("ab") as out:
            out.write(f"==== start {pod.starts} at {time.strftime('%H:%M:%S')}\n".encode())
            out.flush()
            pod.proc = subprocess.Popen(
                argv,
                env=pod.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return pod

    def stop(self, name: str, timeout: float) -> int | None:
        """SIGTERM (as the kubelet does) and wait; the exit code, or None if it outlived
        `timeout` and was killed."""
        pod = self.pods[name]
        if pod.proc is None:
            return None
        if pod.proc.poll() is None:
            pod.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = pod.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.network.kill(name)
            pod.proc.wait(10)
            code = None
        pod.exits.append(code)
        return code

    def kill(self, name: str) -> list[int]:
        """SIGKILL every process of the pod's host at once (the node died); the pids."""
        pod = self.pods[name]
        pids = self.network.kill(name)
        if pod.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                pod.proc.wait(10)
            pod.exits.append(pod.proc.returncode)
        return pids

    def reap(self) -> None:
        """Collect the exit status of every process started here that has ended."""
        for pod in self.pods.values():
            if pod.proc is not None:
                pod.proc.poll()


def _role(name: str) -> str | None:
    if name in ("redis", "upstream"):
        return name
    if name.startswith("api"):
        return "api"
    if name.startswith("wrk"):
        return "worker"
    return None  # the load driver's host runs nothing of ours
