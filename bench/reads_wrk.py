"""wrk runs of bench_reads, and a variant's account over its interleaved slices.

The machine's CPU speed drifts by up to 2x over tens of seconds, so bench_reads never measures
a variant in one stretch: each variant's time is cut into slices that run round-robin with the
bare handler's, and the numbers here add the slices back up. Counts (requests, seconds, CPU
seconds, errors) are summed, so req/s and CPU per request are those of the whole time; a
latency percentile cannot be summed, so it is the median over the slices, with the worst
slice's p99 beside it.
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import ROOT, SERVICE_TOKEN
from bench.procfs import cpu_seconds, system_busy_seconds

WRK_SCRIPT = ROOT / "bench" / "wrk_users.lua"


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
    bytes_read: int = 0
    p99_ms_max: float = 0.0  # the worst slice's p99 (= p99_ms for one run)
    percentiles: str = "one run"  # over several slices: "median of N slices"


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_UNITS_BYTES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse_wrk(text: str) -> WrkResult:
    """Requests/s, latency percentiles and errors from `wrk --latency` output."""
    result = WrkResult()
    latency = r"([\d.]+)(us|ms|s|m|h)"
    for pct, attr in (("50", "p50_ms"), ("75", "p75_ms"), ("90", "p90_ms"), ("99", "p99_ms")):
        if match := re.search(rf"^\s+{pct}%\s+{latency}\s*$", text, re.MULTILINE):
            setattr(result, attr, _ms(match.group(1), match.group(2)))
    result.p99_ms_max = result.p99_ms
    if match := re.search(rf"^\s+Latency\s+\S+\s+\S+\s+{latency}", text, re.MULTILINE):
        result.max_ms = _ms(match.group(1), match.group(2))
    if match := re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text):
        result.requests = int(match.group(1))
        result.seconds = _ms(match.group(2), match.group(3)) / 1000
    if match := re.search(r"requests in [^,]+, ([\d.]+)([KMGT]?B) read", text):
        result.bytes_read = int(float(match.group(1)) * _UNITS_BYTES[match.group(2)])
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


def combine(results: list[WrkResult]) -> WrkResult:
    """The slices as one run: counts summed, percentiles the median over the slices."""
    if len(results) == 1:
        return results[0]
    total = WrkResult(
        requests=sum(r.requests for r in results),
        seconds=sum(r.seconds for r in results),
        non_2xx=sum(r.non_2xx for r in results),
        socket_errors=sum(r.socket_errors for r in results),
        bytes_read=sum(r.bytes_read for r in results),
        max_ms=max(r.max_ms for r in results),
        p99_ms_max=max(r.p99_ms for r in results),
        percentiles=f"median of {len(results)} slices",
    )
    for attr in ("p50_ms", "p75_ms", "p90_ms", "p99_ms"):
        setattr(total, attr, statistics.median(getattr(r, attr) for r in results))
    if total.seconds > 0:
        total.rps = total.requests / total.seconds
        total.transfer_per_s = f"{total.bytes_read / total.seconds / 1024**2:.2f}MB"
    return total


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


# --- slices -------------------------------------------------------------------------------------


@dataclass
class Slice:
    """One measured wrk run of a variant, with the CPU seconds spent meanwhile."""

    wrk: WrkResult
    server_cpu_s: float
    redis_cpu_s: float | None  # None: Redis runs elsewhere
    wrk_cpu_s: float
    busy_s: float  # every CPU of the machine, whoever used it


@dataclass
class Variant:
    name: str
    target: str  # "api" or "bare"
    encoding: str  # what the client accepts: "plain" or "gzip"
    compression: str | None = None  # CACHE_COMPRESSION of the API run
    served: str = ""  # what came back: "plain" or "gzip"
    response_bytes: int = 0
    wrk: WrkResult | None = None  # the slices combined
    server_cpu_us_per_req: float = 0.0
    wrk_cpu_pct: float = 0.0
    other_cpu_pct: float = 0.0  # CPU used meanwhile by processes outside this bench
    redis_cpu_us_per_req: float | None = None
    ratio_to_bare: float | None = None  # over the bare variant of the same section and bytes
    section: str | None = None  # the CACHE_COMPRESSION whose API this ran interleaved with
    slices: list[Slice] = field(default_factory=list)

    def add(self, part: Slice) -> None:
        """Count one more slice: every figure is recomputed over all of them."""
        self.slices.append(part)
        self.wrk = combine([s.wrk for s in self.slices])
        requests = self.wrk.requests
        seconds = max(self.wrk.seconds, 1e-9)
        cpu = sum(s.server_cpu_s for s in self.slices)
        redis_cpu = sum(s.redis_cpu_s or 0.0 for s in self.slices)
        wrk_cpu = sum(s.wrk_cpu_s for s in self.slices)
        busy = sum(s.busy_s for s in self.slices)
        if requests:
            self.server_cpu_us_per_req = cpu / requests * 1e6
            if self.target == "api" and self.slices[0].redis_cpu_s is not None:
                self.redis_cpu_us_per_req = redis_cpu / requests * 1e6
        self.wrk_cpu_pct = 100 * wrk_cpu / seconds
        # Whatever else ran on the machine meanwhile (other users' jobs skew every number).
        self.other_cpu_pct = max(0.0, 100 * (busy - cpu - redis_cpu - wrk_cpu) / seconds)


def start_profile(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy on one server process for one slice: collapsed stacks (raw) written to `out`."""
    tool = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    argv = [tool, "record", "-p", str(pid), "-d", str(seconds), "-r", "250"]
    argv += ["-f", "raw", "-o", str(out), "--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure_slice(
    variant: Variant,
    base: str,
    prefix: str,
    server_pids: list[int],
    redis_pid: int | None,
    users_file: Path,
    args: argparse.Namespace,
    seconds: int,
    profile: Path | None = None,
) -> str:
    """One measured wrk run of `seconds`, added to the variant; returns wrk's output.

    With `profile`, py-spy records the first server process meanwhile and its collapsed
    stacks are appended to that file (raw stacks add up: one file holds every slice)."""
    cpu0 = sum(cpu_seconds(p) for p in server_pids)
    redis0 = cpu_seconds(redis_pid) if redis_pid else 0.0
    busy0 = system_busy_seconds()
    part = None if profile is None else profile.with_suffix(".slice")
    spy = None if part is None else start_profile(server_pids[0], seconds, part)
    result, output, wrk_cpu = run_wrk(base, prefix, variant.encoding, users_file, args, seconds)
    if spy is not None:
        spy.wait()
    busy = system_busy_seconds() - busy0
    cpu = sum(cpu_seconds(p) for p in server_pids) - cpu0
    redis_cpu = cpu_seconds(redis_pid) - redis0 if redis_pid else None
    if profile is not None and part is not None and part.exists():
        with profile.open("a") as whole:
            whole.write(part.read_text())
        part.unlink()
    variant.add(Slice(result, cpu, redis_cpu, wrk_cpu, busy))
    return output


