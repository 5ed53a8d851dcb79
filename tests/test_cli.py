"""The `prefetch` command line: per-role help, --version, busy ports, dev's bind address, probe."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from engine.settings import Settings
from prefetch.cli import dev_bind_host
from prefetch.ports import listeners
from prefetch.probe import probe_urls, running_role
from tests.engine_support import clean_env

ROLES = ("api", "worker", "dev", "sandbox", "probe")


def prefetch(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m prefetch.cli ARGS` in a scratch directory with only `env` configured."""
    return subprocess.run(
        [sys.executable, "-m", "prefetch.cli", *args],
        env=clean_env(**env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@contextlib.contextmanager
def held_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port some other program listens on for the duration."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def assert_one_line_exit_2(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("role", ROLES)
def test_each_role_has_its_own_help(tmp_path: Path, role: str) -> None:
    result = prefetch(tmp_path, role, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: prefetch {role} [-h]"), result.stdout
    top = prefetch(tmp_path, "--help").stdout
    assert result.stdout != top


def test_version_comes_from_the_package_metadata(tmp_path: Path) -> None:
    result = prefetch(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"prefetch {version('exprsn-prefetch')}"


def test_no_role_or_an_unknown_one_is_a_usage_error(tmp_path: Path) -> None:
    assert prefetch(tmp_path).returncode == 2
    unknown = prefetch(tmp_path, "serve")
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr


def test_a_busy_api_port_stops_the_api_with_one_line_and_exit_2(tmp_path: Path) -> None:
    with held_port() as port:
        result = prefetch(
            tmp_path,
            "api",
            PREFETCH_SERVICE_HOST="127.0.0.1",
            PREFETCH_SERVICE_PORT=str(port),
            PREFETCH_METRICS_DIR=str(tmp_path / "metrics"),
        )
    assert_one_line_exit_2(result, f"127.0.0.1:{port}", "already in use", "PREFETCH_SERVICE_PORT")


def test_a_port_held_on_loopback_also_blocks_the_wildcard_bind(tmp_path: Path) -> None:
    with held_port("127.0.0.1") as port:
        result = prefetch(
            tmp_path,
            "api",
            PREFETCH_SERVICE_HOST="0.0.0.0",
            PREFETCH_SERVICE_PORT=str(port),
            PREFETCH_METRICS_DIR=str(tmp_path / "metrics"),
        )
    assert_one_line_exit_2(result, "PREFETCH_SERVICE_PORT")


def test_a_busy_sandbox_port_stops_the_sandbox_with_one_line_and_exit_2(tmp_path: Path) -> None:
    with held_port() as port:
        result = prefetch(
            tmp_path,
            "sandbox",
            TIMELINE_SERVICE_URL="http://127.0.0.1:0",
            CA_URL=f"http://127.0.0.1:{port}",
        )
    assert_one_line_exit_2(result, f"127.0.0.1:{port}", "CA_URL")


def test_a_busy_port_stops_dev_before_it_starts_anything(tmp_path: Path) -> None:
    with held_port() as port:
        result = prefetch(
            tmp_path,
            "dev",
            PREFETCH_SERVICE_PORT=str(port),
            TIMELINE_SERVICE_URL="http://127.0.0.1:0",
            CA_URL="http://127.0.0.1:0",
            PREFETCH_METRICS_DIR=str(tmp_path / "metrics"),
        )
    assert_one_line_exit_2(result, "PREFETCH_SERVICE_PORT")
    assert result.stdout == ""  # no banner: nothing was started


def test_a_busy_health_port_stops_the_supervisor_with_one_line_and_exit_2(
    tmp_path: Path,
) -> None:
    with held_port() as port:
        result = prefetch(
            tmp_path,
            "worker",
            PREFETCH_SERVICE_HOST="127.0.0.1",
            PREFETCH_HEALTH_PORT=str(port),
            PREFETCH_METRICS_DIR=str(tmp_path / "metrics"),
        )
    assert_one_line_exit_2(result, "PREFETCH_HEALTH_PORT")


def test_dev_binds_loopback_unless_told_otherwise() -> None:
    settings = Settings()
    assert settings.service_host == "0.0.0.0"
    assert dev_bind_host(settings, {}).service_host == "127.0.0.1"
    assert dev_bind_host(settings, {"PREFETCH_SERVICE_HOST": " "}).service_host == "127.0.0.1"
    told = dev_bind_host(settings, {"PREFETCH_SERVICE_HOST": "0.0.0.0"})
    assert told.service_host == "0.0.0.0"


def test_each_role_checks_the_ports_it_will_listen_on() -> None:
    settings = Settings().with_overrides(
        service_port=3105,
        health_port=3106,
        timeline_url="http://127.0.0.1:3104",
        ca_url="http://127.0.0.1:0",
    )
    ports = {role: [port for _, port, _ in listeners(role, settings)] for role in ROLES}
    assert ports == {
        "api": [3105],
        "worker": [3106],
        "sandbox": [3104],  # port 0 is "any free port": nothing to check
        "dev": [3104, 3106, 3105],
        "probe": [],
    }


def test_the_probe_asks_each_role_on_its_configured_port() -> None:
    settings = Settings().with_overrides(
        service_port=3999,
        health_port=0,
        timeline_url="http://127.0.0.1:3004",
        ca_url="http://127.0.0.1:3000",
    )
    assert probe_urls("api", settings) == ["http://127.0.0.1:3999/health/ready"]
    assert probe_urls("worker", settings) == []  # no health port: nothing honest to ask
    worker = settings.with_overrides(health_port=3006, service_host="::")
    assert probe_urls("worker", worker) == ["http://[::1]:3006/ready"]
    assert probe_urls("sandbox", settings) == [
        "http://127.0.0.1:3004/health",
        "http://127.0.0.1:3000/health",
    ]


def test_the_probe_finds_the_role_from_the_process_titles(tmp_path: Path) -> None:
    def process(pid: int, title: str) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(title.encode() + b"\0")

    (tmp_path / "self").mkdir()
    assert running_role(tmp_path) is None
    process(7, "prefetch: worker 1")
    assert running_role(tmp_path) is None  # a worker child alone is not a role
    process(1, "prefetch: supervisor")
    assert running_role(tmp_path) == "worker"
    process(12, "prefetch: dev")
    assert running_role(tmp_path) == "dev"


def test_the_probe_never_exits_2_which_docker_reserves(tmp_path: Path) -> None:
    result = prefetch(tmp_path, "probe", "api", PREFETCH_SERVICE_PORT="http")
    assert result.returncode == 1
    assert "PREFETCH_SERVICE_PORT" in result.stderr


def test_the_probe_fails_with_one_line_when_the_role_does_not_answer(tmp_path: Path) -> None:
    with held_port() as port:  # listening but never answering would hang; a closed port:
        pass
    result = prefetch(tmp_path, "probe", "api", PREFETCH_SERVICE_PORT=str(port))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"127.0.0.1:{port}/health/ready" in result.stderr
