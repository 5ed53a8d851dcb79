"""A synthetic population: who opens the app when, reads how often, and posts for whom.

Everything comes from one `random.Random(seed)`, so a spec always yields the same population.
Defaults (each a flag of `python -m bench.replay`):

- `users` (10,000) over `days` (7) measured days, after `history_days` (7) of history that only
  teaches the strategies (the predictive profile is by hour of the *week*: without a week of
  history it has nothing to predict in the first one);
- each user has one to three habitual sessions a day at personal times, drawn from a diurnal
  mixture (morning, midday, evening peaks; habits at least 2 h apart), each day's start
  jittered by a normal with a standard deviation of `jitter_min` (20) minutes;
- `weekend_share` (30%) of users keep a second set of habits, drawn later in the day, on
  Saturdays and Sundays (days 5 and 6 of every week from the start, which is a Monday);
- `off_habit_share` (10%) of all app opens fall at uniformly random times on any user;
- a session is `min_reads`..`max_reads` (1..5) reads, `min_gap_s`..`max_gap_s` (30 s..3 min)
  apart; its first read is the *app open*;
- `join_share` (5%) of users join mid-week (between the ends of the first and of the
  second-to-last measured day) with no history, and `stop_share` (5%) stop then;
- each user posts `posts_per_day` (1) times a day on average (Poisson), at one of its reads
  that day, and every post raises a `post.created` event for its `followers` (50) followers,
  fixed per user.
"""

from __future__ import annotations

import math
import random
import uuid
from bisect import bisect_left
from dataclasses import dataclass, field

SECOND = 1_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
WEEK = 7 * DAY
# Midnight UTC of Monday 2026-11-02: the first measured day.
DEFAULT_START_MS = 1_793_577_600_000
# (mean hour, standard deviation in hours, weight) of habit times of day.
WEEKDAY_PEAKS = ((7.5, 1.0, 0.35), (12.5, 1.0, 0.25), (20.5, 1.5, 0.40))
WEEKEND_PEAKS = ((10.0, 1.5, 0.35), (14.0, 2.0, 0.25), (21.5, 1.5, 0.40))
MIN_HABIT_GAP_MS = 2 * HOUR


@dataclass(frozen=True, slots=True)
class PopulationSpec:
    """The knobs of a population (see the module docstring for their meaning)."""

    users: int = 10_000
    days: int = 7
    history_days: int = 7
    min_habits: int = 1
    max_habits: int = 3
    jitter_min: float = 20.0
    weekend_share: float = 0.30
    off_habit_share: float = 0.10
    min_reads: int = 1
    max_reads: int = 5
    min_gap_s: float = 30.0
    max_gap_s: float = 180.0
    join_share: float = 0.05
    stop_share: float = 0.05
    posts_per_day: float = 1.0
    followers: int = 50
    seed: int = 1
    start_ms: int = DEFAULT_START_MS

    def __post_init__(self) -> None:
        if self.users < 2 or self.days < 1 or self.history_days < 0:
            raise ValueError("need at least 2 users, 1 day and no negative history")
        if not 1 <= self.min_habits <= self.max_habits:
            raise ValueError("habits: 1 <= min <= max")
        if not 1 <= self.min_reads <= self.max_reads:
            raise ValueError("reads: 1 <= min <= max")
        if not 0 < self.min_gap_s <= self.max_gap_s:
            raise ValueError("gaps: 0 < min <= max")
        for name in ("weekend_share", "join_share", "stop_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1")
        if self.join_share + self.stop_share > 1.0:
            raise ValueError("join_share + stop_share must not exceed 1")
        if not 0.0 <= self.off_habit_share < 1.0:
            raise ValueError("off_habit_share must be within 0..1 (1 excluded)")
        if self.jitter_min < 0 or self.posts_per_day < 0 or self.followers < 0:
            raise ValueError("jitter, posts per day and followers must not be negative")

    @property
    def end_ms(self) -> int:
        """End of the measured period."""
        return self.start_ms + self.days * DAY

    @property
    def history_start_ms(self) -> int:
        """Start of the history (= start_ms without history)."""
        return self.start_ms - self.history_days * DAY


