"""The run's verdict (checks over what the clients saw and what Redis holds) and its summary."""

from __future__ import annotations

from collections import Counter
from typing import Any

from deploy.topology.scenarios import Run


def verdict(run: Run, found: dict[str, Any]) -> None:
    """Add the checks that need the whole run: answers, jobs, the leases' enqueues."""
    tally, jobs, leases = run.tally, found["jobs"], found["leases"]
    run.check("every read answered 200", set(tally.reads) == {"200"}, str(dict(tally.reads)))
    odd = _not_ok(tally.attempts.get("rolling restart", Counter()))
    run.check(
        "no request reached a stopping pod (no retry needed during the rolling restart)",
        not odd,
        str(odd),
    )
    run.check(
        "every schedule accepted (202)",
        set(tally.schedules) == {"202"},
        str(dict(tally.schedules)),
    )
    run.check(
        "every activity report accepted (202)",
        set(tally.activity) == {"202"},
        str(dict(tally.activity)),
    )
    run.check("the queue drained", found["drainS"] is not None, f"{found['drainS']} s")
    run.check("jobs were accepted", jobs["jobs_accepted"] > 0, str(jobs["jobs_accepted"]))
    run.check("no job lost", jobs["jobs_lost"] == 0, str(jobs["lost_sample"]))
    run.check(
        "every user reported active was prefetched by the leader",
        jobs["activity_users"] > 0 and jobs["activity_users_cached"] == jobs["activity_users"],
        f"{jobs['activity_users_cached']}/{jobs['activity_users']} "
        f"{jobs['activity_users_missing']}",
    )
    run.check("the enqueue log covers the run", not leases["log_full"], "")
    run.check(
        "no two leases enqueued in the same interval",
        not leases["overlaps"],
        str(leases["overlaps"]),
    )
    cut = run.figures.get("workerCut")
    if cut is not None:
        late = [
            span
            for span in leases["leases"]
            if span["token"] == cut["leaseTokenCut"] and span["lastMs"] > cut["leaseMovedAtRedisMs"]
        ]
        run.check("the cut leader enqueued nothing once the lease moved", not late, str(late))


def _not_ok(attempts: Counter[str]) -> dict[str, int]:
    """The attempts answered neither 200 nor 202 (a 503, a reset, no endpoint)."""
    return {key: n for key, n in attempts.items() if not key.endswith((" 200", " 202"))}


def print_report(run: Run, found: dict[str, Any]) -> None:
    """The counts and figures, then every check."""
    tally, jobs, leases = run.tally, found["jobs"], found["leases"]
    enqueued = [(s["token"], s["identity"], s["enqueues"]) for s in leases["leases"]]
    rows: list[tuple[str, object]] = [
        ("jobs accepted (202)", jobs["jobs_accepted"]),
        ("jobs cached", jobs["jobs_cached"]),
        ("jobs failed-listed (404 users)", jobs["jobs_failed_listed"]),
        ("jobs lost", jobs["jobs_lost"]),
        ("activity users prefetched", f"{jobs['activity_users_cached']}/{jobs['activity_users']}"),
        ("queue drained after the load", f"{found['drainS']} s"),
        ("reads by status", dict(tally.reads)),
        ("reads by phase", {k: dict(v) for k, v in tally.reads_by_phase.items()}),
        ("schedules by status", dict(tally.schedules)),
        ("schedules by phase", {k: dict(v) for k, v in tally.schedules_by_phase.items()}),
        ("retried on the other pod", dict(tally.retries)),
        ("leases that enqueued", enqueued),
        ("ticks per scheduler", leases["ticks"]),
    ]
    rows += [(f"restart {entry['pod']}", entry) for entry in run.figures.get("rollingRestart", [])]
    for name in ("leaderKilled", "workerCut", "apiCut"):
        if name in run.figures:
            rows.append((name, run.figures[name]))
    for phase, attempts in tally.attempts.items():
        odd = _not_ok(attempts)
        if odd:
            rows.append((f"attempts not 200/202 ({phase})", odd))
    lines = ["", "pods as separate hosts:"]
    lines += [f"  {label + ':':32} {value}" for label, value in rows]
    lines += [f"  ! {text}" for text in tally.unexpected[:10]]
    lines.append("checks:")
    lines += [f"  [{'ok' if c.ok else 'FAIL'}] {c.name}  {c.detail}" for c in run.checks]
    print("\n".join(lines), flush=True)
