"""Lane messages on dramatiq's Redis broker are acknowledged in batches, to the same effect as
dramatiq's own acknowledgement."""

from __future__ import annotations

import logging
import time
from typing import Any

import dramatiq
import fakeredis
import pytest
from dramatiq.brokers.redis import RedisBroker

from bridge.keys import topic_lane_name
from bridge.worker.acks import Acks
from bridge.worker.waker import WakeableConsumer, Waker

LANE = topic_lane_name("g", "orders")


def message(n: int) -> dramatiq.Message[Any]:
    return dramatiq.Message(queue_name=LANE, actor_name="a", args=(n,), kwargs={}, options={})


def fetch(consumer: Any, count: int) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + 5
    while len(got) < count and time.monotonic() < deadline:
        item = next(consumer)
        if item is not None:
            got.append(item)
    return got


def state(broker: RedisBroker) -> dict[str, Any]:
    """Every key of the broker with the ids it holds, its broker id written as ``ID`` (heartbeats left out)."""
    client, found = broker.client, {}
    for raw in client.keys("*"):
        key = raw.decode()
        if key.endswith("__heartbeats__"):
            continue
        kind = client.type(raw).decode()
        value: Any
        if kind == "hash":
            value = set(client.hkeys(raw))  # ids only: each run's message ids are its own
        elif kind == "zset":
            value = set(client.zrange(raw, 0, -1))  # members only: the scores are timestamps
        elif kind == "set":
            value = client.smembers(raw)
        else:
            value = client.lrange(raw, 0, -1)
        found[key.replace(broker.broker_id, "ID")] = value
    return found


def run(wrapped: bool) -> dict[str, Any]:
    """Fetch the 6 lane messages with a prefetch of 2, acknowledge 3, reject 1, leave 2 unacknowledged."""
    broker = RedisBroker(client=fakeredis.FakeRedis())
    waker = Waker()
    if wrapped:
        waker.install(broker)
    ids = iter(f"m{n}" for n in range(100))
    for n in range(6):
        rid = next(ids)
        body = message(n).copy(options={"redis_message_id": rid}).encode()  # as dramatiq's enqueue writes it
        broker.client.hset(f"dramatiq:{LANE}.msgs", rid, body)
        broker.client.rpush(f"dramatiq:{LANE}", rid)
    consumer = broker.consume(LANE, prefetch=2, timeout=10)
    assert isinstance(consumer, WakeableConsumer) == wrapped
    first = fetch(consumer, 2)
    assert len(first) == 2
    consumer.ack(first[0])
    consumer.ack(first[1])
    # The prefetch counts acknowledged messages out at once, so the consumer fetches the next two.
    second = fetch(consumer, 2)
    assert [m.args[0] for m in first + second] == [0, 1, 2, 3]
    consumer.ack(second[0])
    consumer.nack(second[1])
    assert len(fetch(consumer, 1)) == 1, "its prefetch has room for one more"
    waker.flush()
    waker.close()
    return state(broker)


def test_batched_acknowledgements_leave_the_broker_as_dramatiqs_own_do() -> None:
    stock, ours = run(wrapped=False), run(wrapped=True)
    assert ours == stock
    acked = {b"m0", b"m1", b"m2"}
    assert not acked & set(ours[f"dramatiq:{LANE}.msgs"]), "acknowledged bodies are gone"
    assert ours[f"dramatiq:__acks__.ID.{LANE}"] == {b"m4", b"m5"}, "the last fetch's stay unacknowledged"


def counting(broker: RedisBroker) -> list[str]:
    calls: list[str] = []
    execute = broker.client.execute_command

    def execute_command(*args: Any, **options: Any) -> Any:
        calls.append(str(args[0]))
        return execute(*args, **options)

    broker.client.execute_command = execute_command  # type: ignore[method-assign]
    return calls


def fetched(broker: RedisBroker, queue: str, count: int) -> list[str]:
    """Put ``count`` fetched messages in the broker's ack set of ``queue``, as a fetch leaves them."""
    ids = [f"{queue}-{n}" for n in range(count)]
    broker.client.hset(f"dramatiq:{queue}.msgs", mapping={i: b"body" for i in ids})
    broker.client.sadd(f"dramatiq:__acks__.{broker.broker_id}.{queue}", *ids)
    return ids