@dataclass(frozen=True, slots=True)
class Session:
    """One use of the app: its first read is the app open."""

    user: int
    reads: tuple[int, ...]  # epoch ms, ascending
    habitual: bool
    jitter_ms: int  # how far from its habit's time (0 for an off-habit open)
    weekend_habit: bool  # opened by a weekend-only habit

    @property
    def start(self) -> int:
        return self.reads[0]


@dataclass(frozen=True, slots=True)
class Read:
    """One timeline read, in time order (`session` indexes Population.sessions)."""

    at: int
    user: int
    session: int
    first: bool


@dataclass(slots=True)
class User:
    """One user's traits."""

    id: str
    habits: tuple[int, ...]  # ms after midnight
    weekend_habits: tuple[int, ...] | None  # None: the same hours at weekends
    joined_at: int | None  # None: there from the start (with history)
    stopped_at: int | None  # None: there to the end
    followers: tuple[int, ...] = ()

    def active_at(self, at: int) -> bool:
        """Whether the user uses the app at all at `at`."""
        if self.joined_at is not None and at < self.joined_at:
            return False
        return self.stopped_at is None or at < self.stopped_at


@dataclass(slots=True)
class Population:
    """The generated users, sessions (ordered by start), reads and posts."""

    spec: PopulationSpec
    users: list[User]
    sessions: list[Session]
    posts: list[tuple[int, int]]  # (epoch ms, poster), ascending
    reads: list[Read] = field(default_factory=list)

    def measured_reads(self) -> list[Read]:
        """The reads of the measured period."""
        i = bisect_left(self.reads, self.spec.start_ms, key=lambda r: r.at)
        return self.reads[i:]

    def history_reads(self) -> list[Read]:
        """The reads before the measured period."""
        i = bisect_left(self.reads, self.spec.start_ms, key=lambda r: r.at)
        return self.reads[:i]

    def reads_between(self, start_ms: int, end_ms: int) -> list[Read]:
        """The reads in [start_ms, end_ms)."""
        lo = bisect_left(self.reads, start_ms, key=lambda r: r.at)
        hi = bisect_left(self.reads, end_ms, key=lambda r: r.at)
        return self.reads[lo:hi]

    def posts_between(self, start_ms: int, end_ms: int) -> list[tuple[int, int]]:
        """The posts in [start_ms, end_ms)."""
        lo = bisect_left(self.posts, start_ms, key=lambda p: p[0])
        hi = bisect_left(self.posts, end_ms, key=lambda p: p[0])
        return self.posts[lo:hi]


def compress(population: Population, factor: float, anchor_ms: int, to_ms: int) -> Population:
    """The same population with time compressed `factor` times around `anchor_ms`, which
    lands at `to_ms`: t -> to_ms + (t - anchor_ms) / factor. Jitters stay in virtual time
    (they classify app opens); the spec is kept as it was (its times are not used)."""

    def at(t: int) -> int:
        return to_ms + math.floor((t - anchor_ms) / factor)

    users = [
        User(
            id=u.id,
            habits=u.habits,
            weekend_habits=u.weekend_habits,
            joined_at=None if u.joined_at is None else at(u.joined_at),
            stopped_at=None if u.stopped_at is None else at(u.stopped_at),
            followers=u.followers,
        )
        for u in population.users
    ]
    sessions = [
        Session(s.user, tuple(at(t) for t in s.reads), s.habitual, s.jitter_ms, s.weekend_habit)
        for s in population.sessions
    ]
    reads = [Read(at(r.at), r.user, r.session, r.first) for r in population.reads]
    posts = [(at(t), u) for t, u in population.posts]
    return Population(
        spec=population.spec, users=users, sessions=sessions, posts=posts, reads=reads
    )


def _habit_time(rng: random.Random, peaks: tuple[tuple[float, float, float], ...]) -> int:
    mean, sd, _ = rng.choices(peaks, weights=[p[2] for p in peaks])[0]
    return int((rng.gauss(mean, sd) % 24) * HOUR)


