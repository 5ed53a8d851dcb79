"""`python -m bench.replay`: replay a synthetic week against each strategy mix.

    .venv/bin/python -m bench.replay                # = make bench-replay: 10,000 users, a week
    .venv/bin/python -m bench.replay --users 2000 --days 2 --mixes all activity+predictive
    .venv/bin/python -m bench.replay --set PREDICTIVE_LEAD_TIME=1800000   # any setting
    .venv/bin/python -m bench.replay --realtime --users 1000 ...         # + the real service

Prints the tables, writes bench/results/replay-<timestamp>.json and a PNG beside it (app-open
hit rate per hour, one line per mix; needs the `bench` extra: matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Coroutine
from dataclasses import asdict, fields
from typing import Any

from bench.common import RESULTS, machine, save_result
from bench.replay import report
from bench.replay.oracle import oracle
from bench.replay.population import DAY, HOUR, PopulationSpec, generate
from bench.replay.simulation import MIXES, progress_printer, simulate
from bench.replay.virtual import key_shards
from engine.errors import ConfigError
from engine.settings import Settings, load_settings

SIM_DBS = range(1, 1 + len(MIXES))  # one DB per mix (every role in it), DB 0 for history


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replay", description=__doc__.split("\n")[0]
    )
    population = parser.add_argument_group("population (bench/replay/population.py)")
    for f in fields(PopulationSpec):
        if f.name == "start_ms":
            continue
        population.add_argument(
            "--" + f.name.replace("_", "-"), type=type(f.default), default=f.default
        )
    sim = parser.add_argument_group("simulation")
    sim.add_argument("--mixes", nargs="+", choices=list(MIXES), default=list(MIXES))
    sim.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the service (.env.example), e.g. PREDICTIVE_LEAD_TIME=1800000",
    )
    sim.add_argument("--shards", type=int, default=16, help="key shards in the simulation")
    sim.add_argument("--upstream-ms", type=float, default=50.0, help="modelled fetch latency")
    sim.add_argument("--job-latency-ms", type=int, default=0, help="enqueue to stored, virtual")
    sim.add_argument("--no-sim", action="store_true", help="only the real-time comparison")
    rt = parser.add_argument_group("real-time comparison")
    rt.add_argument("--realtime", action="store_true", help="also run against the service")
    rt.add_argument("--rt-users", type=int, default=1000)
    rt.add_argument("--rt-day", type=int, default=3, help="measured day the window is in")
    rt.add_argument("--rt-from-hour", type=float, default=6.0)
    rt.add_argument("--rt-hours", type=float, default=6.0, help="virtual hours")
    rt.add_argument("--rt-mixes", nargs="+", choices=list(MIXES), default=["read-through", "all"])
    rt.add_argument("--compress", type=float, default=60.0, help="time compression factor")
    rt.add_argument(
        "--max-diff",
        type=float,
        metavar="POINTS",
        help="exit 1 if a mix's real app-open hit rate is further than this from the simulation's",
    )
    parser.add_argument("--no-plot", action="store_true")
    return parser


def _env(assignments: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE")
        env[name.strip()] = value
    try:
        load_settings(env)
    except ConfigError as exc:
        raise SystemExit(f"--set: {exc}") from None
    return env


async def _simulation(
    args: argparse.Namespace, spec: PopulationSpec, env: dict[str, str], url: str
) -> dict[str, Any]:
    population = generate(spec)
    base = load_settings({**env, "REDIS_URL": url}).with_overrides(metrics_dir="")
    progress = progress_printer()
    progress(
        f"population: {spec.users:,} users, {len(population.sessions):,} sessions, "
        f"{len(population.reads):,} reads, {len(population.posts):,} posts"
    )
    started = time.perf_counter()
    with key_shards(args.shards):
        tallies = await simulate(
            population,
            base,
            args.mixes,
            {mix: SIM_DBS[list(MIXES).index(mix)] for mix in args.mixes},
            history_db=0,
            start_ms=spec.start_ms,
            end_ms=spec.end_ms,
            upstream_ms=args.upstream_ms,
            job_latency_ms=args.job_latency_ms,
            progress=progress,
        )
    results = {mix: tally.summary() for mix, tally in tallies.items()}
    ceiling = oracle(population.measured_reads(), base.warm_ttl_ms).summary()
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "mixes": results,
        "oracle": ceiling,
    }


async def _realtime(
    args: argparse.Namespace, spec: PopulationSpec, env: dict[str, str], url: str
) -> dict[str, Any]:
    from bench.replay.realtime import realtime, scaled_env

    rt_spec = PopulationSpec(**{**asdict(spec), "users": args.rt_users})
    population = generate(rt_spec)
    anchor = spec.start_ms + args.rt_day * DAY + round(args.rt_from_hour * HOUR)
    window = round(args.rt_hours * HOUR)
    progress = progress_printer()
    runs = await realtime(
        population,
        env,
        args.rt_mixes,
        anchor,
        window,
        args.compress,
        round(args.upstream_ms),
        url,
        progress,
    )
    compressed_env = scaled_env(env, args.compress)
    out: dict[str, Any] = {
        "users": args.rt_users,
        "factor": args.compress,
        "window": {"day": args.rt_day, "fromHour": args.rt_from_hour, "hours": args.rt_hours},
        "compressedSettings": {k: v for k, v in compressed_env.items() if k not in env},
        "mixes": {},
    }
    for mix, (tally, real_population, start_ms, notes) in runs.items():
        base = load_settings({**compressed_env, "REDIS_URL": url}).with_overrides(metrics_dir="")
        with key_shards(args.shards):
            sim = await simulate(
                real_population,
                base,
                [mix],
                {mix: 1},
                history_db=0,
                start_ms=start_ms,
                end_ms=start_ms + round(window / args.compress),
                upstream_ms=args.upstream_ms,
            )
        out["mixes"][mix] = {
            "real": tally.summary(),
            "simulated": sim[mix].summary(),
            "notes": notes,
        }
    # The same window at full scale (no compression), for what compression itself changes.
    full = load_settings({**env, "REDIS_URL": url}).with_overrides(metrics_dir="")
    with key_shards(args.shards):
        sim_full = await simulate(
            population,
            full,
            args.rt_mixes,
            {mix: SIM_DBS[i] for i, mix in enumerate(args.rt_mixes)},
            history_db=0,
            start_ms=anchor,
            end_ms=anchor + window,
            upstream_ms=args.upstream_ms,
        )
    out["simulatedFullScale"] = {mix: t.summary() for mix, t in sim_full.items()}
    return out


def _print(payload: dict[str, Any]) -> None:
    sim = payload.get("simulation")
    if sim:
        print(f"\nSimulation ({sim['seconds']:.0f} s):\n")
        report.main_table(sim["mixes"], sim["oracle"])
        print("\nApp-open hit rate by kind of open (opens in the period):\n")
        report.kinds_table(sim["mixes"])
        print("\nWhat served the app opens (share of opens):\n")
        report.served_table(sim["mixes"])
    rt = payload.get("realtime")
    if rt:
        print(
            f"\nReal-time run ({rt['users']:,} users, {rt['window']['hours']:g} virtual hours, "
            f"time compressed {rt['factor']:g}x) beside the simulation of the same period:\n"
        )
        real = {mix: m["real"] for mix, m in rt["mixes"].items()}
        simulated = {mix: m["simulated"] for mix, m in rt["mixes"].items()}
        report.comparison_table(simulated, real)
        print("\nThe same window simulated without compression:\n")
        report.comparison_table(rt["simulatedFullScale"], real)
        print("\nReal-time run, full figures:\n")
        report.main_table(real, None)
        for mix, m in rt["mixes"].items():
            print(f"  {mix}: {m['notes']}")


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    from prefetch.embedded import EmbeddedRedis

    values = {f.name: getattr(args, f.name) for f in fields(PopulationSpec) if f.name != "start_ms"}
    try:
        spec = PopulationSpec(**values)
    except ValueError as exc:
        raise SystemExit(f"population: {exc}") from None
    env = _env(args.set)
    payload: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(["python -m bench.replay", *sys.argv[1:]]),
        "population": asdict(spec),
        "settings": env,
        "defaults": {
            k: v
            for k, v in asdict(Settings()).items()
            if "ttl" in k or k.startswith(("activity", "predictive"))
        },
        "shards": args.shards,
    }
    # A private Valkey: the replay flushes whole DBs, never those of a shared server.
    with EmbeddedRedis() as redis:
        if not args.no_sim:
            payload["simulation"] = await _simulation(args, spec, env, redis.url)
        if args.realtime:
            payload["realtime"] = await _realtime(args, spec, env, redis.url)
    return payload


async def _stoppable(work: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run `work`; SIGTERM cancels it, so that the embedded Valkey and the services are
    stopped on the way out (as on Ctrl-C)."""
    task = asyncio.ensure_future(work)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await task


