"""The parts of the worker middleware: signs of life, the hand-off, refusals and decoding."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import SkipMessage

from bridge.keys import PartitionKeys
from bridge.protocol import OPTION, Meta, UnknownVersion, registration_json
from bridge.worker.admission import REFUSED_DELAY_MS, Refusals, decode
from bridge.worker.handoff import Handoff, Untagged
from bridge.worker.signs import Signs
from tests.unit.parts import GROUP, T, handler

KEYS = PartitionKeys(GROUP, T, 0)


def message(offset: int, **fields: Any) -> dramatiq.MessageProxy:
    return dramatiq.MessageProxy(
        dramatiq.Message(
            queue_name="lane", actor_name="handle", args=({"kdb": 1, "t": T, "p": 0, "o": offset, "k": None,
                                                         "v": "e25vdA==", "h": [], "ts": None},),
            kwargs={}, options={OPTION: Meta(GROUP, T, 0, offset, 1, **fields).to_option()},
        )
    )


def test_signs_of_life_count_each_running_copy_and_each_parked_record() -> None:
    signs = Signs()
    signs.running((KEYS, 3), "a", (1, 1, 0, "a", "host:1:2"))
    signs.running((KEYS, 3), "b", (1, 2, 0, "b", "host:1:3"))
    signs.parked((KEYS, 4))
    signs.parked((KEYS, 4))
    signs.finished((KEYS, 3), "a")
    signs.unparked((KEYS, 4))
    beats = signs.beats()[KEYS]
    assert beats.running == [(3, "b", registration_json(1, 2, 0, "b", "host:1:3"))] and beats.parked == [4]
    signs.finished((KEYS, 3), "b")
    signs.unparked((KEYS, 4))
    assert signs.beats() == {}


def test_without_a_redis_broker_a_record_runs_again_through_its_lane_with_its_recorded_start() -> None:
    broker = StubBroker()
    broker.declare_queue("lane")
    handoff = Handoff(Signs())
    handoff.boot(broker, dramatiq.Worker(broker, worker_threads=1))
    assert handoff.run_again(message(5, prev=4), token="tok") is False
    back = dramatiq.Message.decode(broker.queues["lane"].get())
    assert Meta.from_option(back.options[OPTION]).token == "tok"
    assert handoff.waiting == 0


def test_a_refused_message_goes_back_delayed_and_the_refusal_is_logged_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = StubBroker()
    broker.declare_queue("lane")
    refusals = Refusals()
    caplog.set_level(logging.ERROR, "bridge.worker")
    for _ in range(3):
        refusals.refuse(message(5, version=9), UnknownVersion(9), broker)
    assert broker.queues["lane.DQ"].qsize() == 3
    assert len([r for r in caplog.records if "refusing" in r.getMessage()]) == 1
    eta = dramatiq.Message.decode(broker.queues["lane.DQ"].get()).options["eta"]
    assert eta > 0 and REFUSED_DELAY_MS == 10_000


def test_an_undecodable_value_fails_the_message_before_the_actor_runs() -> None:
    undecodable = message(5)
    with pytest.raises(SkipMessage):
        decode(undecodable, Meta(GROUP, T, 0, 5, 1), handler(value_codec="json"), 128)
    assert undecodable.failed
    assert undecodable.options["kdb_error"]["type"] == "DecodeError"


class _Channel:
    def basic_qos(self, prefetch_count: int) -> None:
        pass

    def consume(self, queue: str, inactivity_timeout: float) -> Any:
        return iter(())


class _Connection:
    def __init__(self, parameters: Any) -> None:
        pass

    def channel(self) -> _Channel:
        return _Channel()

    def add_callback_threadsafe(self, callback: Any) -> None:
        raise AssertionError("a record run again must not acknowledge any delivery tag")


def test_on_rabbitmq_a_record_runs_again_from_the_work_queue_and_its_acknowledgement_is_quiet(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dramatiq.brokers import rabbitmq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqConsumer

    broker = RabbitmqBroker(url="amqp://127.0.0.1:1")  # connects on first use only; nothing uses it
    worker = dramatiq.Worker(broker, worker_threads=1)
    worker.consumers["lane"] = object()  # type: ignore[assignment]  # this process consumes the lane
    handoff = Handoff(Signs())
    handoff.boot(broker, worker)
    assert handoff.run_again(message(5, prev=4), token="tok") is True
    item = worker.work_queue.get_nowait()
    proxy = getattr(item, "message", None) or item[1]  # dramatiq 2.x item, or 1.x's (priority, message)
    assert isinstance(proxy, Untagged)
    assert handoff.waiting == 1
    # dramatiq acknowledges it like any message of the lane: the consumer finds no tag and warns.
    monkeypatch.setattr(rabbitmq.pika, "BlockingConnection", _Connection)
    takes_broker = "broker" in inspect.signature(_RabbitmqConsumer.__init__).parameters  # dramatiq 2.x
    consumer = _RabbitmqConsumer(broker if takes_broker else broker.parameters, "lane", 1, 1000)
    consumer.known_tags.add(1)
    with caplog.at_level(logging.WARNING):
        assert handoff.ended(proxy) == ("tok", 0)
        consumer.ack(proxy)
        consumer.nack(proxy)
        assert not [r for r in caplog.records if "known tags" in r.getMessage()], "the warning is dropped"
        delivery = rabbitmq._RabbitmqMessage(False, 7, message(6)._message)  # acknowledged before
        handoff.ended(delivery)
        consumer.ack(delivery)
    assert [r.getMessage() for r in caplog.records] == ["Failed to ack message: not in known tags."], (
        "a delivery acknowledged twice is still reported")
    assert consumer.known_tags == {1}, "no delivery of the lane was acknowledged"
