"""Helpers for the job-engine tests: real `prefetch worker` processes, a real sandbox, real Redis.

Redis is the session's `redis_url` fixture (tests/conftest.py: REDIS_URL, the local default or
an embedded Valkey). The queue is on that Redis, or on RabbitMQ when the harness is opened with
a `broker_url` (the `broker_url` fixture runs a test on each broker); the pending marks, the
failed list and the counters are in the queue DB either way. The supervisor runs as a
subprocess (`python -m prefetch.cli worker`) in its own session, on hot, warm and queue DBs 8,
9 and 14 (flushed before each test) and the metrics DB 15. The sandbox upstreams run
in-process on free ports, on the test's event loop: tests wait with `wait_for` (which awaits),
never with blocking sleeps, so the sandbox keeps answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from engine.broker.backend import open_job_queue
from engine.broker.jobs import QUEUES
from engine.broker.rabbit_broker import all_queues
from engine.settings import Settings
from engine.store import keys
from engine.store.fastredis import FastRedis, Script
from prefetch.embedded import server_argv
from sandbox import SandboxServer, SandboxSettings

DB_HOT, DB_WARM, DB_QUEUE, DB_METRICS = 8, 9, 14, 15
# DB 15 is also the scratch DB of tests/test_fastredis.py, which flushes it itself; flushing it
# here could break that file when both run at once, and no engine test reads metrics.
FLUSHED_DBS = (DB_HOT, DB_WARM, DB_QUEUE)
HEARTBEATS = f"{keys.QUEUE_NAMESPACE}:__heartbeats__"
# Two runs of this suite at once (two engineers, or a full run beside a focused one) would
# flush each other's DBs and consume each other's jobs: each test holds this lock instead.
LOCK_KEY = "engine-tests:lock"
LOCK_TTL_MS = 150_000  # longer than any engine test (their timeout is at most 90 s)
LOCK_WAIT_S = 120.0
_RESET_QUEUE_DB = Script(
    """
for _, key in ipairs(redis.call('KEYS', '*')) do
  if key ~= KEYS[1] then redis.call('DEL', key) end
