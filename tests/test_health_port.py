"""The supervisor's health port: /live, /ready and /metrics, in-process and on `prefetch worker`."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from engine.errors import PortInUse
from engine.health_port import LIVE_STALL_S, HealthPort, Pulse
from engine.settings import Settings
from tests.conftest import closed_port
from tests.engine_support import Engine, EngineProcess, clean_env, wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bindable(port: int) -> bool:
    """Whether a server could listen on the port now (SO_REUSEADDR, as servers bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def get(url: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url) as response,
    ):
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


@pytest.fixture
def health_settings(redis_url: str) -> Settings:
    return Settings().with_overrides(
        service_host="127.0.0.1", health_port=free_port(), redis_url=redis_url, metrics_dir=""
    )


@pytest.fixture
def pulse() -> Pulse:
    return Pulse()


@pytest.fixture
def health(health_settings: Settings, pulse: Pulse) -> Iterator[str]:
    with HealthPort(health_settings, pulse):
        yield f"http://127.0.0.1:{health_settings.health_port}"


async def test_live_follows_the_supervisor_loop(health: str, pulse: Pulse) -> None:
    status, body = await get(f"{health}/live")
    assert status == 503 and body["status"] == "stalled"  # the loop never turned yet
    pulse.beat(workers=2)
    status, body = await get(f"{health}/live")
    assert status == 200 and body["status"] == "alive"
    pulse.turned_at = time.monotonic() - LIVE_STALL_S - 1  # a loop stuck for too long
    status, body = await get(f"{health}/live")
    assert status == 503 and body["loopAgeMs"] > LIVE_STALL_S * 1000


async def test_ready_needs_a_live_worker_and_redis(health: str, pulse: Pulse) -> None:
    pulse.beat(workers=0)
    status, body = await get(f"{health}/ready")
    assert status == 503
    assert body == {
        "status": "not ready",
        "workers": 0,
        "redis": "up",
        "loopAgeMs": body["loopAgeMs"],
    }
    pulse.beat(workers=1)
    status, body = await get(f"{health}/ready")
    assert status == 200 and body["status"] == "ready" and body["workers"] == 1


async def test_ready_fails_when_redis_does_not_answer(redis_url: str) -> None:
    settings = Settings().with_overrides(
        service_host="127.0.0.1",
        health_port=free_port(),
        redis_url=f"redis://127.0.0.1:{closed_port()}",
    )
    pulse = Pulse()
    pulse.beat(workers=2)
    with HealthPort(settings, pulse):
        status, body = await get(f"http://127.0.0.1:{settings.health_port}/ready")
        live, _ = await get(f"http://127.0.0.1:{settings.health_port}/live")
    assert status == 503 and body["redis"] == "down" and body["workers"] == 2
    assert live == 200  # Redis down is not a reason to restart the pod


async def test_unknown_paths_are_404_and_the_port_is_released_on_stop(
    health_settings: Settings, pulse: Pulse
) -> None:
    port = health_settings.health_port
    with HealthPort(health_settings, pulse):
        status, body = await get(f"http://127.0.0.1:{port}/nope")
        assert status == 404 and "/ready" in body["routes"]
    assert bindable(port)  # free again at once


def test_a_port_taken_at_bind_time_raises_port_in_use(
    health_settings: Settings, pulse: Pulse
) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", health_settings.health_port))
        other.listen()
        with pytest.raises(PortInUse, match="PREFETCH_HEALTH_PORT"):
            HealthPort(health_settings, pulse).start()


def test_port_zero_serves_nothing(pulse: Pulse) -> None:
    with HealthPort(Settings().with_overrides(health_port=0), pulse) as health:
        assert health._server is None


# --- on a real supervisor -------------------------------------------------------------------


@pytest_asyncio.fixture
async def engine(tmp_path: Path, redis_url: str) -> AsyncIterator[Engine]:
    async with Engine.open(tmp_path, redis_url) as harness:
        yield harness


def listening_inode(port: int) -> str:
    """The socket inode of the TCP listener on `port` (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
            return fields[9]
    raise AssertionError(f"nothing listens on {port}")


def socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


@pytest.mark.timeout(90)
async def test_a_worker_pod_answers_its_probes_and_workers_do_not_hold_the_port(
    engine: Engine,
) -> None:
    port = free_port()
    supervisor: EngineProcess = await engine.start_worker(
        PREFETCH_HEALTH_PORT=str(port), PREFETCH_SERVICE_HOST="127.0.0.1"
    )
    base = f"http://127.0.0.1:{port}"

    async def ready() -> Any:
        status, body = await get(f"{base}/ready")
        return body if status == 200 else None

    body = await wait_for(ready, 20, "the supervisor's /ready")
    assert body["workers"] == 2 and body["redis"] == "up"
    assert (await get(f"{base}/live"))[0] == 200
    status, text = await get(f"{base}/metrics")
    assert status == 200 and "# HELP" in text

    # The probe command a container health check runs finds the role by its title.
    probe = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "prefetch.cli", "probe", "worker"],
        env=clean_env(PREFETCH_HEALTH_PORT=str(port)),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr

    # Only the supervisor holds the listening socket; its forked workers closed their copy.
    inode = listening_inode(port)
    assert inode in socket_inodes(supervisor.pid)
    for index, pid in supervisor.workers().items():
        assert inode not in socket_inodes(pid), f"worker {index} holds the health port"

    # A worker killed and respawned (a fork after the server started) closes it too.
    old = supervisor.workers()[1]
    os.kill(old, signal.SIGKILL)
    new = await wait_for(
        lambda: (pid := supervisor.workers().get(1)) != old and pid, 20, "worker 1 to come back"
    )
    assert inode not in socket_inodes(new)
    assert (await get(f"{base}/ready"))[0] == 200

    # SIGTERM: the supervisor drains, stops serving and exits 0.
    supervisor.proc.send_signal(signal.SIGTERM)
    assert await supervisor.wait_exit(40) == 0
    assert bindable(port)