# One variant of a section and where it is measured: (variant, base URL, path prefix, pids).
Endpoint = tuple[Variant, str, str, list[int]]


def profile_path(variant: Variant, args: argparse.Namespace) -> Path | None:
    """Where --profile collects an API variant's stacks (none for the bare handler)."""
    if not args.profile or variant.target != "api":
        return None
    out = Path(args.profile) / f"{variant.name.replace(' ', '-')}-{variant.compression}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def interleave(
    section: list[Endpoint], redis_pid: int | None, users_file: Path, args: argparse.Namespace
) -> None:
    """Every variant of the section, one slice each per round, round after round; a variant
    warms up once, just before its first slice. Sets each API variant's ratio to the bare
    variant of this section that served the same bytes."""
    slices = slice_seconds(args.duration, args.rounds)
    for endpoint in section:
        profile = profile_path(endpoint[0], args)
        if profile is not None:
            profile.unlink(missing_ok=True)
    for n, seconds in enumerate(slices):
        for variant, base, prefix, pids in section:
            if n == 0 and args.warmup > 0:
                run_wrk(base, prefix, variant.encoding, users_file, args, args.warmup)
            output = measure_slice(
                variant,
                base,
                prefix,
                pids,
                redis_pid,
                users_file,
                args,
                seconds,
                profile_path(variant, args),
            )
            w = variant.slices[-1].wrk
            errors = w.non_2xx + w.socket_errors
            note = f"  ! {w.non_2xx} non-2xx, {w.socket_errors} socket errors" if errors else ""
            print(
                f"  {n + 1}/{len(slices)} {variant.name:<18} {seconds:>3} s {w.rps:>9.0f} req/s  "
                f"p50 {w.p50_ms:.2f} ms  p99 {w.p99_ms:.2f} ms{note}"
            )
            if args.verbose:
                print(output)
    bare = [v for v, *_ in section if v.target == "bare"]
    for variant, *_ in section:
        ceiling = next((b for b in bare if b.served == variant.served and b.wrk), None)
        if variant.target == "api" and variant.wrk and ceiling and ceiling.wrk:
            variant.ratio_to_bare = variant.wrk.rps / ceiling.wrk.rps
        w = variant.wrk or WrkResult()
        ratio = "" if variant.ratio_to_bare is None else f", {variant.ratio_to_bare:.2f} of bare"
        print(
            f"  = {variant.name:<18} {w.seconds:>5.1f} s {w.rps:>9.0f} req/s  "
            f"p99 {w.p99_ms:.2f} ms (median), {w.p99_ms_max:.2f} ms (worst){ratio}"
        )


def slice_seconds(duration: int, rounds: int) -> list[int]:
    """`duration` cut into `rounds` whole seconds (the longer ones first); every slice lasts
    at least 1 s, so a duration shorter than the rounds is stretched to one second each."""
    rounds = max(1, rounds)
    each, extra = divmod(duration, rounds)
    if each == 0:
        return [1] * rounds
    return [each + (1 if n < extra else 0) for n in range(rounds)]
