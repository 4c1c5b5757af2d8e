"""Lane consumers of a worker wake up when the bridge puts records on their lane."""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
import fakeredis
from dramatiq.brokers.redis import RedisBroker

from bridge.enqueue import enqueue_many
from bridge.keys import topic_lane_name
from bridge.worker.waker import WakeableConsumer, Waker, is_lane

LANE = topic_lane_name("g", "orders")
#: A worker timeout so long that only a wake-up can end an idle consumer's wait within a test.
LONG_MS = 600_000


def message(n: int, queue: str = LANE) -> dramatiq.Message[Any]:
    return dramatiq.Message(queue_name=queue, actor_name="a", args=(n,), kwargs={}, options={})


def test_only_lanes_get_a_wakeable_consumer_and_their_delay_queues_keep_dramatiqs_polling() -> None:
    broker = RedisBroker(client=fakeredis.FakeRedis())
    waker = Waker()
    waker.install(broker)
    waker.install(broker)  # once: a second install wraps nothing twice
    try:
        assert isinstance(broker.consume(LANE, prefetch=2, timeout=1000), WakeableConsumer)
        assert not isinstance(broker.consume(LANE + ".DQ", prefetch=2, timeout=1000), WakeableConsumer)
        assert not isinstance(broker.consume("default", prefetch=2, timeout=1000), WakeableConsumer)
        assert is_lane("kdb.g.orders.3") and not is_lane("kdb.g.orders.3.DQ") and not is_lane("orders")
    finally:
        waker.close()


class Empty:
    """A consumer whose fetches find nothing."""

    def __init__(self) -> None:
        self.fetches = 0

    def __next__(self) -> None:
        self.fetches += 1
        return None


def test_an_idle_consumer_backs_off_like_dramatiq_until_a_wake_up_ends_the_wait() -> None:
    wake = threading.Event()
    inner = Empty()
    consumer = WakeableConsumer(inner, wake, timeout_ms=40)
    for _ in range(6):
        assert next(consumer) is None
    assert inner.fetches == 6, "each call fetches once and then waits its back-off"
    slow = WakeableConsumer(Empty(), wake, timeout_ms=LONG_MS)
    slow.misses = 30  # a back-off of minutes
    threading.Timer(0.2, wake.set).start()
    began = time.monotonic()
    assert next(slow) is None
    assert time.monotonic() - began < 60, "the wake-up, not the back-off, ended the wait"
    assert not wake.is_set() and slow.misses == 0, "after a wake-up the back-off starts over"


def test_records_put_on_a_lane_reach_its_idle_consumer_before_its_back_off_ends() -> None:
    server = fakeredis.FakeServer()
    broker = RedisBroker(client=fakeredis.FakeRedis(server=server))
    waker = Waker()
    waker.install(broker)
    consumer = broker.consume(LANE, prefetch=4, timeout=LONG_MS)
    assert isinstance(consumer, WakeableConsumer)
    got: list[Any] = []

    def consume() -> None:
        while not got:
            item = next(consumer)
            if item is not None:
                got.append(item)

    try:
        assert next(consumer) is None  # idle: the lane is empty
        consumer.misses = 30
        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        time.sleep(0.5)  # the consumer is waiting out a back-off of minutes now
        enqueue_many(broker, [message(7)])
        thread.join(60)
        assert [m.args for m in got] == [(7,)]
    finally:
        waker.close()
