"""Every Redis key of the service, in one place.

All keys start with `prefetch:` and name their tier or role, so the service works when every
DB number is the same (a managed Redis with one DB, or a Redis Cluster).

Per-user keys carry the hash tag of the user's *shard* (`{s<n>}`, n = crc32(user id) mod
SHARDS), not of the user: a user's tiers and generation share a Cluster slot, and so do the
per-shard indexes that cover that user (the strategies' expiry and activity indexes). A store
script can then write an entry and its index entry in one atomic step on a single Redis and on
a Cluster alike, and no cross-user index sits on one hot slot. SHARDS is part of the layout:
changing it orphans every key written before (a cache: they expire).

Where keys live, and which scripts touch several (REDIS_CLUSTER_MODE=true puts the first
group on a Redis Cluster, where a script's keys must share one slot):

- On the Cluster (roles hot, warm, metrics), every multi-key script within one `{s<n>}` slot:
  guarded_set.lua and invalidate.lua (a user's entry and generation, its shard's expiry and
  unread indexes), consume.lua and sweep.lua (one tier's indexes of one shard), record.lua,
  select_active.lua and predict_due.lua (one shard's activity, frequency, profile and
  predictive indexes). Everything else there is a one-key command, in pipelines that the
  cluster client splits by node.
- On one slot knowingly: the daily metrics hashes `metrics:{m}:day:<date>` and
  `metrics:{m}:total` share the tag `{m}`, so that each process's flush (flush.lua, once a
  second) adds to both in one atomic script: a few hundred calls a second even for a large
  fleet, far below one node's capacity, and a per-day total would otherwise need a fan-out
  read.
- On the queue's single node (BROKER_URL), never on the Cluster: Dramatiq's layout, pending
  marks, the failed list and counters, the strategy claims, the scheduler lease and its log of
  fenced enqueues. The enqueue, settle and retry scripts (engine/broker/*.lua) combine a
  user's pending mark or the lease's fence with the queues' keys, and Dramatiq's own scripts
  span every queue.
"""

from __future__ import annotations

import zlib

PREFIX = "prefetch"
TIERS = ("hot", "warm")
# Key shards: enough for an even spread over the slots of a large Cluster, few enough that a
# scheduler tick can visit every shard's index in one pipelined round trip.
SHARDS = 1024


def shard_of(user_id: str) -> int:
    """The user's key shard, 0 <= n < SHARDS (stable across processes and hosts)."""
    return zlib.crc32(user_id.encode()) % SHARDS


def shard_tag(shard: int) -> str:
    """The Cluster hash tag of a shard: every key that carries it lives in one slot."""
    return f"{{s{shard}}}"


def _user(user_id: str) -> str:
    return f"{shard_tag(shard_of(user_id))}:{user_id}"


# Dramatiq's RedisBroker namespace. Its keys (`prefetch:queue:<queue>`, `...msgs`, acks, ...) are
# Dramatiq's layout, named only in engine/broker/dramatiq_layout.py.
QUEUE_NAMESPACE = f"{PREFIX}:queue"


def timeline(tier: str, user_id: str) -> str:
    """The cached response body of GET /api/cache/{userId} in one tier."""
    return f"{PREFIX}:{tier}:timeline:{_user(user_id)}"


def timeline_owner(key: bytes) -> str | None:
    """The user whose `timeline` key (in any tier) `key` is, else None."""
    parts = key.decode("utf-8", "replace").split(":", 4)
    if len(parts) != 5 or parts[0] != PREFIX or parts[2] != "timeline":
        return None
    return parts[4]


def generation(tier: str, user_id: str) -> str:
    """Bumped by every invalidation; a write whose fetch started under an older value is dropped."""
    return f"{PREFIX}:{tier}:gen:{_user(user_id)}"


def timeline_pattern(tier: str) -> str:
    """SCAN pattern for the entries of one tier (health counts them)."""
    return f"{PREFIX}:{tier}:timeline:*"


def pending_job(user_id: str) -> str:
    """Hash {jobId, priority} of the user's job that is queued and not yet finished."""
    return f"{PREFIX}:jobs:pending:{_user(user_id)}"


def settled_job(message_id: str, attempt: int) -> str:
    """Set once the outcome of one delivery of a RabbitMQ message is written (kept briefly):
    a redelivery after a lost ack finds it and is acknowledged without running again."""
    return f"{PREFIX}:jobs:settled:{message_id}:{attempt}"


