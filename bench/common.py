"""Shared plumbing of the benches: Redis target, subprocesses, results.

Every bench uses Redis DBs 4-7 (hot, warm, queue, metrics) and flushes them first, so it
never touches the DBs of a `prefetch dev` or of the tests. Services run as real `prefetch`
subprocesses in a scratch directory (so a developer's `.env` does not leak in), with their
logs under bench/results/logs/. The /proc readings are in bench/procfs.py. Also the command
line of the bare aiohttp responder (bench/bare.py) that the read bench compares the API with:
`python -m bench.common bare --port P --plain F --gzip F`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.procfs import command_name, group_members

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PREFETCH = Path(sys.executable).with_name("prefetch")
BENCH_DBS = {"REDIS_DB_HOT": 4, "REDIS_DB_WARM": 5, "REDIS_DB_QUEUE": 6, "REDIS_DB_METRICS": 7}
SERVICE_TOKEN = "sandbox-service"


# --- Redis ------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_target(url: str | None) -> Iterator[str]:
    """The Redis URL to bench against: `url`, else $REDIS_URL, else an embedded Valkey."""
    url = url or os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    from prefetch.embedded import EmbeddedRedis

    with EmbeddedRedis() as embedded:
        yield embedded.url


def flush_bench_dbs(url: str) -> None:
    """Empty DBs 4-7 (only those: other DBs belong to `prefetch dev` and the tests)."""
    for db in BENCH_DBS.values():
        client = redis.Redis.from_url(url, db=db)
        try:
            client.flushdb()
        finally:
            client.close()


def redis_info(url: str) -> dict[str, Any]:
    """Version and pid of the server (the pid is only meaningful on this host)."""
    client = redis.Redis.from_url(url)
    try:
        info = client.info("server")
    finally:
        client.close()
    version = info.get("valkey_version") or info.get("redis_version")
    return {"version": version, "pid": info.get("process_id"), "url": _redacted(url)}


def local_redis_pid(url: str) -> int | None:
    """The pid of the Redis server if it runs on this host (its CPU time can be read)."""
    pid = redis_info(url).get("pid")
    if not isinstance(pid, int):
        return None
    comm = command_name(pid)
    return pid if comm and ("redis" in comm or "valkey" in comm) else None


def _redacted(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


# --- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(redis_url: str, **overrides: str | int | Path) -> dict[str, str]:
    """The environment of a `prefetch` subprocess: ours over the caller's, DBs 4-7."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFETCH_", "SANDBOX_"))}
    for name in ("REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD"):
        env.pop(name, None)
    env.update({k: str(v) for k, v in BENCH_DBS.items()})
    env.update(REDIS_URL=redis_url, LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


class Services:
    """Subprocesses of one bench run; each is stopped by its pid, the last started first."""

    def __init__(self, label: str) -> None:
        self.logs = RESULTS / "logs" / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.scratch = self.logs / "cwd"
        self.scratch.mkdir(exist_ok=True)
        self._running: list[Service] = []

    def start(self, name: str, argv: list[str], env: Mapping[str, str]) -> Service:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                env=dict(env),
                cwd=self.scratch,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches only the bench
            )
        service = Service(name, proc, log)
        self._running.append(service)
        return service

    def prefetch(self, role: str, env: Mapping[str, str], name: str | None = None) -> Service:
        return self.start(name or role, [str(PREFETCH), role], env)

    def stop(self, service: Service, timeout: float = 15.0) -> int | None:
        """SIGTERM; SIGKILL after `timeout`, and to any child left in its process group."""
        if service in self._running:
            self._running.remove(service)
        proc = service.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"  ! {service.name} (pid {proc.pid}) ignored SIGTERM; killing it")
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        for pid in group_members(proc.pid):  # stray children of the session we created
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return proc.returncode

    def pid_of(self, name: str) -> int | None:
        """The pid of a running service started under `name`."""
        return next((s.pid for s in self._running if s.name == name), None)

    def close(self) -> None:
        for service in reversed(list(self._running)):
            self.stop(service)

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def wait_http(url: str, service: Service, timeout: float = 30.0, headers: Any = None) -> None:
    """Poll `url` until it answers 200; fail early (with the log's tail) if `service` died."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise SystemExit(
                f"{service.name} exited with {service.proc.returncode} before {url} answered:\n"
                f"{service.tail()}"
            )
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=2) as rsp:
                if rsp.status == 200:
                    return
                last = rsp.status
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer 200 within {timeout:g}s ({last!r}):\n{service.tail()}")


def http_json(url: str, headers: Mapping[str, str] | None = None) -> Any:
    with urllib.request.urlopen(urllib.request.Request(url, headers=dict(headers or {}))) as rsp:
        return json.loads(rsp.read())


def start_sandbox(services: Services, redis_url: str, latency_ms: int = 0) -> dict[str, str]:
    """`prefetch sandbox` on two free ports; returns TIMELINE_SERVICE_URL and CA_URL."""
    urls = {
        "TIMELINE_SERVICE_URL": f"http://127.0.0.1:{free_port()}",
        "CA_URL": f"http://127.0.0.1:{free_port()}",
    }
    env = service_env(redis_url, SANDBOX_LATENCY_MS=latency_ms, **urls)
    sandbox = services.prefetch("sandbox", env)
    wait_http(urls["TIMELINE_SERVICE_URL"] + "/health", sandbox)
    wait_http(urls["CA_URL"] + "/health", sandbox)
    return urls


# --- results ----------------------------------------------------------------------------------


def code_fingerprint() -> str:
    """A hash of the service's source (engine, api, sandbox and their sub-packages), to tell
    apart runs of the same day."""
    import hashlib

    digest = hashlib.sha1(usedforsecurity=False)
    for package in ("engine", "api", "sandbox"):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def machine() -> dict[str, Any]:
    """Where and on what a result was measured."""
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code": code_fingerprint(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "note": "the load generator shares the CPUs with the system under test",
    }


def save_result(name: str, payload: dict[str, Any]) -> Path:
    """Write bench/results/<name>-<timestamp>.json (the directory is gitignored)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """Left-aligned first column, right-aligned numbers."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    head = line(headers)
    print(head)
    print("-" * len(head))
    for row in rows:
        print(line(row))


def main() -> None:
    """`python -m bench.common bare ...`: the bare responder (bench/bare.py), as bench_reads
    starts it."""
    from bench import bare

    bare.main()


if __name__ == "__main__":
    main()
