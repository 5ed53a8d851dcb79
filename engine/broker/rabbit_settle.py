"""Settling jobs that came from RabbitMQ: publish what they enqueued, write their outcomes, ack.

On Redis one script writes a job's outcome and acknowledges its message. Here the message is on
RabbitMQ and the outcome in Redis, so the settler orders the steps so that a crash between two
of them repeats work and never loses it:

1. publish the messages the job enqueued (its retry), waiting for the broker's confirms;
2. write the outcomes in Redis (rabbit_outcome.lua), each under a marker for that delivery
   (message id and attempt) kept SETTLED_TTL_MS, so that it is written once;
3. acknowledge (or dead-letter, or hand back) each message on its consumer's channel.

A crash after 1 leaves a retry message without its outcome: the job runs again and publishes
the same retry (same message id and attempt, so both copies settle one outcome). A crash after
2 leaves an outcome without its ack: the broker redelivers the message (flagged `redelivered`),
the executor finds the marker and only acknowledges it. Redis or RabbitMQ failing in any step
makes the whole batch try again later, and the messages stay unacknowledged meanwhile.

Each worker also reports what it holds (received, not yet acknowledged: running, waiting in
memory, delayed until their eta) in a gauge, written with every settle and each second, which
the queue stats add to the broker's ready counts (engine/broker/rabbit_jobs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from dramatiq.broker import MessageProxy
from dramatiq.common import q_name

from engine.broker import rabbit_broker
from engine.broker.dramatiq_worker import LoopWorker
from engine.broker.executor import Finished
from engine.broker.jobs import QUEUES
from engine.broker.rabbit_broker import PrefetchRabbitBroker, Publisher
from engine.store import keys
from engine.store.fastredis import Arg, FastRedis, Script

log = logging.getLogger(__name__)

_OUTCOME = Script.load(__file__, "outcome_ops.lua", "rabbit_outcome.lua")

# Longer than a lost ack can take to come back: at once when a worker dies, within two
# heartbeats (RabbitMQ's default 60 s) when a worker is frozen or cut off.
SETTLED_TTL_MS = 600_000
PUBLISH_TIMEOUT_S = 10.0
GAUGE_EVERY_S = 1.0  # rewritten at least this often (the stats drop a gauge gone stale)
GAUGE_CHECK_S = 0.05  # and within this of a change
CLOSE_TIMEOUT_S = 5.0


def settled_key(message: MessageProxy) -> str:
    """The marker of this delivery's outcome: its message id and attempt."""
    return keys.settled_job(message.message_id, int(message.options.get("retries", 0)))


class RabbitSettler:
    """The executor's settler on RabbitMQ (see the module docstring)."""

    def __init__(
        self,
        broker: PrefetchRabbitBroker,
        worker: LoopWorker,
        redis: FastRedis,
        failed_keep: int,
    ) -> None:
        self._broker = broker
        self._worker = worker
        self._redis = redis
        self._failed_keep = failed_keep
        self._publisher = Publisher(broker, threads=2, owner=False)  # the worker closes it
        self._queues = list(QUEUES.values())
        self._settling: list[Finished] = []
        self._heartbeat: asyncio.Task[None] | None = None

    # --- the executor's settler -----------------------------------------------------------------

    def may_be_settled(self, message: MessageProxy) -> bool:
        return bool(getattr(message, "redelivered", False))

    async def is_settled(self, message: MessageProxy) -> bool:
        return bool(await self._redis.execute("EXISTS", settled_key(message)) == 1)

    async def settle(self, batch: list[Finished]) -> list[bool]:
        await asyncio.gather(*(self._publish(done) for done in batch))
        groups: list[Arg] = []
        outcomes = [done for done in batch if done.verb != "back"]  # back: no outcome
        for done in outcomes:
            ledger = done.ledger
            groups += [settled_key(done.message), ledger.op_count if ledger else 0]
            if ledger is not None:
                groups += ledger.ops
        self._settling = batch
        try:
            written = await self._redis.evalsha_or_eval(
                _OUTCOME,
                [keys.JOBS_COMPLETED, keys.JOBS_FAILED, keys.FAILED_JOBS, keys.QUEUE_GAUGES],
                [
                    SETTLED_TTL_MS,
                    self._failed_keep,
                    self._broker.broker_id,
                    self._gauge(),
                    *groups,
                ],
            )
        finally:
            self._settling = []
        for done in batch:
            thread = self._worker.consumer_of(done.message)
            rabbit_broker.acknowledge(thread, done.message, done.verb)
        first = {id(done): flag == 1 for done, flag in zip(outcomes, written, strict=True)}
        return [first.get(id(done), False) for done in batch]

    async def _publish(self, done: Finished) -> None:
        if done.published or done.ledger is None or not done.ledger.messages:
            return
        await asyncio.gather(
            *(
                self._publisher.publish(out.message, out.delay, PUBLISH_TIMEOUT_S)
                for out in done.ledger.messages
                if out.message is not None
            )
        )
        done.published = True

    # --- the gauge ------------------------------------------------------------------------------

    def _gauge(self) -> str:
        """What this worker holds per queue, less the messages being settled now."""
        active = dict.fromkeys(self._queues, 0)
        delayed = dict.fromkeys(self._queues, 0)
        for name, thread in list(self._worker.consumers.items()):
            counts = delayed if name.endswith(".DQ") else active
            counts[q_name(name)] += rabbit_broker.held(thread)
        for done in self._settling:
            name = done.message.queue_name
            counts = delayed if name.endswith(".DQ") else active
            counts[q_name(name)] = max(0, counts[q_name(name)] - 1)
        return rabbit_broker.encode_gauge(active, delayed, self._queues)

    def start(self) -> None:
        """Report the gauge on change and each second, the first time once every consumer is
        connected."""
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    def _connected(self) -> bool:
        consumers: Any = self._worker.consumers
        return bool(consumers) and all(t.consumer is not None for t in list(consumers.values()))

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        last, written_at = "", 0.0
        while True:
            await asyncio.sleep(GAUGE_CHECK_S)
            # The first report says that this worker consumes: once its consumers are connected.
            if self._settling or not self._connected():
                continue
            gauge = self._gauge()
            if gauge.split(" ", 1)[1] == last and loop.time() - written_at < GAUGE_EVERY_S:
                continue
            try:
                await self._redis.execute("HSET", keys.QUEUE_GAUGES, self._broker.broker_id, gauge)
            except Exception as exc:  # Redis away: the stats lose this worker meanwhile
                log.debug("gauge not written: %r", exc)
                continue
            last, written_at = gauge.split(" ", 1)[1], loop.time()

    async def close(self) -> None:
        """Stop reporting and remove this worker's gauge (it holds nothing any more)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        try:
            await asyncio.wait_for(
                self._redis.execute("HDEL", keys.QUEUE_GAUGES, self._broker.broker_id),
                CLOSE_TIMEOUT_S,
            )
        except Exception as exc:  # it goes stale, and the supervisor removes it
            log.warning("could not remove this worker's gauge: %r", exc)
        await self._publisher.close()
