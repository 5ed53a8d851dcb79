"""Managed Redis: ACL users with URL-quoted passwords and TLS (CA, client certificate, verify)
honoured by the redis-py clients of the queue role (Dramatiq's broker pool, the supervisor's
Recovery) and refused at start when malformed. Against a `redis-server` started here with
TLS only, certificates made by openssl and an ACL file (tests/redis_servers.py); the cluster
client's TLS is tested on a TLS Cluster in test_cluster.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from engine.broker import dramatiq_layout as layout
from engine.broker.jobs import QUEUES, job_kwargs, job_message
from engine.broker.worker import broker_pool, make_broker
from engine.errors import ConfigError
from engine.settings import Settings, load_settings
from engine.store.endpoint import RedisAddress
from engine.supervisor import Recovery
from tests.redis_servers import (
    APP_PASSWORD,
    READER_PASSWORD,
    READER_USER,
    SingleNode,
    make_certificates,
)


@pytest.fixture(scope="module")
def managed() -> Iterator[SingleNode]:
    """A TLS-only Redis with ACL users; client certificates optional."""
    with SingleNode(secure=True) as node:
        yield node


def _queue_settings(url: str) -> Settings:
    return Settings().with_overrides(broker_url=url, db_queue=0)


def _ping(url: str) -> bool:
    client = redis.Redis(connection_pool=broker_pool(_queue_settings(url)))
    try:
        return bool(client.ping())
    finally:
        client.close()


# --- settings: what start refuses, with one line ---------------------------------------------


def test_cluster_mode_needs_its_queue_on_a_node_of_its_own() -> None:
    with pytest.raises(ConfigError, match=r"^REDIS_CLUSTER_MODE=true needs BROKER_URL"):
        load_settings({"REDIS_CLUSTER_MODE": "true", "REDIS_URL": "redis://10.0.0.1:7000"})
    # RabbitMQ's side of the queue (pending marks, failed list, lease) would land on the Cluster.
    with pytest.raises(ConfigError, match=r"^REDIS_CLUSTER_MODE=true needs BROKER_URL=redis://"):
        load_settings(
            {
                "REDIS_CLUSTER_MODE": "true",
                "REDIS_URL": "redis://10.0.0.1:7000",
                "BROKER_URL": "amqp://guest:guest@10.0.0.2:5672/",
            }
        )
    with pytest.raises(ConfigError, match="not a unix socket"):
        load_settings(
            {
                "REDIS_CLUSTER_MODE": "true",
                "REDIS_URL": "unix:///run/redis.sock",
                "BROKER_URL": "redis://127.0.0.1:6379/2",
            }
        )
    settings = load_settings(
        {
            "REDIS_CLUSTER_MODE": "true",
            "REDIS_URL": "redis://10.0.0.1:7000",
            "BROKER_URL": "redis://10.0.0.2:6379/2",
        }
    )
    assert settings.redis_cluster_mode
    assert settings.queue_redis_url == "redis://10.0.0.2:6379/2"


def test_without_broker_url_the_queue_stays_in_the_cache_redis() -> None:
    settings = load_settings({"REDIS_URL": "redis://10.0.0.1:6379"})
    assert settings.queue_redis_url == "redis://10.0.0.1:6379"


@pytest.mark.parametrize(
    ("variable", "url", "complaint"),
    [
        ("REDIS_URL", "redis://h:6379?ssl_ca_certs=/etc/ca.pem", "ssl_ca_certs needs a rediss://"),
        ("BROKER_URL", "rediss://h:6379?ssl_ca_certs=/nowhere/ca.pem", "is not a readable file"),
        ("REDIS_URL", "rediss://h:6379?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
        ("BROKER_URL", "amqp://guest@h:5672", "with both user and password"),
    ],
)
def test_malformed_tls_options_stop_the_start_naming_the_variable(
    variable: str, url: str, complaint: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({variable: url})
    message = str(caught.value)
    assert message.startswith(f"{variable}=") and complaint in message
    assert "\n" not in message


def test_a_client_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    with pytest.raises(ConfigError, match="ssl_certfile and ssl_keyfile go together"):
        load_settings({"REDIS_URL": f"rediss://h:6380?ssl_certfile={certs.client_cert}"})


def test_user_and_password_are_url_unquoted() -> None:
    endpoint = RedisAddress.parse("rediss://app%3Aone:p%40ss%2Fw%3Ard@cache.example:6380")
    assert (endpoint.username, endpoint.password) == ("app:one", "p@ss/w:rd")
    assert (endpoint.host, endpoint.port, endpoint.tls, endpoint.tls_options.verify) == (
        "cache.example",
        6380,
        True,
        True,
    )
    assert "p@ss" not in str(endpoint)  # logs never show the password


# --- the queue role's redis-py clients over TLS with an ACL user ------------------------------


def test_broker_pool_authenticates_as_an_acl_user_over_verified_tls(managed: SingleNode) -> None:
    assert _ping(managed.url())
    assert _ping(managed.url(client_cert=True))
    # The password is URL-quoted in the URL and reaches Redis unquoted: a wrong one is refused.
    with pytest.raises(redis.AuthenticationError):
        _ping(managed.url(password=APP_PASSWORD + "x"))


def test_tls_verification_is_on_unless_switched_off(managed: SingleNode, tmp_path: Path) -> None:
    stranger = make_certificates(tmp_path)  # a CA that did not sign the server's certificate
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        _ping(managed.url(ca=stranger.ca))
    assert _ping(managed.url(verify=False))  # ssl_cert_reqs=none: a test rig only


def test_a_read_only_acl_user_cannot_write(managed: SingleNode) -> None:
    url = managed.url(user=READER_USER, password=READER_PASSWORD)
    client = redis.Redis(connection_pool=broker_pool(_queue_settings(url)))
    try:
        assert client.get("anything") is None
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("anything", "1")
    finally:
        client.close()


def test_dramatiq_broker_enqueues_over_tls(managed: SingleNode) -> None:
    broker, _, _ = make_broker(_queue_settings(managed.url(client_cert=True)))
    try:
        message = broker.enqueue(
            job_message("low", (str(uuid.uuid4()), "job"), job_kwargs("schedule", False))
        )
        admin = managed.client()
        waiting = admin.lrange(layout.queue_key(QUEUES["low"]), 0, -1)
        assert message.options["redis_message_id"].encode() in waiting
    finally:
        broker.close()


def test_recovery_hands_messages_back_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    with SingleNode(secure=True, mutual=True) as strict:
        admin = strict.client()
        queue = QUEUES["medium"]
        dead = f"host:1:1:{uuid.uuid4()}"
        admin.hset(layout.messages_key(queue), "m1", b"{}")
        admin.sadd(f"{layout.NAMESPACE}:__acks__.{dead}.{queue}", "m1")

        # Without a client certificate the server refuses the TLS handshake.
        with pytest.raises(redis.ConnectionError):
            _ping(strict.url())
        recovery = Recovery(_queue_settings(strict.url(client_cert=True)))
        recovery.submit(1, dead)
        assert recovery.wait_idle(20)
        assert admin.lrange(layout.queue_key(queue), 0, -1) == [b"m1"]
        assert not admin.exists(f"{layout.NAMESPACE}:__acks__.{dead}.{queue}")
