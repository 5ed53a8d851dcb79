"""The chaos soak's own Redis: a redis-server it can SIGKILL and restart on the same AOF.

Its own (a free port, a temporary directory), never the machine's or a developer's, because
the soak kills it; AOF with `appendfsync always`, so that what it acknowledged survives the
kill and a lost job is the service's fault, not the server's.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis as redis_py

from bench.common import free_port
from prefetch.embedded import server_argv


class CrashableRedis:
    """A redis-server with AOF `appendfsync always`, which the soak kills and restarts."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.starts += 1
        log = (self.directory / f"redis-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            server_argv(
                self.port, self.directory, "--appendonly", "yes", "--appendfsync", "always"
            ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with redis_py.Redis(port=self.port, socket_timeout=1) as client:
                    if client.ping():
                        return
            except (redis_py.RedisError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"redis-server did not start (see {self.directory})") from None
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