# Hash broker id -> what that RabbitMQ worker holds unacknowledged (engine/broker/rabbit_broker).
QUEUE_GAUGES = f"{PREFIX}:jobs:workers"
FAILED_JOBS = f"{PREFIX}:jobs:failed"  # list of encoded FailedJob, newest first, at most 50
JOBS_COMPLETED = f"{PREFIX}:jobs:completed_total"  # lifetime counter
JOBS_FAILED = f"{PREFIX}:jobs:failed_total"  # lifetime counter


# --- strategy indexes (engine/strategies): one key per shard, tagged like its users ---------


def expiry_index(tier: str, shard: int) -> str:
    """Zset user -> when the user's entry in `tier` expires (epoch ms), written by the store.

    In the tier's DB and slot, so the store script writes it in the same atomic step as the
    entry; an invalidation removes the user. Members whose time passed are trimmed by the tick.
    """
    return f"{PREFIX}:{tier}:expiry:{shard_tag(shard)}"


def unread_index(tier: str, shard: int) -> str:
    """Zset user -> expiry (epoch ms) of a prefetched entry that no read has served yet."""
    return f"{PREFIX}:{tier}:unread:{shard_tag(shard)}"


def unread_origin(tier: str, shard: int) -> str:
    """Hash user -> origin of the prefetch that stored the unread entry (usefulness)."""
    return f"{PREFIX}:{tier}:unread-origin:{shard_tag(shard)}"


def activity_index(shard: int) -> str:
    """Zset user -> last active (epoch ms), fed by reads and POST /api/activity."""
    return f"{PREFIX}:activity:last:{shard_tag(shard)}"


def activity_frequency(shard: int) -> str:
    """Hash user -> activity flushes that saw the user since its session began (frequency)."""
    return f"{PREFIX}:activity:freq:{shard_tag(shard)}"


def changed_index(shard: int) -> str:
    """Zset user -> when an event changed the timeline of a user who was not reading
    (a deferred refresh, done at the user's next app open: engine/strategies/events.py)."""
    return f"{PREFIX}:activity:changed:{shard_tag(shard)}"


def predict_profile(shard: int) -> str:
    """Hash user -> packed habits (engine/strategies/profile.lua)."""
    return f"{PREFIX}:predict:profile:{shard_tag(shard)}"


def predict_index(shard: int) -> str:
    """Zset user -> when the predictive strategy wants the user's entry ready (epoch ms)."""
    return f"{PREFIX}:predict:next:{shard_tag(shard)}"


def strategy_claims(shard: int) -> str:
    """Zset user -> until when a strategy batch holding the user is in flight (epoch ms)."""
    return f"{PREFIX}:strategy:claims:{shard_tag(shard)}"


def metrics_day(day: str) -> str:
    """Hash of counters for one UTC day `YYYY-MM-DD`."""
    return f"{PREFIX}:metrics:{{m}}:day:{day}"


METRICS_TOTAL = f"{PREFIX}:metrics:{{m}}:total"  # hash of lifetime counters (same slot)
# The strategy scheduler's lease (value `<fencing token>:<identity>`) and the counter its
# tokens come from, in the queue DB: the enqueue script checks the lease (jobs.Fence).
SCHEDULER_LEASE = f"{PREFIX}:scheduler:{{leader}}:lease"
SCHEDULER_TOKENS = f"{PREFIX}:scheduler:{{leader}}:tokens"
SCHEDULER_STATUS = f"{PREFIX}:scheduler:{{leader}}:status"  # hash: the last tick's report
SCHEDULER_TICKS = f"{PREFIX}:scheduler:{{leader}}:ticks"  # hash identity -> ticks it ran
# The last FENCED_ENQUEUES_KEEP enqueues made under a fence, newest first, each
# `<lease value> <Redis time in ms>` (push.lua): which leader enqueued what, and when.
FENCED_ENQUEUES = f"{PREFIX}:scheduler:{{leader}}:enqueues"
FENCED_ENQUEUES_KEEP = 1000
# Health checks write it (with a short expiry) to find out whether Redis accepts writes.
HEALTH_PROBE = f"{PREFIX}:health:probe"
