"""`prefetch probe`: the container health check, one command that fits every role.

One image runs three roles, and a Dockerfile HEALTHCHECK cannot know which one a container
was started as. The probe finds out from the process titles every role sets
(`prefetch: api`, `prefetch: supervisor`, `prefetch: sandbox`, `prefetch: dev`) and asks
that role's own health route on the port the settings give, so a changed
PREFETCH_SERVICE_PORT moves the check with it.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from engine.settings import Settings

TIMEOUT_S = 2.0
EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
# title prefix -> role; `dev` first: it runs all the others below it.
_TITLES = (
    ("prefetch: dev", "dev"),
    ("prefetch: api", "api"),
    ("prefetch: supervisor", "worker"),
    ("prefetch: sandbox", "sandbox"),
)


def run_probe(settings: Settings, target: str | None, proc: Path = Path("/proc")) -> int:
    """Check `target` (or the role found running); print one line; 0 healthy, 1 not."""
    role = target or running_role(proc)
    if role is None:
        print("probe: no prefetch role is running here", file=sys.stderr)
        return EXIT_UNHEALTHY
    urls = probe_urls(role, settings)
    if not urls:
        print(f"probe: {role} has nothing to probe: set PREFETCH_HEALTH_PORT", file=sys.stderr)
        return EXIT_UNHEALTHY
    for url in urls:
        problem = _problem(url)
        if problem:
            print(f"probe: {role} unhealthy: {url}: {problem}", file=sys.stderr)
            return EXIT_UNHEALTHY
    print(f"probe: {role} healthy ({', '.join(urls)})")
    return EXIT_HEALTHY


def running_role(proc: Path = Path("/proc")) -> str | None:
    """The role of the prefetch processes visible here (a container sees only its own)."""
    titles = set()
    for entry in proc.iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                titles.add((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
            except (OSError, UnicodeDecodeError):
                continue
    for prefix, role in _TITLES:
        if any(title.startswith(prefix) for title in titles):
            return role
    return None


def probe_urls(role: str, settings: Settings) -> list[str]:
    """The health URLs that must answer 200 for `role` to be healthy."""
    local = _local_host(settings.service_host)
    if role in ("api", "dev"):
        return [f"http://{local}:{settings.service_port}/health/ready"]
    if role == "worker":
        if settings.health_port == 0:
            return []
        return [f"http://{local}:{settings.health_port}/ready"]
    return [f"{settings.timeline_url}/health", f"{settings.ca_url}/health"]


def _local_host(bind_host: str) -> str:
    """Where a process beside the server reaches it: loopback for a wildcard bind."""
    if bind_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind_host == "::":
        return "[::1]"
    return f"[{bind_host}]" if ":" in bind_host else bind_host


def _problem(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return None if response.status == 200 else f"status {response.status}"
    except urllib.error.HTTPError as exc:
        return f"status {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"no answer ({reason})"