end
return 1
"""
)
_RELEASE = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
)
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # Linux: the tests read /proc as well
LOG_TAIL_LINES = 80
# Variables of the parent environment that a child may keep: nothing that configures it.
_KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ")


def user(prefix: str = "") -> str:
    """A fresh user id; `prefix` (e.g. the sandbox's `0000fa11-`) replaces its start."""
    uid = str(uuid.uuid4())
    return prefix + uid[len(prefix) :] if prefix else uid


async def wait_for(
    condition: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
) -> Any:
    """Poll `condition` (sync or async) until it returns something truthy; return that.

    Fails the test after `timeout` seconds, naming `what` and the last value seen.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        result = condition()
        last = await result if inspect.isawaitable(result) else result
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.1f}s waiting for {what} (last: {last!r})"
            )
        await asyncio.sleep(interval)


async def holds_for(
    condition: Callable[[], Any],
    duration: float,
    what: str,
    *,
    interval: float = 0.05,
) -> None:
    """Check that `condition` stays truthy for `duration` seconds (that nothing happens)."""
    deadline = time.monotonic() + duration
    while True:
        result = condition()
        value = await result if inspect.isawaitable(result) else result
        assert value, f"{what} stopped holding (got {value!r})"
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(interval)


# --- processes ------------------------------------------------------------------------------


def _proc_info(pid: int) -> tuple[int, str] | None:
    """(parent pid, title) of a live process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    fields_after_comm = stat.rsplit(")", 1)[1].split()
    if fields_after_comm[0] == "Z":  # a zombie is gone for our purposes
        return None
    title = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return int(fields_after_comm[1]), title


def _all_pids() -> Iterable[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def children_of(pid: int) -> dict[int, str]:
    """Live children of `pid`: {pid: process title}."""
    found = {}
    for candidate in _all_pids():
        info = _proc_info(candidate)
        if info is not None and info[0] == pid:
            found[candidate] = info[1]
    return found


def descendants_of(pid: int) -> list[int]:
    """Every live descendant of `pid`."""
    parents: dict[int, list[int]] = {}
    for candidate in _all_pids():
        info = _proc_info(candidate)
        if info is not None:
            parents.setdefault(info[0], []).append(candidate)
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def log_records(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of a process's output (other lines, e.g. a banner, are skipped)."""
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def error_lines(text: str) -> list[str]:
    """ERROR/CRITICAL lines of a process's output, JSON or text, and bare tracebacks."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                level = json.loads(line).get("level")
            except ValueError:
                level = None
            if level in ("ERROR", "CRITICAL"):
                found.append(line)
        elif " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
            found.append(line)
    return found


def alive(pid: int) -> bool:
    return _proc_info(pid) is not None


def clean_env(**variables: str) -> dict[str, str]:
    """A child environment with none of the parent's settings, plus `variables`."""
    env = {name: os.environ[name] for name in _KEPT_ENV if name in os.environ}
    env.update(variables)
    return env


@dataclass
class EngineProcess:
    """One `prefetch <role>` subprocess, with its log file."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def workers(self) -> dict[int, int]:
        """{worker index: pid} of the live children titled `prefetch: worker N`."""
        found = {}
        for pid, title in children_of(self.pid).items():
            if title.startswith("prefetch: worker "):
                found[int(title.split()[-1])] = pid
        return found

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    async def wait_exit(self, timeout: float) -> int:
        """The exit code, waiting (without blocking the loop) up to `timeout` seconds."""
        await wait_for(lambda: self.proc.poll() is not None, timeout, f"pid {self.pid} to exit")
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the process and everything it started (children have their own groups)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGSTOP)  # frozen: it cannot fork a replacement now
        for pid in descendants_of(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL if the test process dies (no orphan eats jobs later).

    Only a call through a symbol resolved in the parent: nothing that takes locks after fork.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(role: str, env: dict[str, str], log_path: Path) -> EngineProcess:
    """Start `prefetch <role>` in its own session, output to `log_path` (never a pipe to fill)."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefetch.cli", role],
            env=env,
            cwd=log_path.parent,  # no developer `.env` is read
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    return EngineProcess(proc, log_path)


# --- the harness ----------------------------------------------------------------------------


class Engine:
    """Redis clients, the sandbox and the worker processes of one test."""

    def __init__(self, tmp_path: Path, redis_url: str, broker_url: str = "") -> None:
        self.tmp_path = tmp_path
        self.redis_url = redis_url
        self.broker_url = broker_url
        self.rabbit = broker_url.startswith("amqp")
        self.settings = Settings().with_overrides(
            redis_url=redis_url, db_queue=DB_QUEUE, broker_url=broker_url
        )
        self.hot = FastRedis(redis_url, DB_HOT)
        self.warm = FastRedis(redis_url, DB_WARM)
        self.queue = FastRedis(redis_url, DB_QUEUE)
        self.jobs = open_job_queue(self.settings, self.queue)
        self.sandbox: SandboxServer | None = None
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self.processes: list[EngineProcess] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, tmp_path: Path, redis_url: str, broker_url: str = ""
    ) -> AsyncIterator[Engine]:
        """A harness on flushed DBs (and emptied RabbitMQ queues); kills every process it
        started on exit."""
        engine = cls(tmp_path, redis_url, broker_url)
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4()}"
        locked = False
        try:
            locked = await engine._lock(token)
            await engine.hot.execute("FLUSHDB")
            await engine.warm.execute("FLUSHDB")
            await engine.queue.evalsha_or_eval(_RESET_QUEUE_DB, [LOCK_KEY], [])
            if engine.rabbit:
                await asyncio.to_thread(empty_queues, broker_url)
            yield engine
        finally:
            await engine.close()
            if locked:
                await engine.queue.evalsha_or_eval(_RELEASE, [LOCK_KEY], [token])
            await engine.queue.close()

    async def _lock(self, token: str) -> bool:
        async def acquired() -> bool:
            reply = await self.queue.execute("SET", LOCK_KEY, token, "NX", "PX", LOCK_TTL_MS)
            return bool(reply == b"OK")

        await wait_for(
            acquired, LOCK_WAIT_S, "the engine-test lock held by another run", interval=0.1
        )
        return True

    async def close(self) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            # Shown by pytest only when the test failed.
            print(f"----- {process.log_path.name} (pid {process.pid}) -----")
            print(process.log_tail())
        if self.sandbox is not None:
            await self.sandbox.stop()
        await self.http.close()
        await self.jobs.close()
        for client in (self.hot, self.warm):
            await client.close()

    # --- sandbox ---

    async def start_sandbox(self, latency_ms: int = 0) -> SandboxServer:
        """The simulated timeline and CA on free loopback ports."""
        assert self.sandbox is None, "one sandbox per test"
        settings = Settings().with_overrides(
            timeline_url="http://127.0.0.1:0", ca_url="http://127.0.0.1:0"
        )
        self.sandbox = SandboxServer(settings, SandboxSettings(latency_ms=latency_ms))
        await self.sandbox.start()
        return self.sandbox

    async def sandbox_stats(self) -> dict[str, Any]:
        assert self.sandbox is not None
        async with self.http.get(f"{self.sandbox.timeline_url}/__stats") as response:
            response.raise_for_status()
            stats: dict[str, Any] = await response.json()
            return stats

    async def fetches(self, user_id: str) -> int:
        """How many timeline requests the sandbox served for this user."""
        return int((await self.sandbox_stats())["byUser"].get(user_id, 0))

    # --- processes ---

    def env(self, **overrides: str) -> dict[str, str]:
        assert self.sandbox is not None
        variables = {
            "REDIS_URL": self.redis_url,
            "REDIS_DB_HOT": str(DB_HOT),
            "REDIS_DB_WARM": str(DB_WARM),
            "REDIS_DB_QUEUE": str(DB_QUEUE),
            "REDIS_DB_METRICS": str(DB_METRICS),
            "TIMELINE_SERVICE_URL": self.sandbox.timeline_url,
            "CA_URL": self.sandbox.ca_url,
            "SERVICE_CERTIFICATE_TOKEN": "sandbox-service",
            "PREFETCH_WORKER_COUNT": "2",
            "PREFETCH_METRICS_DIR": str(self.tmp_path / "metrics"),
            "ENABLE_ACTIVITY_BASED": "false",
            "LOG_LEVEL": "info",
        }
        if self.broker_url:
            variables["BROKER_URL"] = self.broker_url
        variables.update(overrides)
        return clean_env(**variables)

    async def start_worker(self, *, ready: bool = True, **overrides: str) -> EngineProcess:
        """`prefetch worker` (the supervisor); with `ready`, wait until every child consumes."""
        if self.sandbox is None:
            await self.start_sandbox()
        env = self.env(**overrides)
        process = spawn("worker", env, self.tmp_path / f"worker-{len(self.processes) + 1}.log")
        self.processes.append(process)
        if ready:
            await self.wait_ready(process, int(env["PREFETCH_WORKER_COUNT"]))
        return process

    async def consuming(self, process: EngineProcess) -> set[str]:
        """Broker ids of the supervisor's children that consume (Redis: their heartbeats;
        RabbitMQ: their gauges, first written once every consumer is connected)."""
        if self.rabbit:
            members = await self.queue.execute("HKEYS", keys.QUEUE_GAUGES)
        else:
            members = await self.queue.execute("ZRANGE", HEARTBEATS, 0, -1)
        return {m.decode() for m in members if m.decode().split(":")[-3] == str(process.pid)}

    async def wait_ready(self, process: EngineProcess, count: int, timeout: float = 20) -> None:
        async def ready() -> bool:
            if process.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited with {process.proc.returncode}:\n{process.log_tail()}"
                )
            indexes = {member.split(":")[-2] for member in await self.consuming(process)}
            return len(indexes) >= count

        await wait_for(ready, timeout, f"{count} worker processes to consume")

    # --- Redis ---

    async def cached(self, tier: str, user_ids: list[str]) -> list[bool]:
        """Whether each user has an entry in `tier`."""
        client = self.hot if tier == "hot" else self.warm
        replies = await client.pipeline([("EXISTS", keys.timeline(tier, u)) for u in user_ids])
        return [reply == 1 for reply in replies]

    async def count_cached(self, tier: str, user_ids: list[str]) -> int:
        return sum(await self.cached(tier, user_ids))

    async def acks(self) -> dict[str, int]:
        """Unacked messages: per Dramatiq ack set (worker and queue) on Redis, per worker on
        RabbitMQ (its gauge, stale or not: a stopped worker removes its own, the supervisor a
        dead one's)."""
        if self.rabbit:
            raw = await self.queue.execute("HGETALL", keys.QUEUE_GAUGES)
            held = {
                raw[i].decode(): sum(int(n) for n in raw[i + 1].split()[1:])
                for i in range(0, len(raw), 2)
            }
            return {name: count for name, count in held.items() if count}
        names = await self.queue.execute("KEYS", f"{keys.QUEUE_NAMESPACE}:__acks__.*")
        sizes = await self.queue.pipeline([("SCARD", name) for name in names])
        return {n.decode(): s for n, s in zip(names, sizes, strict=True) if s}

    def error_lines(self) -> list[str]:
        """ERROR/CRITICAL log lines and tracebacks of every process of the test."""
        return [line for process in self.processes for line in error_lines(process.log())]


