"""The replay's outputs: printed tables, and the PNG of app-open hit rate per hour."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.common import print_table
from bench.replay.tally import KINDS, SERVED


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main_table(results: dict[str, dict[str, Any]], oracle: dict[str, Any] | None) -> None:
    """One row per mix (and the oracle): hit rates, latency, cost, queue, predictive."""
    headers = [
        "mix",
        "app-open hits",
        "read hits",
        "open p50 ms",
        "open p99 ms",
        "fetches/open",
        "jobs/open",
        "peak queue",
        "stale hits",
        "pred. precision",
        "pred. recall",
    ]
    rows = []
    for mix, s in results.items():
        predictive = s["jobsByOrigin"].get("predictive", 0) > 0
        rows.append(
            [
                mix,
                _pct(s["openHitRate"]),
                _pct(s["readHitRate"]),
                _num(s["openLatencyP50Ms"], 1),
                _num(s["openLatencyP99Ms"], 1),
                _num(s["fetchesPerOpen"]),
                _num(s["jobsPerOpen"]),
                str(s["peakQueue"]),
                _pct(s["staleHitShare"]),
                _pct(s["predictivePrecision"]) if predictive else "-",
                _pct(s["predictiveRecall"]) if predictive else "-",
            ]
        )
    if oracle is not None:
        rows.append(
            [
                "oracle (ceiling)",
                _pct(oracle["openHitRate"]),
                _pct(oracle["readHitRate"]),
                "-",
                "-",
                _num(oracle["fetchesPerOpen"]),
                _num(oracle["jobsPerOpen"]),
                "-",
                "-",
                "-",
                "-",
            ]
        )
    print_table(headers, rows)


def kinds_table(results: dict[str, dict[str, Any]]) -> None:
    """App-open hit rate by kind of open: what limits the hit rate."""
    first = next(iter(results.values()))
    headers = ["mix", *(f"{k} ({first['byKind'][k]['opens']:,})" for k in KINDS)]
    rows = [[mix, *(_pct(s["byKind"][k]["hitRate"]) for k in KINDS)] for mix, s in results.items()]
    print_table(headers, rows)


def served_table(results: dict[str, dict[str, Any]]) -> None:
    """Which prefetch served the app opens (share of opens)."""
    headers = ["mix", *SERVED]
    rows = [
        [mix, *(_pct(s["servedBy"][o] / (s["opens"] or 1)) for o in SERVED)]
        for mix, s in results.items()
    ]
    print_table(headers, rows)


def comparison_table(sim: dict[str, dict[str, Any]], real: dict[str, dict[str, Any]]) -> None:
    """The real-time run beside the simulation of the same period and settings."""
    headers = [
        "mix",
        "opens",
        "open hits sim",
        "open hits real",
        "diff (points)",
        "read hits sim",
        "read hits real",
        "fetches/open sim",
        "fetches/open real",
        "jobs/open sim",
        "jobs/open real",
        "peak queue sim/real",
    ]
    rows = []
    for mix, r in real.items():
        s = sim[mix]
        rows.append(
            [
                mix,
                f"{r['opens']:,}",
                _pct(s["openHitRate"]),
                _pct(r["openHitRate"]),
                f"{100 * (r['openHitRate'] - s['openHitRate']):+.1f}",
                _pct(s["readHitRate"]),
                _pct(r["readHitRate"]),
                _num(s["fetchesPerOpen"]),
                _num(r["fetchesPerOpen"]),
                _num(s["jobsPerOpen"]),
                _num(r["jobsPerOpen"]),
                f"{s['peakQueue']}/{r['peakQueue']}",
            ]
        )
    print_table(headers, rows)


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> Path | None:
    """Hit rate of app opens per hour, one line per mix; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(12, 5))
    for mix, s in results.items():
        rates = [math.nan if r is None else 100 * r for r in s["hourlyOpenHitRate"]]
        ax.plot(range(len(rates)), rates, label=mix, linewidth=1.2)
    hours = len(next(iter(results.values()))["hourlyOpenHitRate"])
    ax.set_xticks(range(0, hours + 1, 24))
    ax.set_xticklabels([f"day {d}" for d in range(0, hours // 24 + 1)])
    ax.set_xlabel("hour of the replayed period")
    ax.set_ylabel("app opens served from cache (%)")
    ax.set_ylim(0, 100)
    ax.axhline(90, color="grey", linestyle="--", linewidth=0.8, label="goal (90%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
