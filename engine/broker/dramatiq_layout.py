"""Everything that knows how Dramatiq's RedisBroker lays out its queues in Redis.

Dramatiq (pinned to its minor version in pyproject.toml; tests/test_engine_layout.py checks
the assumptions) keeps, under a namespace, for each queue `Q`: a list `ns:Q` of waiting
message ids, a hash `ns:Q.msgs` id -> encoded message, the delayed twin `Q.DQ`, the
dead-letter set `ns:Q.XQ` (+ `.XQ.msgs`), one set `ns:__acks__.<broker id>.<Q>` per consumer
of the ids it fetched and has not acknowledged, and `ns:__heartbeats__`.

Messages are built by Dramatiq itself (`broker.enqueue`, `Actor.send_with_options`, the
Retries middleware); inside a `Ledger` the broker does not write them but records them, so
that our scripts can write them together with what must happen in the same atomic step: the
one-pending-job-per-user check (schedule.lua), a leader's fence (push.lua), or a job's
outcome and its acknowledgement (settle.lua). Every script here writes Dramatiq's layout
exactly as its own dispatch.lua does (tests compare the Redis state of both).
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import q_name

from engine import wire
from engine.broker import ledger as ledger_mod
from engine.broker.ledger import Ledger, Outgoing, canonical, current_ledger, deferred
from engine.store import keys
from engine.store.fastredis import Arg, FastRedis, Script

__all__ = ["Ledger", "Outgoing", "canonical", "current_ledger", "deferred"]

NAMESPACE = keys.QUEUE_NAMESPACE
HEARTBEATS = f"{NAMESPACE}:__heartbeats__"

SCHEDULE = Script.load(__file__, "schedule.lua")
PUSH = Script.load(__file__, "push.lua")
SETTLE = Script.load(__file__, "outcome_ops.lua", "settle.lua")
PROMOTE = Script.load(__file__, "promote.lua")
RECOVER = Script.load(__file__, "recover_acks.lua")
# Dramatiq's own script, run as its consumers run it (`fetch`): engine/broker/loop_consumer.py.
DISPATCH = Script(
    (resources.files("dramatiq.brokers") / "redis" / "dispatch.lua").read_text(encoding="utf-8")
)


def queue_key(queue: str) -> str:
    """The list of waiting message ids of a queue (or of a delay queue `X.DQ`)."""
    return f"{NAMESPACE}:{queue}"


def messages_key(queue: str) -> str:
    """The hash id -> encoded message of a queue."""
    return f"{NAMESPACE}:{queue}.msgs"


def dead_key(queue: str) -> str:
    """Dramatiq's dead-letter set of a queue (ids by when they died)."""
    return f"{NAMESPACE}:{queue}.XQ"


def acks_key(broker_id: str, queue: str) -> str:
    """A consumer's set of the ids of `queue` it fetched and has not acknowledged."""
    return f"{NAMESPACE}:__acks__.{broker_id}.{queue}"


def acks_pattern() -> str:
    """Every consumer's set of fetched-but-unacknowledged ids."""
    return f"{NAMESPACE}:__acks__.*"


def delay_queue(queue: str) -> str:
    return f"{queue}.DQ"


# --- messages, built by Dramatiq (recorded in a ledger: engine/broker/ledger.py) -------------


class PrefetchBroker(RedisBroker):
    """Dramatiq's RedisBroker, whose enqueues inside `deferred()` are recorded, not written."""

    def do_enqueue(self, queue_name: str, redis_id: str, data: bytes) -> Any:
        ledger = ledger_mod.active()
        if ledger is None:
            return self._dispatch("enqueue")(queue_name, redis_id, data)  # type: ignore[no-untyped-call]
        ledger.messages.append(Outgoing(queue_name, redis_id, data))
        return None


def encode(broker: dramatiq.Broker, message: dramatiq.Message[Any], delay_ms: int = 0) -> Outgoing:
    """`message` as `broker.enqueue(message, delay=...)` would write it (nothing is written)."""
    with deferred() as ledger:
        broker.enqueue(message, delay=delay_ms or None)
    (outgoing,) = ledger.messages
    return outgoing


def encoder_broker() -> PrefetchBroker:
    """A broker that only builds messages (the API's): no middleware, never connects."""
    # redis-py connects lazily, and this client is never used.
    client = redis.Redis()
    return PrefetchBroker(client=client, namespace=NAMESPACE, middleware=[])  # type: ignore[no-untyped-call]


# --- scripts over the layout ------------------------------------------------------------------