def main() -> None:
    args = _parser().parse_args()
    import uvloop

    try:
        payload = uvloop.run(_stoppable(_main(args)))
    except asyncio.CancelledError:
        sys.exit(128 + signal.SIGTERM)
    path = save_result("replay", payload)
    _print(payload)
    if "simulation" in payload and not args.no_plot:
        png = report.plot(
            payload["simulation"]["mixes"],
            path.with_suffix(".png"),
            f"App opens served from cache per hour ({args.users:,} users, "
            f"{args.days} days after {args.history_days} of history)",
        )
        print(f"\nplot: {png}" if png else "\nplot: skipped (pip install -e '.[bench]')")
    print(f"full result: {path.relative_to(RESULTS.parent.parent)}")
    if args.max_diff is not None and "realtime" in payload:
        worst = max(
            abs(m["real"]["openHitRate"] - m["simulated"]["openHitRate"]) * 100
            for m in payload["realtime"]["mixes"].values()
        )
        broken = [m for m, v in payload["realtime"]["mixes"].items() if not v["notes"]["alive"]]
        if worst > args.max_diff or broken:
            print(f"replay: real and simulated differ by {worst:.1f} points; dead: {broken}")
            sys.exit(1)
        print(f"replay: real and simulated agree within {worst:.1f} points")


if __name__ == "__main__":
    main()
