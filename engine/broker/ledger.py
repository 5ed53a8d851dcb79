"""What one step of the job engine will write at once: messages enqueued and settle ops.

While a job runs inside `deferred()`, the broker (either backend) does not send the messages
that Dramatiq enqueues meanwhile (a retry) but records them here, beside the job's outcome
(completion, the pending mark following a retry, a failed-list record). The backend then
writes them together with the message's acknowledgement: in one atomic script on Redis
(engine/broker/dramatiq_layout.py), or publish-confirm, outcome, ack on RabbitMQ
(engine/broker/rabbit_settle.py).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dramatiq

from engine.store.fastredis import Arg


def canonical(queue: str) -> str:
    """`X` for `X.DQ`."""
    return queue.removesuffix(".DQ")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message as the broker's enqueue would send it: on `queue` (a delay queue `X.DQ` when
    delayed), under `redis_id` (Redis: the id in its queue; RabbitMQ: the message id).

    Redis keeps the encoded `data`; RabbitMQ keeps the `message` and its `delay`, which the
    settler hands to Dramatiq's own `enqueue`.
    """

    queue: str
    redis_id: str
    data: bytes = b""
    message: dramatiq.Message[Any] | None = None
    delay: int | None = None


@dataclass(slots=True)
class Ledger:
    """What a step will write atomically: messages enqueued meanwhile, and settle ops.

    `on_settled`: what to do in this process once the step's settle landed and the message
    was still this worker's (the in-memory stats count the outcome exactly when Redis did).
    """

    messages: list[Outgoing] = field(default_factory=list)
    ops: list[Arg] = field(default_factory=list)
    op_count: int = 0
    on_settled: list[Callable[[], None]] = field(default_factory=list)

    def clear_pending(self, pending_key: str, job_id: str) -> None:
        """The job is over: drop the user's pending mark if it is still this job's."""
        self.ops += ("clear", pending_key, job_id)
        self.op_count += 1

    def move_pending(self, pending_key: str, job_id: str, message: Outgoing) -> None:
        """The job's next attempt is `message`: its pending mark follows it."""
        self.ops += ("move", pending_key, job_id, canonical(message.queue), message.redis_id)
        self.op_count += 1

    def completed(self, count: int) -> None:
        """Count `count` jobs that finished well."""
        if count:
            self.ops += ("completed", count)
            self.op_count += 1

    def failed(self, record: bytes) -> None:
        """Count a job that failed for good and keep its record in the failed list."""
        self.ops += ("failed", record)
        self.op_count += 1

    def settle_args(self) -> list[Arg]:
        """The ops, with every captured message pushed first (the Redis layout)."""
        pushed: list[Arg] = []
        for m in self.messages:
            pushed += ("push", m.queue, m.redis_id, m.data)
        return pushed + self.ops

    @property
    def total_ops(self) -> int:
        return len(self.messages) + self.op_count


_ledger: contextvars.ContextVar[Ledger | None] = contextvars.ContextVar(
    "prefetch_ledger", default=None
)


@contextlib.contextmanager
def deferred() -> Iterator[Ledger]:
    """Within this block (this task or thread only), Dramatiq's enqueues go to the ledger."""
    ledger = Ledger()
    token = _ledger.set(ledger)
    try:
        yield ledger
    finally:
        _ledger.reset(token)


def active() -> Ledger | None:
    """The ledger of this task or thread, if a step is recording."""
    return _ledger.get()


def current_ledger() -> Ledger:
    """The ledger of the step in progress (a job run by the executor)."""
    ledger = _ledger.get()
    if ledger is None:
        raise RuntimeError("no ledger: not inside a job")
    return ledger
