"""PNG charts of a `python -m bench` result: each scenario beside its ceiling and its target.

One function per chart, each taking the part of the result it draws and a path; matplotlib
draws off-screen (Agg). Charts a person reads at a glance: bars labelled with their values,
the ceiling drawn in grey, the docs/contract.md §7 target as a dashed line or in the title.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

ENGINE = "#1f6fb2"
ENGINE_BATCH = "#5aa0d8"
CEILING = "#9a9a9a"
PEER = "#d9822b"
TARGET = "#c0392b"
STEP_COLORS = {
    "fetch/decode": "#4c72b0",
    "encode": "#55a868",
    "gzip": "#8172b2",
    "Redis": "#c44e52",
    "loop": "#dddddd",
    "overhead": "#1f1f1f",
}
DPI = 110


def _label_bars(ax: Axes, bars: Any, fmt: str = "{:,.0f}") -> None:
    for bar in bars:
        height = bar.get_height()
        if height:
            ax.annotate(
                fmt.format(height),
                (bar.get_x() + bar.get_width() / 2, height),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )


def _headroom(ax: Axes, share: float = 0.18) -> None:
    """Room above the tallest bar for its labels."""
    ax.set_ylim(0, ax.get_ylim()[1] * (1 + share))


def _finish(fig: Any, path: Path, note: str) -> Path:
    fig.text(0.01, 0.005, note, fontsize=7, color="#555555", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def reads_chart(reads: dict[str, Any], path: Path, note: str) -> Path:
    """req/s and p50/p99 of each read variant, beside the bare handler and redis-benchmark."""
    variants = [v for v in reads["variants"] if v.get("wrk")]
    labels, rps, p50, p99, colors = [], [], [], [], []
    for v in variants:
        wrk = v["wrk"]
        if v["target"] == "bare":
            # Measured again beside each store's API (interleaved with it): say which.
            beside = f"\n(store {v['section']})" if v.get("section") else ""
            labels.append(f"bare aiohttp\n{v['served']} bytes{beside}")
            colors.append(CEILING)
        else:
            ratio = f"\n{v['ratio_to_bare']:.2f}x bare" if v.get("ratio_to_bare") else ""
            labels.append(f"API, store {v['compression']}\n{v['encoding']} client{ratio}")
            colors.append(ENGINE)
        rps.append(wrk["rps"])
        p50.append(wrk["p50_ms"])
        p99.append(wrk["p99_ms"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(13.0, 2.1 * len(labels)), 5.2))
    xs = range(len(labels))
    _label_bars(left, left.bar(xs, rps, color=colors))
    for found in reads.get("redis_benchmark", []):
        left.axhline(found["rps"], color=CEILING, linestyle=":", linewidth=1)
        left.annotate(
            f"redis-benchmark GET {found['size'] / 1000:.1f} KB: {found['rps']:,.0f}/s",
            (len(labels) - 0.5, found["rps"]),
            ha="right",
            va="bottom",
            fontsize=7,
            color="#555555",
        )
    left.set_xticks(list(xs), labels, fontsize=7)
    left.set_ylabel("requests/s")
    left.set_title("Cached reads: throughput (target: gzip ≥ 0.75x, plain ≥ 0.5x bare)")
    width = 0.4
    _label_bars(
        right,
        right.bar([x - width / 2 for x in xs], p50, width, color=colors, alpha=0.55, label="p50"),
        "{:.1f}",
    )
    _label_bars(
        right,
        right.bar([x + width / 2 for x in xs], p99, width, color=colors, label="p99"),
        "{:.1f}",
    )
    right.axhline(5, color=TARGET, linestyle="--", linewidth=1, label="p99 target 5 ms")
    right.set_xticks(list(xs), labels, fontsize=7)
    right.set_ylabel("latency, ms")
    kind = next((v["wrk"].get("percentiles") for v in variants), None)
    kind = None if kind == "one run" else kind  # else "median of N slices"
    right.set_title(f"Cached reads: p50 (light) and p99{f', {kind}' if kind else ''}")
    _headroom(right, 0.08)
    right.legend(fontsize=8)
    return _finish(fig, path, note)


def _cell_label(cell: dict[str, Any]) -> str:
    return f"{cell['mode']}\n{cell['latency_ms']} ms"


def _peer_cell(peers: dict[str, Any] | None, latency: int) -> dict[str, Any] | None:
    if not peers or "cells" not in peers:
        return None
    return next((c for c in peers["cells"] if c["latency_ms"] == latency), None)


def prefetch_chart(
    cells: list[dict[str, Any]], peers: dict[str, Any] | None, path: Path, note: str
) -> Path:
    """jobs/s, worker CPU µs/job and peak RSS per cell: engine, plain loop, BullMQ."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2), gridspec_kw={"width_ratios": [3, 3, 2]})
    rate_ax, cpu_ax, rss_ax = axes
    labels = [_cell_label(c) for c in cells]
    xs = list(range(len(cells)))
    width = 0.27
    series = [
        ("engine", lambda c: c["engine"], ENGINE),
        ("plain asyncio loop (ceiling)", lambda c: c.get("baseline"), CEILING),
        ("BullMQ, 1 job per user (peer)", lambda c: _peer_cell(peers, c["latency_ms"]), PEER),
    ]
    for i, (name, pick, color) in enumerate(series):
        offset = (i - 1) * width
        rates = [(pick(c) or {}).get("jobs_per_s", 0.0) for c in cells]
        cpus = [(pick(c) or {}).get("worker_cpu_us_per_job", 0.0) for c in cells]
        if not any(rates):
            continue
        _label_bars(
            rate_ax, rate_ax.bar([x + offset for x in xs], rates, width, color=color, label=name)
        )
        _label_bars(
            cpu_ax, cpu_ax.bar([x + offset for x in xs], cpus, width, color=color, label=name)
        )
    for x, cell in zip(xs, cells, strict=True):
        base = (cell.get("baseline") or {}).get("worker_cpu_us_per_job")
        if base:  # docs/contract.md §7: the engine's CPU per job at most 1.15 of the plain loop's
            cpu_ax.hlines(
                1.15 * base, x - 1.5 * width, x - 0.5 * width, color=TARGET, linestyle="--"
            )
        peer = _peer_cell(peers, cell["latency_ms"])
        if peer and peer.get("jobs_per_s"):
            target = (1.3 if cell["mode"] == "single" else 1.6) * peer["jobs_per_s"]
            rate_ax.hlines(target, x - 1.5 * width, x - 0.5 * width, color=TARGET, linestyle="--")
            ratio = cell["engine"]["jobs_per_s"] / peer["jobs_per_s"]
            rate_ax.annotate(
                f"{ratio:.2f}x\nBullMQ",
                (x - width, cell["engine"]["jobs_per_s"]),
                ha="center",
                va="bottom",
                fontsize=7,
                fontweight="bold",
                xytext=(0, 11),
                textcoords="offset points",
            )
    rate_ax.set_xticks(xs, labels, fontsize=8)
    rate_ax.set_ylabel("jobs/s (enqueued to cached)")
    rate_ax.set_xlabel("message kind, upstream latency", fontsize=8)
    rate_ax.set_title("Prefetch throughput (dashed: 1.3x / 1.6x BullMQ)")
    _headroom(rate_ax)
    rate_ax.legend(fontsize=8)
    cpu_ax.set_xticks(xs, labels, fontsize=8)
    cpu_ax.set_ylabel("worker CPU µs per job")
    cpu_ax.set_title("Worker CPU per job (dashed: 1.15x the plain loop)")
    _headroom(cpu_ax, 0.08)
    rss = [c["engine"].get("peak_rss_mb", 0.0) for c in cells]
    _label_bars(rss_ax, rss_ax.bar(xs, rss, 0.5, color=ENGINE, label="engine"))
    peer_rss = [(_peer_cell(peers, c["latency_ms"]) or {}).get("peak_rss_mb", 0.0) for c in cells]
    if any(peer_rss):
        _label_bars(
            rss_ax, rss_ax.bar([x + 0.3 for x in xs], peer_rss, 0.25, color=PEER, label="BullMQ")
        )
    rss_ax.axhline(150, color=TARGET, linestyle="--", linewidth=1, label="budget 150 MB")
    rss_ax.set_xticks(xs, labels, fontsize=8)
    rss_ax.set_ylabel("peak RSS per worker, MB")
    rss_ax.set_title("Worker memory")
    _headroom(rss_ax, 0.25)
    rss_ax.legend(fontsize=8, loc="upper left")
    return _finish(fig, path, note)