def _habits(
    rng: random.Random, spec: PopulationSpec, peaks: tuple[tuple[float, float, float], ...]
) -> tuple[int, ...]:
    count = rng.randint(spec.min_habits, spec.max_habits)
    chosen: list[int] = []
    for _ in range(200):
        if len(chosen) == count:
            break
        at = _habit_time(rng, peaks)
        # Apart on the 24-hour circle, so that two habits never make one session.
        if all(min(abs(at - c), DAY - abs(at - c)) >= MIN_HABIT_GAP_MS for c in chosen):
            chosen.append(at)
    return tuple(sorted(chosen))


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's method (means here are small)."""
    if mean <= 0:
        return 0
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _session(
    rng: random.Random, spec: PopulationSpec, user: int, start: int, **traits: object
) -> Session:
    reads = [start]
    for _ in range(rng.randint(spec.min_reads, spec.max_reads) - 1):
        reads.append(reads[-1] + int(rng.uniform(spec.min_gap_s, spec.max_gap_s) * SECOND))
    return Session(user=user, reads=tuple(reads), **traits)  # type: ignore[arg-type]


def is_weekend(spec: PopulationSpec, at: int) -> bool:
    """Saturday or Sunday (the measured period starts on a Monday)."""
    return ((at - spec.start_ms) // DAY) % 7 in (5, 6)


def generate(spec: PopulationSpec) -> Population:
    """The population of `spec` (deterministic for a seed)."""
    rng = random.Random(spec.seed)
    n = spec.users
    order = list(range(n))
    rng.shuffle(order)
    joiners = set(order[: round(n * spec.join_share)])
    stoppers = set(order[len(joiners) : len(joiners) + round(n * spec.stop_share)])
    change_lo = spec.start_ms + (DAY if spec.days >= 3 else 0)
    change_hi = spec.end_ms - (DAY if spec.days >= 3 else 0)

    users: list[User] = []
    for i in range(n):
        weekend = _habits(rng, spec, WEEKEND_PEAKS) if rng.random() < spec.weekend_share else None
        users.append(
            User(
                id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                habits=_habits(rng, spec, WEEKDAY_PEAKS),
                weekend_habits=weekend,
                joined_at=rng.randrange(change_lo, change_hi) if i in joiners else None,
                stopped_at=rng.randrange(change_lo, change_hi) if i in stoppers else None,
            )
        )
    for i, user in enumerate(users):
        others = rng.sample(range(n - 1), min(spec.followers, n - 1))
        user.followers = tuple(o if o < i else o + 1 for o in others)  # never oneself

    sessions: list[Session] = []
    sd_ms = spec.jitter_min * MINUTE
    first_day = spec.history_start_ms
    for day in range(spec.history_days + spec.days):
        midnight = first_day + day * DAY
        weekend_day = is_weekend(spec, midnight)
        for i, user in enumerate(users):
            own = user.weekend_habits if weekend_day and user.weekend_habits else None
            for habit in own or user.habits:
                jitter = int(rng.gauss(0.0, sd_ms))
                start = midnight + habit + jitter
                if user.active_at(start) and first_day <= start < spec.end_ms:
                    sessions.append(
                        _session(
                            rng,
                            spec,
                            i,
                            start,
                            habitual=True,
                            jitter_ms=jitter,
                            weekend_habit=own is not None,
                        )
                    )
    habitual = len(sessions)
    off = round(habitual * spec.off_habit_share / (1.0 - spec.off_habit_share))
    added = 0
    for _ in range(off * 50):
        if added == off:
            break
        i, start = rng.randrange(n), rng.randrange(first_day, spec.end_ms)
        if users[i].active_at(start):
            sessions.append(
                _session(rng, spec, i, start, habitual=False, jitter_ms=0, weekend_habit=False)
            )
            added += 1
    sessions.sort(key=lambda s: (s.start, s.user))

    reads = [
        Read(at, s.user, index, k == 0)
        for index, s in enumerate(sessions)
        for k, at in enumerate(s.reads)
        if at < spec.end_ms
    ]
    reads.sort(key=lambda r: (r.at, r.user, r.session))

    # Posts: on measured days only (history teaches activity; events need a cache to act on).
    by_user_day: dict[tuple[int, int], list[int]] = {}
    for r in reads:
        if r.at >= spec.start_ms:
            by_user_day.setdefault((r.user, (r.at - spec.start_ms) // DAY), []).append(r.at)
    posts: list[tuple[int, int]] = []
    for (user_index, _day), times in sorted(by_user_day.items()):
        for _ in range(_poisson(rng, spec.posts_per_day)):
            posts.append((rng.choice(times), user_index))
    posts.sort()
    return Population(spec=spec, users=users, sessions=sessions, posts=posts, reads=reads)
