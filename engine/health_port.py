"""The supervisor's health port (`PREFETCH_HEALTH_PORT`): probes a worker pod can really answer.

- `GET /live`: 200 while the supervisor's loop turns (it beats `Pulse` on every turn; a loop
  stuck for LIVE_STALL_S is dead to the kubelet, which restarts the pod).
- `GET /ready`: 200 when the loop turns, at least one worker child is alive and Redis answers
  PING within REDIS_TIMEOUT_S.
- `GET /metrics`: the Prometheus values of every process of the pod (the multiprocess
  directory), so a worker pod has a scrape target without an API process.

The server runs in a daemon thread of the supervisor, which keeps forking workers. Two things
keep that safe: the listening socket is closed in every forked child (a worker, or an orphan
still draining after its supervisor died, must not hold the port), and the work that takes
locks a child could inherit half-held (the Redis client, reading the metric files) runs under
a lock that every fork waits for.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar

import redis

from engine.errors import PortInUse
from engine.metrics.prometheus import render
from engine.settings import Settings

LIVE_STALL_S = 10.0
REDIS_TIMEOUT_S = 1.0

# Every fork waits for this lock, so no child starts with it (or with what it guards) held.
_FORK_LOCK = threading.Lock()
_SERVERS: list[ThreadingHTTPServer] = []


def _after_fork_in_child() -> None:
    _FORK_LOCK.release()
    for server in _SERVERS:
        server.socket.close()
    _SERVERS.clear()


os.register_at_fork(
    before=_FORK_LOCK.acquire,
    after_in_parent=_FORK_LOCK.release,
    after_in_child=_after_fork_in_child,
)


@dataclass(slots=True)
class Pulse:
    """What the supervisor's loop reports on every turn (written by one thread, read by another)."""

    turned_at: float = 0.0
    workers: int = 0

    def beat(self, workers: int) -> None:
        """One turn of the loop, with the number of live worker children."""
        self.workers = workers
        self.turned_at = time.monotonic()

    def stalled_for(self) -> float:
        return time.monotonic() - self.turned_at if self.turned_at else float("inf")


class HealthPort:
    """Serves /live, /ready and /metrics for one supervisor; a no-op when the port is 0."""

    def __init__(self, settings: Settings, pulse: Pulse) -> None:
        self.settings = settings
        self.pulse = pulse
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HealthPort:
        """Bind and serve in a daemon thread; raise PortInUse when the port is taken."""
        port = self.settings.health_port
        if port == 0:
            return self
        handler = type("Handler", (_Handler,), {"health": self})
        try:
            server = ThreadingHTTPServer((self.settings.service_host, port), handler)
        except OSError as exc:
            raise PortInUse(
                f"health port {self.settings.service_host}:{port} is not available "
                f"({exc.strerror}): set PREFETCH_HEALTH_PORT to a free port, or 0 to turn it off"
            ) from None
        server.daemon_threads = True
        with _FORK_LOCK:
            _SERVERS.append(server)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.25}, daemon=True
        )
        self._thread.name = "health-port"
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with _FORK_LOCK:
            if server in _SERVERS:
                _SERVERS.remove(server)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HealthPort:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- checks (called from the server's threads) ---

    def live(self) -> tuple[int, dict[str, Any]]:
        stalled = self.pulse.stalled_for()
        ok = stalled < LIVE_STALL_S
        body = {"status": "alive" if ok else "stalled", "loopAgeMs": _ms(stalled)}
        return (200 if ok else 503), body

    def ready(self) -> tuple[int, dict[str, Any]]:
        stalled = self.pulse.stalled_for()
        workers = self.pulse.workers
        redis_up = self._redis_answers()
        ok = stalled < LIVE_STALL_S and workers >= 1 and redis_up
        body = {
            "status": "ready" if ok else "not ready",
            "workers": workers,
            "redis": "up" if redis_up else "down",
            "loopAgeMs": _ms(stalled),
        }
        return (200 if ok else 503), body

    def metrics(self) -> tuple[bytes, str]:
        with _FORK_LOCK:
            return render(self.settings.metrics_dir)

    def _redis_answers(self) -> bool:
        with _FORK_LOCK:
            try:
                client = redis.Redis.from_url(
                    self.settings.queue_redis_url,
                    db=self.settings.db_queue,
                    socket_connect_timeout=REDIS_TIMEOUT_S,
                    socket_timeout=REDIS_TIMEOUT_S,
                )
                try:
                    return bool(client.ping())
                finally:
                    client.close()
            except (redis.RedisError, OSError, ValueError):
                return False


def _ms(seconds: float) -> int | None:
    return None if seconds == float("inf") else round(seconds * 1000)


class _Handler(BaseHTTPRequestHandler):
    health: ClassVar[HealthPort]
    server_version = "prefetch-supervisor"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/live":
            self._json(*self.health.live())
        elif path == "/ready":
            self._json(*self.health.ready())
        elif path == "/metrics":
            body, content_type = self.health.metrics()
            self._send(200, body, content_type)
        else:
            self._json(404, {"status": "not found", "routes": ["/live", "/ready", "/metrics"]})

    def _json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: a probe every few seconds is not worth a log line (nor stderr's lock)."""
