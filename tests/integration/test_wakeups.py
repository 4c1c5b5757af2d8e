"""Lane wake-ups through a real redis-server, and a task broker user whose ACL leaves them out:
records still go on their lanes, and consumers poll as stock dramatiq does."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from bridge.enqueue import enqueue_many
from bridge.keys import WAKE_PATTERN, topic_lane_name
from bridge.worker.waker import WakeableConsumer, Waker
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

LANE = topic_lane_name("g", "wakeups")


def message(n: int) -> dramatiq.Message[Any]:
    return dramatiq.Message(queue_name=LANE, actor_name="a", args=(n,), kwargs={}, options={})


def broker_as(redis_client: redis.Redis, user: str, rule: str) -> RedisBroker:
    # dramatiq's scripts name the bare namespace as a key too: ~dramatiq* rather than ~dramatiq:*.
    redis_client.execute_command("ACL", "SETUSER", user, "reset", "on", ">secret", *rule.split())
    kwargs = redis_client.connection_pool.connection_kwargs
    return RedisBroker(client=redis.Redis(host=kwargs["host"], port=kwargs["port"], db=kwargs.get("db", 0),
                                          username=user, password="secret"))


@pytest.fixture
def users(redis_client: redis.Redis) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for user in made:
        redis_client.execute_command("ACL", "DELUSER", user)


def test_a_broker_user_without_the_wake_channel_still_enqueues_and_its_consumers_poll(
    redis_client: redis.Redis, users: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    users.append("kdb-test-broker")
    broker = broker_as(redis_client, "kdb-test-broker", "~dramatiq* resetchannels +@all")
    waker = Waker()
    waker.install(broker)
    try:
        with caplog.at_level(logging.WARNING):
            consumer = broker.consume(LANE, prefetch=4, timeout=100)
            assert isinstance(consumer, WakeableConsumer)
            enqueue_many(broker, [message(1)])
            enqueue_many(broker, [message(2)])  # the refusal is remembered: no second warning
            got: list[Any] = []
            wait_until(lambda: (got.extend(m for m in [next(consumer)] if m is not None), len(got) == 2)[1], 30,
                       message="the records never reached the consumer")
        assert [m.args for m in got] == [(1,), (2,)]
        text = caplog.text
        assert text.count("may not publish on kdb:wake:") == 1, text
        wait_until(lambda: f"may not subscribe to {WAKE_PATTERN}" in caplog.text, 30,
                   message="the worker side never said it polls")
    finally:
        waker.close()


def test_with_the_channel_granted_the_enqueue_wakes_a_subscriber_of_the_lane(
    redis_client: redis.Redis, users: list[str]
) -> None:
    users.append("kdb-test-broker-2")
    broker = broker_as(redis_client, "kdb-test-broker-2", f"~dramatiq* resetchannels &{WAKE_PATTERN} +@all")
    listener = broker.client.pubsub()
    listener.psubscribe(WAKE_PATTERN)
    try:
        wait_until(lambda: listener.get_message(timeout=0.1) is not None, 10, message="not subscribed")
        enqueue_many(broker, [message(3)])
        seen: list[Any] = []
        wait_until(lambda: (seen.append(listener.get_message(timeout=0.1)), any(
            m and m.get("type") == "pmessage" for m in seen))[1], 10, message="no wake-up published")
        assert any(m and m.get("channel") == f"kdb:wake:{LANE}".encode() for m in seen)
    finally:
        listener.close()
