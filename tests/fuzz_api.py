"""schemathesis against the live service: every route, a service token and a user token.

    .venv/bin/python -m tests.fuzz_api [--examples 30] [--seed 1]

Starts an embedded Valkey and `prefetch dev` (the sandbox timeline and CA, one worker, the
API) on free loopback ports, waits for /health/ready, then runs `schemathesis run` on its
/openapi.json twice: once with `Authorization: Bearer sandbox-service`, once with a user
token `sandbox-user-<uuid>`. Each run is bounded (`--examples` test cases per operation and
phase, a fixed seed) and applies the checks in CHECKS: no 5xx, and no status, content type,
header or body outside the document; invalid input must be refused with a 4xx and valid
input accepted; an undocumented method must be 405 with a true Allow; a secured route must
refuse a missing token; a deleted resource must stay gone. Prints what
was sent per operation and what was found, and exits 1 on any failure. Not collected by
pytest (CI runs it as a step of .ci/run: `make fuzz`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from prefetch.embedded import EmbeddedRedis

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "unsupported_method",
    "allow_header_conformance",
    "missing_required_header",
    "ignored_auth",
    "use_after_free",
    "ensure_resource_availability",
)
# The sandbox's fault users answer after 60 s; fuzzing must not wait that long for them.
PREFETCH_TIMEOUT_MS = 2000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, dev: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dev.poll() is not None:
            raise SystemExit(f"fuzz: prefetch dev exited with {dev.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health/ready", timeout=2) as rsp:
                if rsp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"fuzz: {url}/health/ready did not answer 200 within {timeout:.0f} s")


def start_dev(redis_url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port, timeline, ca = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "PREFETCH_SERVICE_HOST": "127.0.0.1",
        "PREFETCH_SERVICE_PORT": str(port),
        "TIMELINE_SERVICE_URL": f"http://127.0.0.1:{timeline}",
        "CA_URL": f"http://127.0.0.1:{ca}",
        "PREFETCH_WORKER_COUNT": "1",
        "PREFETCH_TIMEOUT": str(PREFETCH_TIMEOUT_MS),
        "PREFETCH_METRICS_DIR": str(workdir / "metrics"),
        "LOG_LEVEL": "warning",
    }
    log = (workdir / "dev.log").open("wb")
    dev = subprocess.Popen(
        [str(BIN / "prefetch"), "dev"],
        env=env,
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return dev, f"http://127.0.0.1:{port}"


def stop(dev: subprocess.Popen[bytes]) -> None:
    if dev.poll() is None:
        dev.send_signal(signal.SIGINT)
        try:
            dev.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait()


def schemathesis(
    url: str, token: str, own_user: str | None, report: Path, args: argparse.Namespace
) -> int:
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks"}
    if own_user is not None:
        env["FUZZ_OWN_USER"] = own_user
    command = [
        str(BIN / "schemathesis"),
        "run",
        f"{url}/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        str(args.examples),
        "--seed",
        str(args.seed),
        # One worker: with two, Python 3.11's ast.parse (Hypothesis describing a lambda) can
        # fail with "AST constructor recursion depth mismatch", an error of the tool's own.
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--header",
        f"Authorization: Bearer {token}",
        "--continue-on-failure",
        "--report",
        "ndjson",
        "--report-ndjson-path",
        str(report),
        "--no-color",
    ]
    print("fuzz:", " ".join(command).replace(token, token[:14] + "..."), flush=True)
    output = report.with_suffix(".log")
    with output.open("wb") as sink:
        code = subprocess.run(
            command, check=False, env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT
        ).returncode
    # schemathesis's own summary: its phases, errors and failures (the full output on failure).
    text = output.read_text(errors="replace")
    shown = text if code != 0 else text[text.find("=== SUMMARY ===") - 40 :]
    print(shown[-20_000:], flush=True)
    return code


def summarize(report: Path) -> tuple[Counter[str], Counter[str], list[str]]:
    """Requests by operation, responses by status, and the failed checks, from the ndjson."""
    sent: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    failures: list[str] = []
    for line in report.read_text().splitlines():
        event = json.loads(line)
        recorder = (event.get("ScenarioFinished") or {}).get("recorder") or {}
        label = str(recorder.get("label", "?"))
        for interaction in (recorder.get("interactions") or {}).values():
            sent[label] += 1
            response = interaction.get("response") or {}
            statuses[str(response.get("status_code", "no response"))] += 1
        for checks in (recorder.get("checks") or {}).values():
            for check in checks:
                if check.get("status") != "success":
                    failures.append(f"{label}: {check.get('name')}: {_reason(check)}")
    return sent, statuses, failures


def _reason(check: dict[str, Any]) -> str:
    info = check.get("failure_info") or {}
    failure = info.get("failure") if isinstance(info, dict) else None
    if isinstance(failure, dict):
        return str(failure.get("title") or failure.get("message") or failure)
    return str(info or check.get("status"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=30, help="test cases per operation")
    parser.add_argument("--seed", type=int, default=20261130)
    parser.add_argument("--keep", type=Path, help="copy the ndjson reports here")
    args = parser.parse_args()
    failed = False
    with tempfile.TemporaryDirectory(prefix="prefetch-fuzz-") as tmp, EmbeddedRedis() as redis:
        workdir = Path(tmp)
        dev, url = start_dev(redis.url, workdir)
        try:
            wait_ready(url, dev)
            own = str(uuid.UUID(int=args.seed))
            runs = (("service", "sandbox-service", None), ("user", f"sandbox-user-{own}", own))
            for kind, token, own_user in runs:
                report = workdir / f"fuzz-{kind}.ndjson"
                code = schemathesis(url, token, own_user, report, args)
                sent, statuses, failures = summarize(report)
                print(f"\nfuzz ({kind} token): {sum(sent.values())} requests, exit {code}")
                for label, count in sorted(sent.items()):
                    print(f"  {count:6d}  {label}")
                print("  statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())))
                print(f"  failures: {len(failures)}")
                for failure in failures[:20]:
                    print(f"    {failure[:300]}")
                if args.keep:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    (args.keep / report.name).write_bytes(report.read_bytes())
                failed = failed or code != 0
        finally:
            stop(dev)
            if failed:
                print("\nfuzz: prefetch dev's log (tail):")
                print((workdir / "dev.log").read_text(errors="replace")[-3000:])
    print("fuzz: " + ("FAILED" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