async def push(redis: FastRedis, message: Outgoing, fence: tuple[str, str] | None = None) -> bool:
    """Write `message` as Dramatiq's enqueue does; with a fence (key, value), only while the
    key holds the value, in the same atomic step (and noted in keys.FENCED_ENQUEUES).
    Returns whether it was written."""
    fence_keys: list[str] = [fence[0], keys.FENCED_ENQUEUES] if fence is not None else []
    fence_args: list[Arg] = [fence[1], keys.FENCED_ENQUEUES_KEEP] if fence is not None else []
    written = await redis.evalsha_or_eval(
        PUSH,
        [queue_key(message.queue), messages_key(message.queue), *fence_keys],
        [message.redis_id, message.data, *fence_args],
    )
    return bool(written == 1)


def settle_keys() -> list[str]:
    return [NAMESPACE, keys.JOBS_COMPLETED, keys.JOBS_FAILED, keys.FAILED_JOBS]


def settle_group(verb: str, queue: str, redis_id: str, ledger: Ledger | None) -> list[Arg]:
    """One message's part of a settle call: its verb (ack, nack, back) and its ledger's ops."""
    if ledger is None:
        return [verb, queue, redis_id, 0]
    return [verb, queue, redis_id, ledger.total_ops, *ledger.settle_args()]


async def settle(
    redis: FastRedis, broker_id: str, groups: list[Arg], failed_keep: int
) -> list[bool]:
    """Settle messages (see settle.lua) in one atomic step; per message, in order, whether it
    was still ours (and so settled by this call)."""
    reply = await redis.evalsha_or_eval(
        SETTLE, settle_keys(), [broker_id, int(time.time() * 1000), failed_keep, *groups]
    )
    return [flag == 1 for flag in reply]


# Most messages one fetch moves: dispatch.lua unpacks their ids in one call, and Lua's stack
# takes a few thousand (Dramatiq asks Redis for the limit, and uses half of it).
FETCH_CAP = 1_000


def fetch_args(broker: RedisBroker, queue: str, count: int) -> list[Arg]:
    """dispatch.lua's arguments for `fetch`, as `RedisBroker._dispatch` builds them (its
    heartbeat for this broker id, and now and then its maintenance of dead workers' acks)."""
    return [
        "fetch",
        int(time.time() * 1000),
        queue,
        str(broker.broker_id),
        broker.heartbeat_timeout,
        broker.dead_message_ttl,
        broker._should_do_maintenance("fetch"),
        FETCH_CAP,
        min(count, FETCH_CAP),
    ]


async def fetch(redis: FastRedis, broker: RedisBroker, queue: str, count: int) -> list[Any]:
    """Up to `count` encoded messages of `queue` (None for an id whose data is gone), moved
    to this broker id's ack set, as Dramatiq's consumer fetches them: one dispatch.lua call."""
    reply = await redis.evalsha_or_eval(DISPATCH, [NAMESPACE], fetch_args(broker, queue, count))
    return list(reply or ())


async def promote(redis: FastRedis, broker_id: str, message: Any) -> bool:
    """Move a delayed message (fetched from `Q.DQ` by this broker id) to `Q` under the same id,
    without its eta, in one step (promote.lua). False if it was no longer in the ack set."""
    ready = message.copy(queue_name=q_name(message.queue_name))  # options: a copy of its own
    del ready.options["eta"]
    reply = await redis.evalsha_or_eval(
        PROMOTE,
        [NAMESPACE],
        [broker_id, ready.queue_name, message.options["redis_message_id"], ready.encode()],
    )
    return bool(reply == 1)


async def beat(redis: FastRedis, broker: RedisBroker) -> None:
    """This broker id's heartbeat, as dispatch.lua beats it on every command."""
    await redis.execute("ZADD", HEARTBEATS, int(time.time() * 1000), str(broker.broker_id))


def rejection_group(message: Any, exc: BaseException | None) -> list[Arg]:
    """A settle group that dead-letters a message Dramatiq refuses to run (an unknown actor),
    with a failed-list record saying why."""
    args = message.args
    record = wire.FailedJob(
        id=str(message.message_id),
        userId=args[0] if args and isinstance(args[0], str) else "",
        priority=q_name(message.queue_name),
        failedReason=f"rejected by Dramatiq: {exc!r}",
        attempts=int(message.options.get("retries", 0)) + 1,
        timestamp=int(time.time() * 1000),
    )
    ledger = Ledger()
    ledger.failed(wire.json_encoder.encode(record))
    return settle_group("nack", message.queue_name, message.options["redis_message_id"], ledger)


def stats_commands(queues: list[str]) -> list[tuple[Arg, ...]]:
    """Per queue: waiting, messages (waiting + running), delayed, dead-lettered."""
    commands: list[tuple[Arg, ...]] = []
    for queue in queues:
        commands += [
            ("LLEN", queue_key(queue)),
            ("HLEN", messages_key(queue)),
            ("HLEN", messages_key(delay_queue(queue))),
            ("ZCARD", dead_key(queue)),
        ]
    return commands


def all_queues(queues: list[str]) -> list[str]:
    """Each queue and its delay queue."""
    return [q for name in queues for q in (name, delay_queue(name))]
