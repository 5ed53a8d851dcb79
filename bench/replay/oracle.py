"""The ceiling: an oracle that knows every future read and fetches just in time.

It fetches a user's timeline right before the first read that no earlier fetch still covers,
and keeps it for `ttl_ms` (the warm tier's TTL, the longest any strategy gets). Every read is
then a hit, and the number of fetches is the least that can serve every read from a cache
entry of that lifetime (fetching at the first uncovered read is optimal: any earlier fetch
covers no more reads after it). One fetch per app open at most, since a session is shorter
than the TTL, and fewer when a user opens the app again while its entry lives. The oracle
does not refresh on events: freshness is not what it bounds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bench.replay.population import Read


@dataclass(frozen=True, slots=True)
class OracleResult:
    """The oracle's accounting over one period."""

    opens: int
    reads: int
    fetches: int

    def summary(self) -> dict[str, Any]:
        """The report's figures: every read a hit, one job per fetch."""
        opens = self.opens or 1
        return {
            "opens": self.opens,
            "reads": self.reads,
            "openHitRate": 1.0 if self.opens else 0.0,
            "readHitRate": 1.0 if self.reads else 0.0,
            "fetches": self.fetches,
            "fetchesPerOpen": self.fetches / opens,
            "jobsPerOpen": self.fetches / opens,
        }


def oracle(reads: Iterable[Read], ttl_ms: int) -> OracleResult:
    """Account the oracle over `reads` (in time order)."""
    covered_until: dict[int, int] = {}
    opens = count = fetches = 0
    for read in reads:
        count += 1
        opens += read.first
        if covered_until.get(read.user, -1) <= read.at:
            fetches += 1
            covered_until[read.user] = read.at + ttl_ms
    return OracleResult(opens=opens, reads=count, fetches=fetches)
