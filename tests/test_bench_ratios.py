"""bench: the paired ratios the harness judges its targets by (bench/prefetch_run.py,
bench/harness.py), on made-up rounds whose machine drifts between them."""

from __future__ import annotations

import statistics

from bench.harness import bullmq_ratio
from bench.prefetch_run import median, paired_ratios


def test_pairs_are_taken_round_by_round_and_empty_ones_left_out() -> None:
    assert paired_ratios([500.0, 600.0, None], [400.0, 0.0, 300.0]) == [1.25]
    # A machine twice as slow in round 2 slows both runs of that round: pairing cancels it,
    # while the two medians would compare round 2's engine with round 3's baseline.
    engine, baseline = [460.0, 920.0, 470.0], [400.0, 800.0, 800.0]
    assert statistics.median(paired_ratios(engine, baseline)) == 1.15
    assert median(engine) / median(baseline) == 470.0 / 800.0


def test_the_bullmq_ratio_is_paired_when_every_round_has_a_peer_round() -> None:
    cell = {
        "engine": {
            "jobs_per_s": 2000.0,
            "rounds": [{"jobs_per_s": v} for v in (3000.0, 1500.0, 2000.0)],
        }
    }
    peer = {"jobs_per_s": 1000.0, "rounds": [{"jobs_per_s": v} for v in (2000.0, 1000.0, 2000.0)]}
    assert bullmq_ratio(cell, peer) == 1.5  # rounds: 1.5, 1.5, 1.0
    unpaired = {"jobs_per_s": 1000.0, "rounds": [{"jobs_per_s": 1000.0}]}
    assert bullmq_ratio(cell, unpaired) == 2.0
    # An even number of rounds: the mean of the middle two, not the higher one.
    four = {
        "engine": {"jobs_per_s": 0.0, "rounds": [{"jobs_per_s": v} for v in (2.0, 3.0, 4.0, 5.0)]}
    }
    peer_four = {"jobs_per_s": 1.0, "rounds": [{"jobs_per_s": 1.0}] * 4}
    assert bullmq_ratio(four, peer_four) == 3.5
    # Rounds without a figure (a round that did nothing): the medians, not an empty median.
    idle = {"jobs_per_s": 2000.0, "rounds": [{"jobs_per_s": 0.0}] * 3}
    assert bullmq_ratio({"engine": idle}, peer) == 2.0
