"""The `prefetch` command line: one subcommand per role, each with its own `--help`.

Arguments choose the role only; every setting comes from the environment (and `.env`), read
once into `Settings`, so a role behaves the same whether started here, in a container or by
the tests.
"""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "exprsn-prefetch"

_ROLES: dict[str, tuple[str, str, str]] = {
    # role: (one-line help, description, the settings that matter most for it)
    "api": (
        "serve the HTTP API",
        "Serve the HTTP API (reads, prefetch control, health, /metrics). API_WORKERS "
        "processes share the port; they enqueue jobs and never consume them.",
        "PREFETCH_SERVICE_HOST, PREFETCH_SERVICE_PORT, API_WORKERS, REDIS_URL, CA_URL, "
        "TIMELINE_SERVICE_URL, PREFETCH_METRICS_DIR",
    ),
    "worker": (
        "run the job supervisor and its worker processes",
        "Run the supervisor: it forks PREFETCH_WORKER_COUNT worker processes (default: the "
        "CPUs this process may use, from its affinity and cgroup quota), restarts any that "
        "die, drains them on SIGTERM and kills them on a second signal. With "
        "PREFETCH_HEALTH_PORT set it serves /live, /ready and /metrics there.",
        "PREFETCH_WORKER_COUNT, PREFETCH_JOB_CONCURRENCY, PREFETCH_HEALTH_PORT, "
        "PREFETCH_SHUTDOWN_TIMEOUT, REDIS_URL, TIMELINE_SERVICE_URL, SERVICE_CERTIFICATE_TOKEN",
    ),
    "dev": (
        "run everything on this machine (embedded Valkey, sandbox, workers, API)",
        "Run the whole service on one machine with no setup: an embedded Valkey unless "
        "REDIS_URL or REDIS_HOST is set, the sandbox timeline and CA, the supervisor and the "
        "API. Binds 127.0.0.1 unless PREFETCH_SERVICE_HOST says otherwise (the sandbox's "
        "'sandbox-service' token has every permission). Ctrl-C stops all of it.",
        "PREFETCH_SERVICE_PORT, PREFETCH_SERVICE_HOST, TIMELINE_SERVICE_URL, CA_URL, "
        "REDIS_URL, SANDBOX_LATENCY_MS, SANDBOX_JITTER_MS, SANDBOX_ERROR_RATE",
    ),
    "sandbox": (
        "serve only the simulated timeline and CA",
        "Serve the simulated timeline service and CA on the hosts and ports of "
        "TIMELINE_SERVICE_URL and CA_URL, for load tests, benchmarks and containers.",
        "TIMELINE_SERVICE_URL, CA_URL, SANDBOX_LATENCY_MS, SANDBOX_JITTER_MS, SANDBOX_ERROR_RATE",
    ),
}


def package_version() -> str:
    """The installed distribution's version (`unknown` when run from an uninstalled tree)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """`prefetch [--version] ROLE`, with `prefetch ROLE --help` for each role."""
    parser = argparse.ArgumentParser(
        prog="prefetch",
        description="exprsn-prefetch: timeline prefetching and caching. Settings come from "
        "the environment and a .env file in the working directory (see .env.example).",
        epilog="Exit codes: 0 stopped cleanly, 1 failed while running, 2 bad setting or a "
        "port already in use (one line on stderr).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    roles = parser.add_subparsers(dest="role", metavar="ROLE", required=True)
    for role, (summary, description, variables) in _ROLES.items():
        roles.add_parser(
            role, help=summary, description=description, epilog=f"Main settings: {variables}."
        )
    probe = roles.add_parser(
        "probe",
        help="exit 0 if the role running beside it is healthy (container health checks)",
        description="Check the role running in this container (or the one named) the way a "
        "health check should: the API's /health/ready on PREFETCH_SERVICE_PORT, the "
        "supervisor's /ready on PREFETCH_HEALTH_PORT, the sandbox's two /health routes. "
        "Without a target it finds the role from the process titles ('prefetch: api', ...). "
        "Exit 0 healthy, 1 not.",
    )
    probe.add_argument(
        "target",
        nargs="?",
        choices=("api", "worker", "sandbox", "dev"),
        help="the role to check (default: the one found running)",
    )
    return parser
