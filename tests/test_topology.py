"""The pod topology's own parts (deploy/topology): its network of real Linux namespaces, its
teardown on every way out, and the audit that must catch two leaders enqueuing at once.

The namespace tests need root, as the topology does (CI runs as root); they fail, never skip,
without it. The full run is `python -m deploy.topology test` (a CI step of its own)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.topology import netns
from deploy.topology.audit import lease_spans, overlaps
from deploy.topology.netns import Network, TopologyError
from engine.strategies.leader import FencedEnqueue

ROOT = Path(__file__).resolve().parents[1]
ECHO_PORT = 7707
SERVER = f"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {ECHO_PORT})); s.listen()
while True:
    c, _ = s.accept(); c.sendall(b"pong"); c.close()
"""
CLIENT = f"""
import socket, sys
with socket.create_connection((sys.argv[1], {ECHO_PORT}), timeout=1.5) as c:
    sys.exit(0 if c.recv(4) == b"pong" else 1)
"""


def _in(network: Network, host: str, code: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", network.hosts[host].netns, sys.executable, "-c", code, *args]


def _reaches(network: Network, source: str, target: str) -> bool:
    address = network.hosts[target].address
    return subprocess.run(_in(network, source, CLIENT, address), timeout=20).returncode == 0


def _namespaces() -> set[str]:
    return set(os.listdir(netns.NETNS_DIR)) if netns.NETNS_DIR.is_dir() else set()


def test_interleaved_or_out_of_order_leases_are_reported() -> None:
    def log(*entries: tuple[int, str, int]) -> list[FencedEnqueue]:
        return [FencedEnqueue(token, who, at) for token, who, at in entries]

    clean = lease_spans(log((1, "wrk1:7", 100), (1, "wrk1:7", 900), (2, "wrk2:8", 950)))
    assert [(s.token, s.enqueues, s.first_ms, s.last_ms) for s in clean] == [
        (1, 2, 100, 900),
        (2, 1, 950, 950),
    ]
    assert overlaps(clean) == []
    # Lease 1 enqueued again after lease 2 had begun: two leaders in the same interval.
    both = lease_spans(log((1, "wrk1:7", 100), (2, "wrk2:8", 500), (1, "wrk1:7", 600)))
    assert len(overlaps(both)) == 1 and "lease 1 (wrk1:7)" in overlaps(both)[0]
    # An older token enqueuing after a newer one: a fence that let a stale leader through.
    backwards = lease_spans(log((2, "wrk2:8", 100), (1, "wrk1:7", 200)))
    assert len(overlaps(backwards)) == 1


@pytest.mark.netns
def test_hosts_reach_each_other_until_cut_and_teardown_leaves_nothing() -> None:
    network = Network({"a": 2, "b": 3, "c": 4})
    try:
        network.create(owner=os.getpid())
        assert network.state_file.exists()
        server = subprocess.Popen(_in(network, "a", SERVER))
        deadline = time.monotonic() + 20
        while not _reaches(network, "b", "a"):
            assert server.poll() is None and time.monotonic() < deadline, "server never answered"
        assert network.pids("a") == [server.pid]
        network.cut("a", "b")  # a drops b's packets both ways; c still gets through
        assert not _reaches(network, "b", "a")
        assert _reaches(network, "c", "a")
        network.restore("a", "b")
        assert _reaches(network, "b", "a")
    finally:
        problems = network.teardown()
    assert problems == []
    server.wait(5)  # killed by the teardown, not by this test
    assert server.returncode == -signal.SIGTERM
    assert not _namespaces() & set(network.namespaces())
    assert not network.state_file.exists()


@pytest.mark.netns
def test_a_run_whose_owner_died_is_found_and_removed() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    network = Network({"a": 2})
    network.create(owner=dead.pid)
    stale = [run for run in netns.stale_runs() if run["run"] == network.run_id]
    assert len(stale) == 1
    assert netns.remove_run(stale[0]) == []
    assert not _namespaces() & set(network.namespaces())
    assert not any(run["run"] == network.run_id for run in netns.recorded_runs())


@pytest.mark.netns
def test_a_run_that_cannot_make_its_network_fails_and_leaves_nothing(tmp_path: Path) -> None:
    # An `ip` that makes the hub namespace, then refuses the bridge: a half-built network.
    fake = tmp_path / "ip"
    real = subprocess.run(["which", "ip"], capture_output=True, text=True).stdout.strip()
    fake.write_text(
        f'#!/bin/sh\ncase "$*" in *bridge*) echo "no bridges here" >&2; exit 2;; esac\n'
        f'exec {real} "$@"\n'
    )
    fake.chmod(0o755)
    before = _namespaces()
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    done = subprocess.run(
        [sys.executable, "-m", "deploy.topology", "test"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "topology: " in done.stderr and "no bridges here" in done.stderr
    assert "every namespace and process removed" in done.stdout
    run_id = done.stdout.split("topology run ", 1)[1].split(":", 1)[0]
    assert not {ns for ns in _namespaces() - before if run_id in ns}
    assert not any(run["run"] == run_id for run in netns.recorded_runs())


def test_a_network_needs_root() -> None:
    if os.geteuid() == 0:
        # Root here (CI and the test machine): check the refusal in a child that gives root
        # up after importing (a checkout in a private folder, as a fresh clone under mktemp
        # is, would not be readable by the unprivileged user).
        code = (
            "import os; from deploy.topology.netns import Network; "
            "os.setegid(65534); os.seteuid(65534); Network({'a': 2}).create(None)"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1 and "need root" in done.stderr, done.stderr
    else:
        with pytest.raises(TopologyError, match="need root"):
            Network({"a": 2}).create(None)
