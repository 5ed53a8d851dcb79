"""Serve the sandbox timeline and CA on loopback, in-process or as `prefetch sandbox`."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Self
from urllib.parse import urlsplit

import setproctitle
import uvloop
from aiohttp import web

from engine.process import stop_on_signals
from engine.settings import Settings
from sandbox.ca import SandboxTokens, ca_app
from sandbox.config import SandboxSettings, load_sandbox_settings
from sandbox.timeline import timeline_app

# Pending slow-user requests (60 s) must not hold up a stop for that long.
SHUTDOWN_TIMEOUT_S = 1.0


def _host_port(url: str) -> tuple[str, int, str]:
    """Host, port (0: any free port) and path prefix of an http(s) URL."""
    parts = urlsplit(url)
    port = parts.port if parts.port is not None else (443 if parts.scheme == "https" else 80)
    return parts.hostname or "127.0.0.1", port, parts.path.rstrip("/")


def _url(host: str, port: int, prefix: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{prefix}"


class SandboxServer:
    """The simulated timeline service and CA, each on the host and port of its URL."""

    def __init__(self, settings: Settings, sandbox: SandboxSettings) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self.tokens = SandboxTokens()
        self._runners: list[web.AppRunner] = []
        self._timeline_url = settings.timeline_url.rstrip("/")
        self._ca_url = settings.ca_url.rstrip("/")

    @property
    def timeline_url(self) -> str:
        """The timeline service's base URL, with the real port once started."""
        return self._timeline_url

    @property
    def ca_url(self) -> str:
        """The CA's base URL, with the real port once started."""
        return self._ca_url

    def settings_for_clients(self) -> Settings:
        """The settings with both URLs replaced by the bound ones (useful with port 0)."""
        return self.settings.with_overrides(timeline_url=self.timeline_url, ca_url=self.ca_url)

    async def start(self) -> None:
        """Bind both services; raise OSError if a port is taken."""
        if self._runners:
            raise RuntimeError("SandboxServer already started")
        host, port, prefix = _host_port(self.settings.timeline_url)
        ca_host, ca_port, ca_prefix = _host_port(self.settings.ca_url)
        try:
            tl_port = await self._serve(
                timeline_app(self.settings, self.sandbox, self.tokens), host, port
            )
            self._timeline_url = _url(host, tl_port, prefix)
            bound_ca = await self._serve(ca_app(self.tokens, prefix=ca_prefix), ca_host, ca_port)
            self._ca_url = _url(ca_host, bound_ca, ca_prefix)
        except BaseException:
            await self.stop()
            raise

    async def _serve(self, app: web.Application, host: str, port: int) -> int:
        # handler_cancellation: a client that gives up on a slow user frees its handler.
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            handler_cancellation=True,
        )
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, host, port).start()
        return int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Close both services; pending requests get SHUTDOWN_TIMEOUT_S to finish."""
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def _serve_until_signalled(server: SandboxServer) -> None:
    try:
        with stop_on_signals() as stop:
            await server.start()
            knobs = server.sandbox
            print(f"sandbox timeline: {server.timeline_url}", flush=True)
            print(f"sandbox CA:       {server.ca_url}", flush=True)
            print(
                f"sandbox knobs:    latency {knobs.latency_ms} ms, jitter {knobs.jitter_ms} ms, "
                f"error rate {knobs.error_rate:g}",
                flush=True,
            )
            await stop.wait()
    finally:
        await server.stop()


def run_sandbox(settings: Settings, env: Mapping[str, str]) -> int:
    """Run the sandbox upstreams until SIGINT/SIGTERM; ConfigError propagates to the CLI."""
    sandbox = load_sandbox_settings(env)
    setproctitle.setproctitle("prefetch: sandbox")
    server = SandboxServer(settings, sandbox)
    try:
        uvloop.run(_serve_until_signalled(server))
    except OSError as exc:
        print(f"sandbox: cannot listen: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
