"""Check, before anything starts, that every port a role will listen on is free.

A busy port is an operator's mistake like a malformed setting: it gets one line naming the
variable and exit 2, instead of a traceback from deep inside a forked child (and, for
`prefetch dev`, instead of half of the processes running). The check binds each address the
way the servers will (SO_REUSEADDR, so a port in TIME_WAIT is free; never SO_REUSEPORT, which
would let us share a port with a stranger) and lets go at once.
"""

from __future__ import annotations

import errno
import socket
from urllib.parse import urlsplit

from engine.errors import PortInUse
from engine.settings import Settings

Listener = tuple[str, int, str]  # host, port, the variable that sets it


def listeners(role: str, settings: Settings) -> list[Listener]:
    """The fixed ports `role` will bind (port 0, "any free port", is left out)."""
    api = [(settings.service_host, settings.service_port, "PREFETCH_SERVICE_PORT")]
    health = [(settings.service_host, settings.health_port, "PREFETCH_HEALTH_PORT")]
    sandbox = [
        (*_host_port(settings.timeline_url), "TIMELINE_SERVICE_URL"),
        (*_host_port(settings.ca_url), "CA_URL"),
    ]
    chosen = {
        "api": api,
        "worker": health,
        "sandbox": sandbox,
        "dev": sandbox + health + api,
    }.get(role, [])
    return [(host, port, variable) for host, port, variable in chosen if port != 0]


def ensure_ports_free(role: str, settings: Settings) -> None:
    """Raise PortInUse, naming the variable, for the first port of `role` that is taken."""
    for host, port, variable in listeners(role, settings):
        problem = _bind_problem(host, port)
        if problem:
            shown = f"[{host}]" if ":" in host else host
            raise PortInUse(
                f"cannot listen on {shown or '*'}:{port} ({problem}): set {variable} to a free port"
            )


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    port = parts.port if parts.port is not None else (443 if parts.scheme == "https" else 80)
    return parts.hostname or "127.0.0.1", port


def _bind_problem(host: str, port: int) -> str | None:
    """None if every address of host:port can be bound now, else why not."""
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return f"cannot resolve the host: {exc.strerror}"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return "already in use"
                return exc.strerror or str(exc)
    return None
