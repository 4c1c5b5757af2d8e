"""Dispatch: records onto their lanes in order, staged behind unfinished predecessors, and again
when lost."""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker

from bridge.completions import Completions
from bridge.dispatch import Dispatcher
from bridge.errors import TaskBrokerUnavailable
from bridge.ledger import Ledger
from bridge.owned import Owned, Partitions
from bridge.stats import Stats
from tests.unit.parts import RecordingRouter, deliver, ledger, owned, settings


def dispatcher(**overrides: Any) -> tuple[Dispatcher, Partitions, Ledger, RecordingRouter]:
    partitions, stats, router, store = Partitions(), Stats(), RecordingRouter(), ledger()
    done = Completions(store, partitions, router, stats, None)  # type: ignore[arg-type]
    room = Dispatcher(settings(**overrides), store, partitions, router, done, stats, None)  # type: ignore[arg-type]
    return room, partitions, store, router


def lane_offsets(broker: StubBroker, partition: Owned) -> list[int]:
    return [dramatiq.Message.decode(m).options["kdb"]["o"] for m in broker.queues[partition.lane].queue]


def test_records_go_on_their_lane_in_offset_order_up_to_the_global_cap() -> None:
    room, partitions, _, _ = dispatcher(max_in_flight=3)
    broker = StubBroker()
    partition = owned(broker=broker)
    broker.declare_queue(partition.lane)
    partitions.add(partition)
    deliver(partition, 0, 1, 2, 3, 4)
    room.dispatch(1.0)
    assert lane_offsets(broker, partition) == [0, 1, 2]
    partition.state.mark_done([0])
    room.dispatch(2.0)
    assert lane_offsets(broker, partition) == [0, 1, 2, 3]


def test_a_partition_that_is_handing_over_dispatches_nothing() -> None:
    room, partitions, _, _ = dispatcher()
    broker = StubBroker()
    partition = owned(broker=broker, active=False)
    broker.declare_queue(partition.lane)
    partitions.add(partition)
    deliver(partition, 0)
    room.dispatch(1.0)
    assert lane_offsets(broker, partition) == []


def test_a_record_too_large_is_failed_in_the_ledger_before_anything_behind_it_goes_out() -> None:
    room, partitions, store, router = dispatcher(max_message_bytes=1024)
    broker = StubBroker()
    partition = owned(broker=broker, ordering="partition")
    broker.declare_queue(partition.lane)
    partitions.add(partition)
    deliver(partition, 0, size=5000)
    deliver(partition, 1, 2)
    room.dispatch(1.0)
    assert [o for o, _, _ in router.failed] == [0]
    assert store.client.hexists(partition.keys.failed, 0)
    assert lane_offsets(broker, partition) == [1, 2], "its successors were not held back"


def test_records_behind_an_unfinished_one_are_staged_in_the_ledger_not_put_on_the_lane() -> None:
    room, partitions, store, _ = dispatcher()
    broker = StubBroker()
    partition = owned(broker=broker, ordering="partition", stages=True)
    broker.declare_queue(partition.lane)
    partitions.add(partition)
    deliver(partition, 0, 1, 2)
    room.dispatch(1.0)
    assert lane_offsets(broker, partition) == [0]
    assert sorted(store.client.hkeys(partition.keys.staged)) == ["0", "1"], "1 behind 0, 2 behind 1"


def test_a_failed_enqueue_puts_every_record_not_surely_out_back_in_front_in_order() -> None:
    room, partitions, _, _ = dispatcher()

    class Refusing(StubBroker):
        def enqueue(self, message: Any, *, delay: int | None = None) -> Any:
            if message.options["kdb"]["o"] == 2:
                raise ConnectionError("broker down")
            return super().enqueue(message, delay=delay)

    broker = Refusing()
    partition = owned(broker=broker)
    broker.declare_queue(partition.lane)
    partitions.add(partition)
    deliver(partition, 0, 1, 2, 3)
    try:
        room.dispatch(1.0)
        raise AssertionError("the enqueue failure was swallowed")
    except TaskBrokerUnavailable as e:
        assert "enqueue on lane" in str(e)
    assert partition.state.dispatched_open == 0, "the whole chunk may be missing: all of it goes again"
    assert [e.offset for e in partition.state.take_ready(10)] == [0, 1, 2, 3]


def test_a_record_without_a_sign_of_life_goes_out_again_as_a_new_attempt() -> None:
    room, partitions, _, _ = dispatcher(redispatch_timeout=60)
    broker = StubBroker()
    partition = owned(broker=broker)
    broker.declare_queue(partition.lane)
    partitions.add(partition)
    deliver(partition, 0)
    room.dispatch(0.0)
    room.redispatch(30.0)
    assert lane_offsets(broker, partition) == [0], "not before the timeout"
    room.redispatch(61.0)
    copies = [dramatiq.Message.decode(m).options["kdb"].get("a", 1) for m in broker.queues[partition.lane].queue]
    assert copies == [1, 2]