def components_chart(
    components: dict[str, Any],
    cells: list[dict[str, Any]],
    peers: dict[str, Any] | None,
    path: Path,
    note: str,
) -> Path:
    """Worker CPU µs per job split by step (stacked): the unit of work measured one step at a
    time, the plain loop's rest, and the engine's overhead over the plain loop."""
    per = components["us_per_job"]
    steps = {
        "fetch/decode": per["fetch"] + per["decode"],
        "encode": per["encode"],
        "gzip": per["gzip"],
        "Redis": per["redis"],
    }
    unit = sum(steps.values())
    # Each runner's bar: the steps as measured one at a time, then what the plain loop spends
    # beyond them (the event loop, and the contention of running beside the sandbox and
    # Redis on shared CPUs: the same for every runner), then the engine's own overhead.
    bars: list[tuple[str, float, float]] = [("unit of work,\nstep by step", 0.0, 0.0)]
    for cell in cells:
        base = (cell.get("baseline") or {}).get("worker_cpu_us_per_job")
        if cell["latency_ms"] != 0 or not base:
            continue
        loop_rest = max(0.0, base - unit)
        if cell["mode"] == "single":
            bars.append(("plain asyncio\nloop", loop_rest, 0.0))
        engine = cell["engine"]["worker_cpu_us_per_job"]
        # An engine cheaper than the loop (batches share work) shows its whole rest in grey.
        rest = loop_rest if engine >= base else max(0.0, engine - unit)
        bars.append((f"engine,\n{cell['mode']} messages", rest, engine - base))
    fig, ax = plt.subplots(figsize=(10, 5.6))
    xs = list(range(len(bars)))
    bottoms = [0.0] * len(bars)
    for step, cost in steps.items():
        ax.bar(xs, [cost] * len(bars), bottom=bottoms, color=STEP_COLORS[step], label=step)
        for x in xs if cost >= 40 else ():  # a thin segment's label would hide the next
            ax.annotate(
                f"{cost:.0f}",
                (x, bottoms[x] + cost / 2),
                ha="center",
                va="center",
                fontsize=7,
                color="white",
            )
        bottoms = [b + cost for b in bottoms]
    rests = [rest for _, rest, _ in bars]
    ax.bar(
        xs, rests, bottom=bottoms, color=STEP_COLORS["loop"], label="loop + shared-CPU contention"
    )
    bottoms = [b + r for b, r in zip(bottoms, rests, strict=True)]
    extras = [max(0.0, extra) for _, _, extra in bars]
    ax.bar(xs, extras, bottom=bottoms, color=STEP_COLORS["overhead"], label="engine overhead")
    for x, (_, rest, extra) in enumerate(bars):
        total = unit + rest + max(0.0, extra)
        detail = f"\n(engine {extra:+.0f})" if x and bars[x][0].startswith("engine") else ""
        ax.annotate(
            f"{total:,.0f} µs{detail}",
            (x, bottoms[x] + max(0.0, extra)),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    names = [name for name, _, _ in bars]
    peer = _peer_cell(peers, 0)
    if peer and peer.get("worker_cpu_us_per_job"):
        x = len(bars)
        ax.bar([x], [peer["worker_cpu_us_per_job"]], color=PEER, label="BullMQ (not split)")
        ax.annotate(
            f"{peer['worker_cpu_us_per_job']:,.0f} µs",
            (x, peer["worker_cpu_us_per_job"]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
        names.append("BullMQ\n(Node)")
        xs.append(x)
    ax.set_xticks(xs, names, fontsize=8)
    ax.set_ylabel("worker CPU µs per job, 0 ms upstream")
    ax.set_title(
        f"Where a job's CPU goes ({components['json_bytes'] / 1000:.0f} KB timeline, "
        f"{components['gzip_bytes'] / 1000:.1f} KB gzip)"
    )
    ax.legend(fontsize=8, loc="upper left")
    return _finish(fig, path, note)


def tick_chart(tick: list[dict[str, Any]], path: Path, note: str) -> Path:
    """Wall time and CPU (scheduler, Redis) of the scheduler's first and second tick."""
    labels, wall, sched, redis_cpu = [], [], [], []
    for scenario in tick:
        for name in ("first", "second"):
            t = scenario[name]
            enqueued = sum(t["enqueued"].values())
            labels.append(
                f"{scenario['tracked']:,} tracked\n{scenario['active']:,} active\n"
                f"{name} tick ({enqueued:,} enq.)"
            )
            wall.append(t["wallMs"])
            sched.append(t["schedulerCpuMs"])
            redis_cpu.append(t["redisCpuMs"])
    fig, ax = plt.subplots(figsize=(10, 5.2))
    xs = list(range(len(labels)))
    width = 0.27
    _label_bars(ax, ax.bar([x - width for x in xs], wall, width, color=CEILING, label="wall ms"))
    _label_bars(ax, ax.bar(xs, sched, width, color=ENGINE, label="scheduler CPU ms"))
    _label_bars(
        ax, ax.bar([x + width for x in xs], redis_cpu, width, color=PEER, label="Redis CPU ms")
    )
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylabel("ms per tick")
    ax.set_title("One strategy scheduler tick (the default interval is 60 s)")
    ax.legend(fontsize=8)
    return _finish(fig, path, note)
