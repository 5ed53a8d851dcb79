"""`python -m bench`: every benchmark against its ceiling, one JSON, PNG charts.

Parts (`--parts`, all by default, in this order):

- components: CPU µs per job of each step of the unit of work (bench_components);
- reads:      cached reads under wrk, beside a bare aiohttp handler and redis-benchmark GET
              (bench_reads);
- prefetch:   single and batch messages at 0 and 50 ms upstream, the engine beside a plain
              asyncio loop doing the same work, jobs enqueued first (bench_prefetch matrix);
- peers:      BullMQ on Node doing the same work (bench_peers); with prefetch chosen too,
              its rounds run between the engine's, so that both see the same machine;
- tick:       one strategy scheduler tick, first and second (bench_tick).

Writes `bench/results/bench-<timestamp>/result.json` and one PNG per chart beside it, prints
the docs/contract.md §7 targets met or missed, and with `--publish DIR` copies the charts to
DIR (the committed `docs/bench/` that tuning.md embeds: publish only a run taken on a quiet
machine).
Everything here shares the machine's CPUs with the load generator; `other CPU %` in the JSON
says how much else ran meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, local_redis_pid, machine, print_table, redis_target
from bench.prefetch_run import paired_ratios

PARTS = ("components", "reads", "prefetch", "peers", "tick")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes of every part: the full run, or `--quick` (about five minutes in all)."""
    quick = args.quick
    jobs = args.jobs or (1_500 if quick else 20_000)
    rounds = args.rounds or (1 if quick else 3)
    return {
        "components": {"users": 500 if quick else 2_000, "rounds": 1 if quick else 3},
        "reads": {
            "duration": 3 if quick else 10,
            "warmup": 1 if quick else 2,
            "users": 200 if quick else 1_000,
            "redis_requests": 50_000 if quick else 200_000,
        },
        "prefetch": {"jobs": jobs, "rounds": rounds},
        "peers": {"jobs": jobs, "rounds": rounds},
        "tick": {
            "tracked": 100_000 if quick else 1_000_000,
            "active": [1_000, 10_000] if quick else [10_000, 100_000],
        },
    }


def run_components(sizes: dict[str, Any], url: str) -> dict[str, Any]:
    from bench import bench_components

    found = bench_components.measure(sizes["users"], sizes["rounds"], 100, url)
    bench_components.report(found)
    return found


def run_reads(sizes: dict[str, Any], url: str) -> dict[str, Any]:
    from dataclasses import asdict

    from bench import bench_reads

    wrk = shutil.which("wrk")
    if wrk is None:
        print("  ! reads skipped: wrk is not installed (apt-get install wrk)")
        return {"skipped": "wrk is not installed"}
    args = bench_reads.parser().parse_args(
        [
            f"--duration={sizes['duration']}",
            f"--warmup={sizes['warmup']}",
            f"--users={sizes['users']}",
            f"--redis-requests={sizes['redis_requests']}",
            f"--wrk={wrk}",
        ]
    )
    args.redis_url = url
    found = bench_reads.run(args)
    bench_reads.report(args, found)
    return {
        "args": {k: v for k, v in vars(args).items() if k != "redis_url"},
        "variants": [asdict(v) for v in found["variants"]],
        "api_runs": found["api_runs"],
        "redis_benchmark": found["redis_benchmark"],
    }


def _prefetch_args(sizes: dict[str, Any], url: str) -> argparse.Namespace:
    return argparse.Namespace(
        jobs=sizes["jobs"],
        rounds=sizes["rounds"],
        latencies=(0, 50),
        workers=2,
        concurrency=100,
        batch_size=50,
        api_concurrency=256,
        compression="gzip",
        redis_url=url,
        no_baseline=False,
        enqueue_first=True,
        mode="single",
        latency_ms=0,
    )


def _peer_args(sizes: dict[str, Any]) -> argparse.Namespace:
    return argparse.Namespace(
        jobs=sizes["jobs"],
        rounds=sizes["rounds"],
        latency_ms=[0, 50],
        workers=2,
        concurrency=100,
        uv_threads=4,
    )