def empty_queues(broker_url: str, timeout: float = 20.0) -> None:
    """Empty the service's queues (and their delay and dead-letter queues) in the test vhost,
    once the previous test's consumers are gone (their unacked messages back in the queues).

    Purged, not deleted: a quorum queue deleted and declared again at once can be found by a
    consumer before its new process runs (RabbitMQ 3.10 answers it with an internal error).
    """
    import pika
    import pika.exceptions

    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        deadline = time.monotonic() + timeout
        for name in all_queues(list(QUEUES.values())):
            while True:
                try:
                    declared = channel.queue_declare(name, passive=True)
                except pika.exceptions.ChannelClosedByBroker:  # 404: not declared yet
                    channel = connection.channel()
                    break
                if declared.method.consumer_count == 0:
                    channel.queue_purge(name)
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"queue {name} still has consumers")
                connection.sleep(0.05)
    finally:
        connection.close()


# --- a Redis of the test's own ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class PrivateRedis:
    """A redis-server on a free port and in a directory of the test's own, which the test may
    SIGKILL, restart on the same data (AOF), freeze (SIGSTOP) or starve (maxmemory)."""

    def __init__(self, directory: Path, *options: str) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def start(self) -> PrivateRedis:
        """Start it and wait (without blocking the loop) until it answers PING."""
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        log = (self.directory / f"redis-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(  # noqa: ASYNC220 (a fork-exec: it does not wait)
            server_argv(self.port, self.directory, *self.options),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + 20
        import redis as redis_py

        while True:
            try:
                with redis_py.Redis(port=self.port, socket_timeout=1) as client:
                    if client.ping():
                        return self
            except (redis_py.RedisError, OSError):
                # BusyLoadingError (AOF replay) included: wait until it answers.
                if time.monotonic() >= deadline or self.proc.poll() is not None:
                    tail = self.log_tail()
                    raise AssertionError(f"redis-server did not start:\n{tail}") from None
            await asyncio.sleep(0.05)

    def log_tail(self) -> str:
        path = self.directory / f"redis-{self.starts}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: whatever was not written to the AOF is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.kill()
