"""Cached-read throughput: GET /api/cache/{userId} under wrk, beside a bare aiohttp handler.

Fills the hot tier (DB 4) with `--users` 100-post entries, starts `prefetch sandbox` (its CA
validates the bearer token once; the API caches the answer) and `prefetch api`, and drives
both the API and a bare aiohttp responder that returns the same bytes for any user id with
wrk (random user per request, `bench/wrk_users.lua`). Variants: a client without
Accept-Encoding ("plain") and one with `Accept-Encoding: gzip`, for each CACHE_COMPRESSION
asked for. Also runs redis-benchmark GET of a value of the entry's size on the same server:
the physical limit of one Redis. Prints a table, writes bench/results/reads-*.json. Nothing
is asserted; wrk shares the 2 CPUs with the server, so every number includes its cost.

    .venv/bin/python -m bench.bench_reads --duration 10 --compression both [--dev]

`vs bare` is each variant's req/s over the bare handler's serving the same bytes (gzip or
plain) in the same run: the ratios of docs/contract.md §7 (gzip client at least 0.75 with a
p99 under 5 ms, plain client at least 0.5). With `--dev` the API measured is the one of a whole
`prefetch dev` (its sandbox, the supervisor, workers and scheduler run beside it, their CPU in
`other CPU %`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from bench.common import (
    BENCH_DBS,
    ROOT,
    SERVICE_TOKEN,
    Service,
    Services,
    code_fingerprint,
    cpu_seconds,
    flush_bench_dbs,
    free_port,
    http_json,
    local_redis_pid,
    machine,
    memory_kb,
    print_table,
    redis_info,
    redis_target,
    save_result,
    service_env,
    start_sandbox,
    system_busy_seconds,
    titled,
    wait_http,
)
from engine.store import keys
from engine.store.entry import compress, new_tag, stamp
from engine.wire import cached_body
from sandbox import generate_posts

WRK_SCRIPT = ROOT / "bench" / "wrk_users.lua"
POSTS_PER_USER = 100
ENTRY_TTL_MS = 3_600_000


@dataclass
class WrkResult:
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p75_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    non_2xx: int = 0
    socket_errors: int = 0
    transfer_per_s: str = ""


@dataclass
class Variant:
    name: str
    target: str  # "api" or "bare"
    encoding: str  # what the client accepts: "plain" or "gzip"
    compression: str | None = None  # CACHE_COMPRESSION of the API run
    served: str = ""  # what came back: "plain" or "gzip"
    response_bytes: int = 0
    wrk: WrkResult | None = None
    server_cpu_us_per_req: float = 0.0
    wrk_cpu_pct: float = 0.0
    other_cpu_pct: float = 0.0  # CPU used meanwhile by processes outside this bench
    redis_cpu_us_per_req: float | None = None
    ratio_to_bare: float | None = None


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse_wrk(text: str) -> WrkResult:
    """Requests/s, latency percentiles and errors from `wrk --latency` output."""
    result = WrkResult()
    latency = r"([\d.]+)(us|ms|s|m|h)"
    for pct, attr in (("50", "p50_ms"), ("75", "p75_ms"), ("90", "p90_ms"), ("99", "p99_ms")):
        if match := re.search(rf"^\s+{pct}%\s+{latency}\s*$", text, re.MULTILINE):
            setattr(result, attr, _ms(match.group(1), match.group(2)))
    if match := re.search(rf"^\s+Latency\s+\S+\s+\S+\s+{latency}", text, re.MULTILINE):
        result.max_ms = _ms(match.group(1), match.group(2))
    if match := re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text):
        result.requests = int(match.group(1))
        result.seconds = _ms(match.group(2), match.group(3)) / 1000
    if match := re.search(r"Requests/sec:\s+([\d.]+)", text):
        result.rps = float(match.group(1))
    if match := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text):
        result.non_2xx = int(match.group(1))
    if match := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    ):
        result.socket_errors = sum(int(g) for g in match.groups())
    if match := re.search(r"Transfer/sec:\s+(\S+)", text):
        result.transfer_per_s = match.group(1)
    return result


def run_wrk(
    base: str,
    prefix: str,
    encoding: str,
    users_file: Path,
    args: argparse.Namespace,
    seconds: float,
) -> tuple[WrkResult, str, float]:
    """One wrk run; returns its parsed result, its output and the CPU seconds wrk used."""
    argv = [
        args.wrk,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(WRK_SCRIPT),
        base,
        "--",
        str(users_file),
        prefix,
        SERVICE_TOKEN,
        encoding,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return parse_wrk(done.stdout), done.stdout, used


# --- data -------------------------------------------------------------------------------------


def make_entries(count: int) -> dict[str, bytes]:
    """Plain response bodies of `count` fresh users (100 posts each, as the worker stores)."""
    now_ms = int(time.time() * 1000)
    return {
        user: cached_body(generate_posts(user, POSTS_PER_USER), now_ms, "hot", cached=True)
        for user in (str(uuid.uuid4()) for _ in range(count))
    }


def fill_hot(url: str, entries: dict[str, bytes], compression: str) -> int:
    """Store every entry in the hot tier the way the worker does (compressed as asked,
    stamped with an entity tag and its expiry); returns the mean size."""
    client = redis.Redis.from_url(url, db=BENCH_DBS["REDIS_DB_HOT"])
    total = 0
    expires_at = int(time.time() * 1000) + ENTRY_TTL_MS
    try:
        client.flushdb()
        pipe = client.pipeline(transaction=False)
        for n, (user, body) in enumerate(entries.items(), 1):
            encoded = compress(body) if compression == "gzip" else body
            stored = stamp(encoded, new_tag(), expires_at)
            total += len(stored)
            pipe.set(keys.timeline("hot", user), stored, px=ENTRY_TTL_MS)
            if n % 200 == 0:
                pipe.execute()
        pipe.execute()
    finally:
        client.close()
    return total // max(1, len(entries))


def check_response(url: str, encoding: str, user: str, expected: bytes) -> tuple[str, int]:
    """One GET: 200, a JSON body equal to what was stored, meta.cached true.

    Returns (served encoding, bytes on the wire)."""
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    if encoding == "gzip":
        headers["Accept-Encoding"] = "gzip"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as rsp:
        status, raw = rsp.status, rsp.read()
        served = "gzip" if rsp.headers.get("Content-Encoding") == "gzip" else "plain"
    if status != 200:
        raise SystemExit(f"GET {url}: status {status}")
    body = gzip.decompress(raw) if served == "gzip" else raw
    if encoding == "plain" and served == "gzip":
        raise SystemExit(f"GET {url}: gzip sent to a client that did not accept it")
    payload = json.loads(body)
    if payload.get("meta", {}).get("cached") is not True or not payload.get("success"):
        raise SystemExit(f"GET {url}: unexpected body head {body[:200]!r}")
    if payload["data"]["postsCount"] != POSTS_PER_USER or body != expected:
        raise SystemExit(f"GET {url}: body differs from the stored entry")
    return served, len(raw)


# --- redis-benchmark ---------------------------------------------------------------------------


def redis_benchmark(url: str, size: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """GET of a `size`-byte value with redis-benchmark, `-c connections`; None if unavailable."""
    tool = shutil.which("redis-benchmark") or shutil.which("valkey-benchmark")
    if tool is None:
        return None
    db = BENCH_DBS["REDIS_DB_HOT"]
    client = redis.Redis.from_url(url, db=db)
    try:  # without -r redis-benchmark GETs this very key; it must hold a value of the size
        client.set("key:__rand_int__", os.urandom(size), px=600_000)
    finally:
        client.close()
    parts = urlsplit(url)
    argv = [tool]
    if parts.scheme == "unix":
        argv += ["-s", parts.path]
    else:
        argv += ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
        if parts.scheme == "rediss":
            argv.append("--tls")
    if parts.password:
        argv += ["-a", parts.password, "--no-auth-warning"]
    argv += ["--dbnum", str(db), "-t", "get", "-d", str(size)]
    argv += ["-c", str(args.connections), "-n", str(args.redis_requests), "-q"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    out = done.stdout.replace("\r", "\n")
    matches = re.findall(
        r"GET: ([\d.]+) requests per second(?:, p50=([\d.]+) msec)?", out, re.IGNORECASE
    )
    if done.returncode != 0 or not matches:
        print(f"  ! redis-benchmark failed: {done.stderr.strip() or out.strip()}")
        return None
    rps, p50 = matches[-1]
    shown = [a if a != parts.password else "***" for a in argv]
    return {
        "size": size,
        "rps": float(rps),
        "p50_ms": float(p50) if p50 else None,
        "command": " ".join(shown),
    }


# --- the run ----------------------------------------------------------------------------------


def api_pids(api: Service) -> list[int]:
    """The API process and the children it forked (API_WORKERS > 1); under `prefetch dev`,
    only the API processes among its children."""
    found = titled("prefetch: api", ancestor=api.pid)
    if api.name.startswith("dev"):
        return sorted(found)
    return sorted({api.pid, *found})


def start_profile(
    variant: Variant, server_pids: list[int], args: argparse.Namespace
) -> subprocess.Popen[bytes] | None:
    """py-spy on the first server process for the measured run (--profile): collapsed stacks
    in the profile directory, one file per variant (py-spy's CPU cost is in `other CPU %`)."""
    if not args.profile:
        return None
    tool = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(args.profile) / f"{variant.name.replace(' ', '-')}-{variant.compression}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [tool, "record", "-p", str(server_pids[0]), "-d", str(args.duration), "-r", "250"]
    argv += ["-f", "raw", "-o", str(out), "--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(
    variant: Variant,
    base: str,
    prefix: str,
    server_pids: list[int],
    redis_pid: int | None,
    users_file: Path,
    args: argparse.Namespace,
) -> None:
    """Warm up, then one measured wrk run with the CPU time of the server and of Redis."""
    if args.warmup > 0:
        run_wrk(base, prefix, variant.encoding, users_file, args, args.warmup)
    cpu0 = sum(cpu_seconds(p) for p in server_pids)
    redis0 = cpu_seconds(redis_pid) if redis_pid else 0.0
    busy0 = system_busy_seconds()
    spy = start_profile(variant, server_pids, args)
    result, output, wrk_cpu = run_wrk(
        base, prefix, variant.encoding, users_file, args, args.duration
    )
    if spy is not None:
        spy.wait()
    busy = system_busy_seconds() - busy0
    cpu = sum(cpu_seconds(p) for p in server_pids) - cpu0
    redis_cpu = cpu_seconds(redis_pid) - redis0 if redis_pid else 0.0
    variant.wrk = result
    if result.requests:
        variant.server_cpu_us_per_req = cpu / result.requests * 1e6
        if redis_pid and variant.target == "api":
            variant.redis_cpu_us_per_req = redis_cpu / result.requests * 1e6
    seconds = max(result.seconds, 1e-9)
    variant.wrk_cpu_pct = 100 * wrk_cpu / seconds
    # Whatever else ran on the machine meanwhile (other users' jobs skew every number).
    variant.other_cpu_pct = max(0.0, 100 * (busy - cpu - redis_cpu - wrk_cpu) / seconds)
    errors = result.non_2xx + result.socket_errors
    note = f"  ! {result.non_2xx} non-2xx, {result.socket_errors} socket errors" if errors else ""
    print(
        f"  {variant.name:<28} {result.rps:>9.0f} req/s  p50 {result.p50_ms:.2f} ms  "
        f"p99 {result.p99_ms:.2f} ms{note}"
    )
    if args.verbose:
        print(output)


def run(args: argparse.Namespace) -> dict[str, Any]:
    compressions = ["gzip", "none"] if args.compression == "both" else [args.compression]
    variants: list[Variant] = []
    api_runs: list[dict[str, Any]] = []
    with redis_target(args.redis_url) as url, Services("reads") as services:
        flush_bench_dbs(url)
        redis_pid = local_redis_pid(url)
        print(
            f"Redis-compatible server {redis_info(url)['version']} at {url}, DBs 4-7 flushed; "
            f"code {code_fingerprint()}"
        )
        started = time.perf_counter()
        entries = make_entries(args.users)
        users = list(entries)
        users_file = services.logs / "users.txt"
        users_file.write_text("\n".join(users) + "\n")
        sample_plain = entries[users[0]]
        sample_gzip = compress(sample_plain)
        (services.logs / "bare-plain.json").write_bytes(sample_plain)
        (services.logs / "bare.json.gz").write_bytes(sample_gzip)
        print(
            f"{args.users} users' entries generated in {time.perf_counter() - started:.1f}s: "
            f"{len(sample_plain)} B JSON, {len(sample_gzip)} B gzip"
        )

        upstreams = start_sandbox(services, url)
        bare_port = free_port()
        bare = services.start(
            "bare",
            [
                sys.executable,
                "-m",
                "bench.common",
                "bare",
                "--port",
                str(bare_port),
                "--plain",
                str(services.logs / "bare-plain.json"),
                "--gzip",
                str(services.logs / "bare.json.gz"),
            ],
            {**os.environ, "PYTHONPATH": str(ROOT)},
        )
        bare_base = f"http://127.0.0.1:{bare_port}"
        wait_http(bare_base + "/health", bare)

        print("bare aiohttp responder (same bytes for every user id):")
        for encoding in ("plain", "gzip"):
            variant = Variant(f"bare {encoding}", "bare", encoding, served=encoding)
            path = f"/{encoding}/{users[0]}"
            variant.served, variant.response_bytes = check_response(
                bare_base + path, encoding, users[0], sample_plain
            )
            measure(variant, bare_base, f"/{encoding}/", [bare.pid], redis_pid, users_file, args)
            variants.append(variant)

        for compression in compressions:
            stored_mean = fill_hot(url, entries, compression)
            port = free_port()
            env = service_env(
                url,
                PREFETCH_SERVICE_HOST="127.0.0.1",
                PREFETCH_SERVICE_PORT=port,
                API_WORKERS=args.api_workers,
                CACHE_COMPRESSION=compression,
                PREFETCH_METRICS_DIR=services.logs / f"metrics-{compression}",
                SERVICE_CERTIFICATE_TOKEN=SERVICE_TOKEN,
                LOG_LEVEL=args.api_log_level,
                **upstreams,
            )
            if args.dev:
                # The whole of `prefetch dev` (its own sandbox, the supervisor with its workers
                # and scheduler, the API) on this Redis; reads are measured on its API child.
                dev_upstreams = {
                    "TIMELINE_SERVICE_URL": f"http://127.0.0.1:{free_port()}",
                    "CA_URL": f"http://127.0.0.1:{free_port()}",
                }
                env.update(dev_upstreams, PREFETCH_HEALTH_PORT=str(free_port()))
                api = services.prefetch("dev", env, name=f"dev-{compression}")
                upstreams_now = dev_upstreams
            else:
                api = services.prefetch("api", env, name=f"api-{compression}")
                upstreams_now = upstreams
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/health/ready", api)
            time.sleep(0.3)  # let API_WORKERS > 1 children all bind
            pids = api_pids(api)
            ca_before = http_json(upstreams_now["CA_URL"] + "/__stats")["validateCalls"]
            print(
                f"API, CACHE_COMPRESSION={compression} ({stored_mean} B stored per entry), "
                f"{args.api_workers} worker(s), pids {pids}:"
            )
            for encoding in ("plain", "gzip"):
                variant = Variant(f"api {encoding} client", "api", encoding, compression)
                for user in users[:: max(1, len(users) // 20)]:
                    variant.served, variant.response_bytes = check_response(
                        f"{base}/api/cache/{user}", encoding, user, entries[user]
                    )
                measure(variant, base, "/api/cache/", pids, redis_pid, users_file, args)
                variants.append(variant)
            ca_calls = http_json(upstreams_now["CA_URL"] + "/__stats")["validateCalls"]
            ca_calls -= ca_before
            rss = {pid: memory_kb(pid, "VmRSS") for pid in pids}
            hwm = {pid: memory_kb(pid, "VmHWM") for pid in pids}
            code = services.stop(api)
            problems = [
                line
                for line in api.log.read_text(errors="replace").splitlines()
                if "Traceback" in line or " ERROR " in line or " CRITICAL " in line
            ]
            api_runs.append(
                {
                    "compression": compression,
                    "stored_bytes_mean": stored_mean,
                    "pids": pids,
                    "rss_kb": rss,
                    "hwm_kb": hwm,
                    "ca_validate_calls": ca_calls,
                    "exit_code": code,
                    "log_problems": problems[:20],
                    "log": str(api.log),
                }
            )
            print(
                f"  API RSS after the run: {', '.join(f'{v / 1024:.1f} MB' for v in rss.values())}"
                f" (peak {max(hwm.values()) / 1024:.1f} MB); CA validate calls: {ca_calls}; "
                f"exit code {code}"
            )
            for line in problems[:5]:
                print(f"  ! API log: {line}")

        redis_runs = []
        if not args.skip_redis_benchmark:
            sizes = {len(sample_plain)}
            if "gzip" in compressions:
                sizes.add(len(sample_gzip))
            for size in sorted(sizes, reverse=True):
                found = redis_benchmark(url, size, args)
                if found:
                    redis_runs.append(found)
                    print(f"redis-benchmark GET {size} B: {found['rps']:.0f}/s")

    for v in variants:
        bare_rps = next(
            (b.wrk.rps for b in variants if b.target == "bare" and b.served == v.served and b.wrk),
            None,
        )
        if v.wrk and bare_rps:
            v.ratio_to_bare = v.wrk.rps / bare_rps
    return {"variants": variants, "api_runs": api_runs, "redis_benchmark": redis_runs}


def report(args: argparse.Namespace, found: dict[str, Any]) -> None:
    variants: list[Variant] = found["variants"]
    print()
    print(
        f"GET /api/cache/{{userId}}: {args.users} users, 100 posts, wrk -t{args.threads} "
        f"-c{args.connections} -d{args.duration:g}s, API_WORKERS={args.api_workers}, "
        f"{os.cpu_count()} CPUs shared with wrk; "
        f"{'under `prefetch dev`' if args.dev else 'the API alone'}, LOG_LEVEL={args.api_log_level}"
    )
    headers = ["variant", "served", "bytes", "req/s", "p50 ms", "p99 ms", "vs bare", "errors"]
    headers += ["srv CPU µs/req", "Redis CPU µs/req", "wrk CPU %", "other CPU %"]
    rows = []
    for v in variants:
        w = v.wrk or WrkResult()
        label = v.name if v.compression is None else f"{v.name} (store {v.compression})"
        rows.append(
            [
                label,
                v.served,
                str(v.response_bytes),
                f"{w.rps:.0f}",
                f"{w.p50_ms:.2f}",
                f"{w.p99_ms:.2f}",
                "-" if v.ratio_to_bare is None else f"{v.ratio_to_bare:.2f}",
                str(w.non_2xx + w.socket_errors),
                f"{v.server_cpu_us_per_req:.0f}",
                "-" if v.redis_cpu_us_per_req is None else f"{v.redis_cpu_us_per_req:.1f}",
                f"{v.wrk_cpu_pct:.0f}",
                f"{v.other_cpu_pct:.0f}",
            ]
        )
    for r in found["redis_benchmark"]:
        rows.append(
            [
                f"redis-benchmark GET {r['size']} B",
                "-",
                str(r["size"]),
                f"{r['rps']:.0f}",
                "-" if r["p50_ms"] is None else f"{r['p50_ms']:.2f}",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
            ]
        )
    print_table(headers, rows)
    for run_ in found["api_runs"]:
        rss = max(run_["rss_kb"].values()) / 1024
        print(
            f"API ({run_['compression']}): RSS {rss:.1f} MB after the run, "
            f"CA validate calls {run_['ca_validate_calls']}"
        )
    for line in target_lines(variants):
        print(line)


# docs/contract.md §7, per client kind: (least ratio to the bare handler, greatest p99 ms).
TARGETS = {"gzip": (0.75, 5.0), "plain": (0.5, None)}


def target_lines(variants: list[Variant]) -> list[str]:
    """One line per API variant of a gzip store: its ratio and p99 against §7, met or MISSED."""
    lines = []
    for v in variants:
        if v.target != "api" or v.compression != "gzip" or v.wrk is None:
            continue
        least, p99_max = TARGETS[v.encoding]
        ratio = v.ratio_to_bare or 0.0
        met = ratio >= least and (p99_max is None or v.wrk.p99_ms < p99_max)
        p99 = "" if p99_max is None else f", p99 {v.wrk.p99_ms:.2f} ms (< {p99_max:g})"
        lines.append(
            f"§7 {v.encoding} client: {ratio:.2f} of the bare handler (>= {least}){p99}: "
            f"{'met' if met else 'MISSED'}"
        )
    return lines


def parser() -> argparse.ArgumentParser:
    """The command line (`python -m bench` builds its arguments with it too)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per variant")
    parser.add_argument("--warmup", type=int, default=2, help="seconds before each variant")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument("--compression", choices=("gzip", "none", "both"), default="both")
    parser.add_argument(
        "--redis-url", default=None, help="default: $REDIS_URL, else an embedded Valkey"
    )
    parser.add_argument(
        "--api-log-level",
        default="warning",
        help="the API's LOG_LEVEL: info writes an access log line per request (to its log file)",
    )
    parser.add_argument("--redis-requests", type=int, default=200_000)
    parser.add_argument("--skip-redis-benchmark", action="store_true")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    parser.add_argument("--verbose", action="store_true", help="print wrk's own output")
    parser.add_argument(
        "--dev",
        action="store_true",
        help="measure the API of a whole `prefetch dev` (sandbox, workers, scheduler, API)",
    )
    parser.add_argument(
        "--profile",
        default=None,
        help="a directory: py-spy's collapsed stacks of the API for each measured API variant",
    )
    return parser


def main() -> None:
    args = parser().parse_args()
    if shutil.which(args.wrk) is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")

    found = run(args)
    report(args, found)
    payload = {
        "bench": "reads",
        "args": vars(args),
        "machine": machine(),
        "variants": [asdict(v) for v in found["variants"]],
        "api_runs": found["api_runs"],
        "redis_benchmark": found["redis_benchmark"],
    }
    print(f"saved {save_result('reads', payload)}")


if __name__ == "__main__":
    main()
