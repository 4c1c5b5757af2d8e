"""Pipelined enqueue puts messages exactly where ``broker.enqueue`` would, in order."""

from __future__ import annotations

from typing import Any

import dramatiq
import fakeredis
import pytest
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Middleware

from bridge.enqueue import enqueue_many, hands_over, pipelined
from bridge.errors import PartialDispatch, TaskBrokerUnavailable


class Seen(Middleware):
    def __init__(self) -> None:
        self.before: list[str] = []
        self.after: list[str] = []

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        self.before.append(message.options["n"])

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        self.after.append(message.options["n"])


def message(n: int, queue: str = "lane") -> dramatiq.Message[Any]:
    return dramatiq.Message(queue_name=queue, actor_name="a", args=(n,), kwargs={}, options={"n": str(n)})


def test_the_redis_broker_gets_one_pipeline_with_the_stock_layout() -> None:
    client = fakeredis.FakeRedis()
    broker = RedisBroker(client=client)
    seen = Seen()
    broker.add_middleware(seen)
    assert pipelined(broker)
    broker.enqueue(message(0))
    enqueue_many(broker, [message(n) for n in range(1, 6)])
    ids = [i.decode() for i in client.lrange("dramatiq:lane", 0, -1)]
    bodies = [dramatiq.Message.decode(client.hget("dramatiq:lane.msgs", i)) for i in ids]
    assert [b.args for b in bodies] == [(n,) for n in range(6)]
    assert len(set(ids)) == 6, "every copy gets its own redis_message_id"
    assert all(b.options["redis_message_id"] == i for b, i in zip(bodies, ids, strict=True))
    assert seen.before == seen.after == [str(n) for n in range(6)]


def test_other_brokers_get_enqueue_per_message() -> None:
    broker = StubBroker()
    broker.declare_queue("lane")
    assert not pipelined(broker)
    enqueue_many(broker, [message(n) for n in range(3)])
    assert broker.queues["lane"].qsize() == 3


def test_a_failing_redis_reports_that_nothing_is_known_sent() -> None:
    server = fakeredis.FakeServer()
    broker = RedisBroker(client=fakeredis.FakeRedis(server=server))
    broker._max_unpack_size()
    server.connected = False
    with pytest.raises(PartialDispatch) as raised:
        enqueue_many(broker, [message(n) for n in range(3)])
    assert raised.value.sent == 0
    assert isinstance(raised.value.cause, TaskBrokerUnavailable)


def test_records_behind_an_unfinished_one_are_staged_for_dramatiqs_redis_and_rabbitmq_brokers_only() -> None:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    assert hands_over(RedisBroker(client=fakeredis.FakeRedis()))
    assert hands_over(RabbitmqBroker(url="amqp://127.0.0.1:1"))  # connects on first use only
    assert not hands_over(StubBroker()), "any other broker: every record goes on its lane and parks"