def run_prefetch(
    sizes: dict[str, Any], url: str, with_peer: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The prefetch matrix, and with `with_peer` the BullMQ peer's rounds between its rounds.

    The peer's round at a latency runs right after the engine's rounds at that latency, so
    the engine / BullMQ ratios compare runs minutes apart at most, not a whole matrix apart:
    this machine's speed drifts by up to 1.6x over tens of minutes (tuning.md).
    """
    from bench import bench_peers, bench_prefetch

    args = _prefetch_args(sizes, url)
    peer_args = _peer_args(sizes)
    peer_rounds: dict[int, list[Any]] = {latency: [] for latency in peer_args.latency_ms}
    with contextlib.ExitStack() as stack:
        peer = stack.enter_context(bench_peers.Peer()) if with_peer else None

        def between(n: int, latency: int) -> None:
            if peer is not None and peer.skipped is None and latency in peer_rounds:
                label = f"round {n + 1}/{args.rounds}"
                peer_rounds[latency].append(peer.round(latency, peer_args, label))

        cells = bench_prefetch.matrix(args, between)
        found = peer.result(peer_args, peer_rounds) if peer is not None else None
    bench_prefetch.print_matrix(args, cells)
    if found is not None:
        bench_peers.report(found)
    return {"jobs": args.jobs, "rounds": args.rounds, "enqueue_first": True, "cells": cells}, found


def run_peers(sizes: dict[str, Any]) -> dict[str, Any]:
    from bench import bench_peers

    found = bench_peers.measure(_peer_args(sizes))
    bench_peers.report(found)
    return found


def run_tick(sizes: dict[str, Any], url: str) -> list[dict[str, Any]]:
    import asyncio

    from bench import bench_tick
    from bench.common import flush_bench_dbs

    pid = local_redis_pid(url)
    found = [
        asyncio.run(bench_tick.scenario(url, pid, sizes["tracked"], active))
        for active in sizes["active"]
    ]
    flush_bench_dbs(url)
    for scenario in found:
        for name in ("first", "second"):
            t = scenario[name]
            print(
                f"  tick {scenario['tracked']:,} tracked, {scenario['active']:,} active, {name}: "
                f"{t['wallMs']:.0f} ms wall, scheduler {t['schedulerCpuMs']:.0f} ms CPU, "
                f"Redis {t['redisCpuMs']:.0f} ms CPU"
            )
    return found


# --- the verdict --------------------------------------------------------------------------------


def targets(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """docs/contract.md §7's targets, each with the measured value and whether it is met."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: str, met: bool | None) -> None:
        out.append({"target": name, "measured": value, "goal": target, "met": met})

    reads = parts.get("reads") or {}
    for v in reads.get("variants", []):
        if v["target"] != "api" or not v.get("ratio_to_bare"):
            continue
        if v["compression"] == "gzip" and v["encoding"] == "gzip":
            add(
                "reads, gzip client / bare",
                v["ratio_to_bare"],
                ">= 0.75",
                v["ratio_to_bare"] >= 0.75,
            )
            p99 = v["wrk"]["p99_ms"]
            add("reads, gzip client p99 ms", p99, "< 5", p99 < 5)
        if v["encoding"] == "plain" and v["compression"] == "gzip":
            add(
                "reads, plain client / bare",
                v["ratio_to_bare"],
                ">= 0.5",
                v["ratio_to_bare"] >= 0.5,
            )
    for run in reads.get("api_runs", []):
        rss = max(run["rss_kb"].values()) / 1024
        add(f"API RSS MB (store {run['compression']})", rss, "< 100", rss < 100)
    prefetch = parts.get("prefetch") or {}
    peers = parts.get("peers") or {}
    for cell in prefetch.get("cells", []):
        where = f"{cell['mode']}, {cell['latency_ms']} ms"
        if cell.get("cpu_ratio"):
            add(
                f"engine CPU / plain loop, {where}",
                cell["cpu_ratio"],
                "<= 1.15",
                cell["cpu_ratio"] <= 1.15,
            )
        rss = cell["engine"]["peak_rss_mb"]
        add(f"worker peak RSS MB, {where}", rss, "< 150", rss < 150)
        peer = next(
            (c for c in peers.get("cells", []) if c["latency_ms"] == cell["latency_ms"]), None
        )
        if peer and peer["jobs_per_s"]:
            goal = 1.3 if cell["mode"] == "single" else 1.6
            ratio = bullmq_ratio(cell, peer)
            add(f"engine / BullMQ jobs/s, {where}", ratio, f">= {goal}", ratio >= goal)
    return out


def bullmq_ratio(cell: dict[str, Any], peer: dict[str, Any]) -> float:
    """Engine / BullMQ jobs/s: the median of each round's ratio when the peer ran a round beside
    each of the engine's (`run_prefetch`), as the CPU ratio pairs the engine with its plain
    loop; else (or when no round has both figures) the ratio of the two medians."""
    engine = [r["jobs_per_s"] for r in cell["engine"].get("rounds", [])]
    theirs = [r["jobs_per_s"] for r in peer.get("rounds", [])]
    ratios = paired_ratios(engine, theirs) if len(engine) == len(theirs) else []
    if ratios:
        return statistics.median(ratios)
    return float(cell["engine"]["jobs_per_s"] / peer["jobs_per_s"])


def print_targets(found: list[dict[str, Any]]) -> None:
    rows = [
        [
            t["target"],
            "-" if t["measured"] is None else f"{t['measured']:.2f}",
            t["goal"],
            {True: "met", False: "MISSED", None: "-"}[t["met"]],
        ]
        for t in found
    ]
    print()
    print("docs/contract.md §7 targets, this run:")
    print_table(["target", "measured", "goal", ""], rows)


# --- charts -------------------------------------------------------------------------------------


def draw(parts: dict[str, Any], out: Path, note: str) -> list[Path]:
    """One PNG per chart the parts allow; none (with a message) without matplotlib."""
    try:
        from bench import charts
    except ImportError:
        print("  ! no charts: matplotlib is not installed (pip install -e '.[bench]')")
        return []
    drawn: list[Path] = []
    cells = (parts.get("prefetch") or {}).get("cells", [])
    peers = parts.get("peers")
    if "variants" in (parts.get("reads") or {}):
        drawn.append(charts.reads_chart(parts["reads"], out / "reads.png", note))
    if cells:
        drawn.append(charts.prefetch_chart(cells, peers, out / "prefetch.png", note))
    if parts.get("components"):
        drawn.append(
            charts.components_chart(parts["components"], cells, peers, out / "components.png", note)
        )
    if parts.get("tick"):
        drawn.append(charts.tick_chart(parts["tick"], out / "tick.png", note))
    return drawn


def publish(charts: list[Path], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for chart in charts:
        shutil.copy(chart, target / chart.name)
    print(f"published {len(charts)} charts to {target}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small runs, one round (~5 min)")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    parser.add_argument("--jobs", type=int, default=None, help="prefetch and peers: jobs per run")
    parser.add_argument("--rounds", type=int, default=None, help="prefetch and peers: rounds")
    parser.add_argument("--redis-url", default=None, help="default: an embedded Valkey")
    parser.add_argument(
        "--publish", type=Path, default=None, help="copy the charts to this directory"
    )
    parser.add_argument(
        "--charts-from",
        type=Path,
        default=None,
        help="draw (and publish) the charts of an earlier result.json instead of running",
    )
    args = parser.parse_args(argv)
    if args.charts_from is not None:
        result = json.loads(args.charts_from.read_text())
        out = args.charts_from.parent
    else:
        chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
        unknown = sorted(set(chosen) - set(PARTS))
        if unknown:
            parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
        result = run(args, chosen)
        out = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_targets(result["targets"])
    m = result["machine"]
    note = (
        f"{m['when']}, code {m['code']}, {m['cpus']} CPUs shared by the load generator and "
        f"the system under test{' (quick run)' if result['args'].get('quick') else ''}"
    )
    drawn = draw(result["parts"], out, note)
    print(f"\nresult: {out / 'result.json'}")
    for chart in drawn:
        print(f"chart:  {chart}")
    if args.publish is not None:
        publish(drawn, args.publish)


def run(args: argparse.Namespace, chosen: list[str]) -> dict[str, Any]:
    sizes = _settings(args)
    parts: dict[str, Any] = {}
    started = time.monotonic()
    with redis_target(args.redis_url) as url:
        for part in PARTS:
            if part not in chosen or (part == "peers" and "prefetch" in chosen):
                continue
            together = part == "prefetch" and "peers" in chosen
            print(f"\n=== {'prefetch and peers' if together else part} ===")
            if part == "components":
                parts[part] = run_components(sizes[part], url)
            elif part == "reads":
                parts[part] = run_reads(sizes[part], url)
            elif part == "prefetch":
                # With the peer chosen too, its rounds run between the engine's (one step).
                parts[part], peers = run_prefetch(sizes[part], url, "peers" in chosen)
                if peers is not None:
                    parts["peers"] = peers
            elif part == "peers":
                parts[part] = run_peers(sizes[part])
            elif part == "tick":
                parts[part] = run_tick(sizes[part], url)
    return {
        "bench": "all",
        "machine": machine(),
        "args": {"quick": args.quick, "parts": chosen, "sizes": sizes},
        "seconds": round(time.monotonic() - started, 1),
        "parts": parts,
        "targets": targets(parts),
    }
