"""`make load`: the verdict on error rate and p99, and the target run against a real API."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from loadtests.thresholds import Bounds, verdict
from tests.conftest import ApiClient

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_within_both_bounds_passes() -> None:
    assert verdict(10_000, 100, 99.0, Bounds(0.01, 100)) == []  # exactly 1%: still passes


def test_an_error_rate_over_the_bound_fails() -> None:
    problems = verdict(10_000, 101, 5.0, Bounds(0.01, 100))
    assert problems == ["error rate 1.01% (101/10000) over 1.00%"]


def test_a_p99_over_the_bound_fails() -> None:
    assert verdict(500, 0, 120.0, Bounds(0.01, 100)) == ["p99 120 ms over 100 ms"]


def test_a_run_that_sent_nothing_fails() -> None:
    assert verdict(0, 0, 0.0, Bounds()) == ["no request was sent"]


def test_bounds_come_from_the_environment_and_reject_nonsense() -> None:
    assert Bounds.from_env({}) == Bounds(0.01, 100.0)
    assert Bounds.from_env({"LOAD_MAX_ERROR_RATE": "0.05", "LOAD_P99_MS": "250"}) == Bounds(
        0.05, 250.0
    )
    for bad in ({"LOAD_P99_MS": "fast"}, {"LOAD_P99_MS": "0"}, {"LOAD_MAX_ERROR_RATE": "2"}):
        with pytest.raises(ValueError):
            Bounds.from_env(bad)


async def make_load(
    api: ApiClient, token: str = "sandbox-service", **variables: str
) -> tuple[int, str]:
    """`make load` against the test's API for 3 s with 4 clients; (exit code, output)."""
    args = [f"{name}={value}" for name, value in variables.items()]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOAD_", "PREFETCH_"))}
    env["PREFETCH_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(
        "make",
        "--no-print-directory",
        "load",
        "DURATION=3s",
        "USERS=4",
        "SPAWN_RATE=4",
        f"HOST={api.url}",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, output.decode(errors="replace")


@pytest.mark.timeout(120)
async def test_make_load_passes_within_bounds_and_fails_over_the_p99_bound(
    api: ApiClient,
) -> None:
    code, output = await make_load(api, P99_MS="10000")
    assert code == 0, output[-2000:]
    assert "load: passed" in output

    code, output = await make_load(api, P99_MS="0.001")
    assert code != 0, output[-2000:]
    assert "load: FAILED: p99" in output


@pytest.mark.timeout(120)
async def test_make_load_fails_when_requests_fail(api: ApiClient) -> None:
    # An expired token: every request is answered 401, a 100% error rate.
    code, output = await make_load(api, token="sandbox-expired", P99_MS="10000")
    assert code != 0, output[-2000:]
    assert "load: FAILED: error rate" in output