def test_acknowledgements_of_several_lanes_go_in_one_round_trip() -> None:
    broker = RedisBroker(client=fakeredis.FakeRedis())
    lanes = [LANE, topic_lane_name("g", "payments")]
    ids = {lane: fetched(broker, lane, 40) for lane in lanes}
    acks = Acks(broker, linger=60.0)
    calls = counting(broker)
    for n in range(40):
        for lane in lanes:
            acks.add(lane, ids[lane][n])
    assert acks.pending() == 80 and calls == [], "nothing is written before the batch is due"
    acks.close()
    # One EVALSHA for all of them; on a server that lacks the script, its load and the EVALSHA again.
    assert calls in (["EVALSHA"], ["EVALSHA", "SCRIPT LOAD", "EVALSHA"]), calls
    for lane in lanes:
        assert broker.client.scard(f"dramatiq:__acks__.{broker.broker_id}.{lane}") == 0
        assert broker.client.hlen(f"dramatiq:{lane}.msgs") == 0


def test_a_batch_is_written_a_linger_after_its_first_acknowledgement() -> None:
    broker = RedisBroker(client=fakeredis.FakeRedis())
    ids = fetched(broker, LANE, 3)
    acks = Acks(broker, linger=0.05)
    try:
        for i in ids:
            acks.add(LANE, i)
        deadline = time.monotonic() + 5
        while broker.client.hlen(f"dramatiq:{LANE}.msgs") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert broker.client.hlen(f"dramatiq:{LANE}.msgs") == 0 and acks.pending() == 0
    finally:
        acks.close()


def test_a_message_another_worker_fetched_meanwhile_keeps_its_body() -> None:
    # After a requeue (this process looked dead) the id sits in another worker's ack set.
    broker = RedisBroker(client=fakeredis.FakeRedis())
    broker.client.hset(f"dramatiq:{LANE}.msgs", "m1", b"body")
    broker.client.sadd(f"dramatiq:__acks__.other.{LANE}", "m1")
    acks = Acks(broker, linger=0.0)
    acks.add(LANE, "m1")
    acks.close()
    assert broker.client.hget(f"dramatiq:{LANE}.msgs", "m1") == b"body"
    assert broker.client.smembers(f"dramatiq:__acks__.other.{LANE}") == {b"m1"}


def unreachable(count: int, linger: float) -> tuple[fakeredis.FakeServer, RedisBroker, Acks]:
    """``count`` fetched messages acknowledged while the broker's Redis does not answer."""
    server = fakeredis.FakeServer()
    broker = RedisBroker(client=fakeredis.FakeRedis(server=server))
    ids = fetched(broker, LANE, count)
    acks = Acks(broker, linger=linger)
    server.connected = False
    for i in ids:
        acks.add(LANE, i)
    return server, broker, acks


def test_acknowledgements_wait_out_an_unreachable_redis_and_are_written_when_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="bridge.worker")
    server, broker, acks = unreachable(5, linger=0.01)
    try:
        deadline = time.monotonic() + 5
        while "acknowledging 5 lane messages failed, retrying" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "acknowledging 5 lane messages failed, retrying" in caplog.text
        assert acks.pending() == 5, "held, not dropped"
        server.connected = True
        deadline = time.monotonic() + 10
        while acks.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        while broker.client.hlen(f"dramatiq:{LANE}.msgs") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert broker.client.hlen(f"dramatiq:{LANE}.msgs") == 0
    finally:
        acks.close()


def test_a_shutdown_with_redis_unreachable_leaves_the_messages_to_dramatiq_and_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, broker, acks = unreachable(2, linger=60.0)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bridge.worker"):
        acks.close()
    assert time.monotonic() - began < 5
    assert "acknowledging 2 lane messages failed at shutdown" in caplog.text
    server.connected = True
    # Still fetched by this process: dramatiq puts them back once its heartbeat is stale.
    assert broker.client.scard(f"dramatiq:__acks__.{broker.broker_id}.{LANE}") == 2
