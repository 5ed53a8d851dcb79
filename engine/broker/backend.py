"""The queue's backend, as BROKER_URL chooses it: Dramatiq's Redis broker or its RabbitMQ one.

Unset (or a redis:// URL), the queue is Dramatiq's RedisBroker on the queue role's Redis and
every queue operation is one atomic script there (engine/broker/jobs.py). An amqp:// URL puts
the messages on RabbitMQ (engine/broker/rabbit_jobs.py) and keeps the marks, the failed list,
the counters and the scheduler lease in the queue role's Redis.
"""

from __future__ import annotations

from engine.broker.jobs import JobQueue
from engine.broker.rabbit_broker import Publisher, make_rabbit_broker
from engine.broker.rabbit_jobs import RabbitJobQueue
from engine.settings import Settings
from engine.store.fastredis import FastRedis


def open_job_queue(settings: Settings, redis: FastRedis) -> JobQueue:
    """The job queue of this deployment over `redis` (the queue role's client); close it."""
    if settings.broker_kind == "rabbitmq":
        return RabbitJobQueue(redis, Publisher(make_rabbit_broker(settings)), settings)
    return JobQueue(redis)
