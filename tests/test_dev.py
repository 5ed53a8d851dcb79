"""`prefetch dev` from nothing: embedded Valkey, sandbox, workers and API, stopped by Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, token: str | None = None) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp{,6} shows them) listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) == port and fields[3] == "0A":
                found.add(address)
    return found


def descendants(root: int) -> dict[int, str]:
    """pid -> command line (process title) of every live descendant of `root`."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: dict[int, str] = {}
    frontier = {root}
    while frontier:
        children = {pid for pid, ppid in parents.items() if ppid in frontier}
        for pid in children:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            found[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
        frontier = children
    return found


def test_dev_starts_everything_on_embedded_defaults_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    port, timeline, ca = free_port(), free_port(), free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PREFETCH_SERVICE_PORT": str(port),
        "TIMELINE_SERVICE_URL": f"http://127.0.0.1:{timeline}",
        "CA_URL": f"http://127.0.0.1:{ca}",
        "PREFETCH_WORKER_COUNT": "1",
        "PREFETCH_METRICS_DIR": str(tmp_path / "metrics"),
        "LOG_LEVEL": "warning",
    }  # no REDIS_URL / REDIS_HOST: the embedded server must come up
    started: dict[int, str] = {}
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefetch.cli", "dev"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = get(f"{base}/health/ready")[0] == 200
            except OSError:
                ready = False
            if ready:
                break
            time.sleep(0.2)
        assert ready, "prefetch dev never became ready"
        # The API may be ready before the supervisor's first worker has named itself.
        roles = ("prefetch: api", "prefetch: supervisor", "prefetch: worker 1", "prefetch: sandbox")
        while True:
            started = descendants(proc.pid)
            titles = " | ".join(started.values())
            if all(role in titles for role in roles) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for role in roles:
            assert role in titles, titles
        assert "prefetch: sandbox" in titles, titles
        # No PREFETCH_SERVICE_HOST: the API (and its all-powerful sandbox token) is loopback only.
        assert listening_addresses(port) == {"0100007F"}

        user = str(uuid.uuid4())
        status, body = get(f"{base}/api/cache/{user}", "sandbox-service")
        assert status == 200, body
        assert body["meta"] == {
            "cached": False,
            "tier": "warm",
            "fetchedAt": body["meta"]["fetchedAt"],
        }  # type: ignore[index]
        status, body = get(f"{base}/api/cache/{user}", "sandbox-service")
        assert status == 200 and body["meta"]["cached"] is True  # type: ignore[index]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output = proc.communicate(timeout=40)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output = proc.communicate()[0].decode(errors="replace")
            pytest.fail(f"prefetch dev did not stop on Ctrl-C:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    assert "sandbox-service" in output  # the banner lists the tokens
    assert f"{base}" in output
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in started):
        time.sleep(0.1)
    left = [started[pid] for pid in started if Path(f"/proc/{pid}").exists()]
    assert left == [], f"Ctrl-C left processes behind: {left}"


def test_api_workers_share_the_port_and_stop_together(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "REDIS_URL": redis_url,
        "API_WORKERS": "2",
        "PREFETCH_SERVICE_PORT": str(port),
        "PREFETCH_SERVICE_HOST": "127.0.0.1",
        "PREFETCH_METRICS_DIR": str(tmp_path / "metrics"),
        "LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefetch.cli", "api"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            children = descendants(proc.pid)
            if len(children) == 2:
                try:
                    if get(f"http://127.0.0.1:{port}/health/ready")[0] == 200:
                        break
                except OSError:
                    pass
            time.sleep(0.1)
        children = descendants(proc.pid)
        assert sorted(children.values()) == ["prefetch: api", "prefetch: api"], children
        # Two processes listen on the one port (SO_REUSEPORT) and it keeps answering.
        for _ in range(20):
            assert get(f"http://127.0.0.1:{port}/health/live")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert proc.returncode == 0, output[-2000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in children):
        time.sleep(0.1)
    assert [pid for pid in children if Path(f"/proc/{pid}").exists()] == []
