"""Records that hold their partition: re-dispatch gives up one whose workers keep dying, the view
names the record holding a partition, and one warning per record says so."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from bridge.batching import BatchState
from bridge.completions import Completions
from bridge.dispatch import Dispatcher
from bridge.ledger import Stuck
from bridge.metrics import PartitionView
from bridge.owned import Owned, Partitions
from bridge.record import envelope
from bridge.registry import BatchOptions
from bridge.stats import Stats
from bridge.stuck import Holders, Holding, StuckWarnings, give_up
from tests.unit.parts import RecordingRouter, T, deliver, ledger, owned, settings


def lane_offsets(broker: StubBroker, partition: Owned) -> list[tuple[int, int]]:
    found = [dramatiq.Message.decode(m).options["kdb"] for m in broker.queues[partition.lane].queue]
    return [(o["o"], o.get("a", 1)) for o in found]


def test_a_record_whose_worker_died_too_often_is_dead_lettered_as_stuck_and_its_successor_goes_out() -> None:
    partitions, stats, router, store = Partitions(), Stats(), RecordingRouter(), ledger()
    done = Completions(store, partitions, router, stats, None)  # type: ignore[arg-type]
    room = Dispatcher(settings(redispatch_timeout=60), store, partitions, router, done, stats, None)  # type: ignore[arg-type]
    broker = StubBroker()
    partition = owned(broker=broker, ordering="partition", stages=True)
    partition.handler = replace(partition.handler, max_redispatches=1)
    broker.declare_queue(partition.lane)
    partitions.add(partition)
    deliver(partition, 0, 1, 2)
    room.dispatch(0.0)
    assert lane_offsets(broker, partition) == [(0, 1)], "1 and 2 are staged behind 0"

    def crash(attempt: int) -> None:
        """A worker starts record 0 and dies at once."""
        keys = partition.keys
        store.client.hset(keys.running, 0, json.dumps({"e": 1, "a": attempt, "r": 0, "k": f"k{attempt}", "w": "w",
                                                       "t": store.time_ms() - 100_000, "s": "run"}))

    crash(1)
    room.redispatch(61.0)
    assert lane_offsets(broker, partition) == [(0, 1), (0, 2)], "one re-run allowed"
    assert router.failed == []
    crash(2)
    room.redispatch(122.0)
    [(offset, reason, detail)] = router.failed
    assert (offset, reason, detail["attempts"]) == (0, "stuck", 2)
    assert lane_offsets(broker, partition) == [(0, 1), (0, 2), (1, 1)], "its successor is not left staged"
    assert stats.redispatched == 1, "the successor is not a re-dispatch"


def test_the_record_holding_a_partition_is_its_oldest_unfinished_one_with_records_behind_it() -> None:
    holders, partition = Holders(), owned(ordering="none")
    deliver(partition, 0)
    assert holders.see(partition, 0.5) is None, "not dispatched yet"
    partition.state.take_ready(10, now=1.0)
    assert holders.see(partition, 1.0) is None, "nothing waits behind it"
    deliver(partition, 1, 2)
    partition.state.take_ready(10, now=2.0)
    partition.state.mark_done([1, 2])
    assert holders.see(partition, 5.0) == Holding(0, 4.0), "done records behind it cannot be committed past it"
    partition.state.mark_done([0])
    assert holders.see(partition, 6.0) is None


def test_a_record_that_waited_behind_another_holds_its_partition_only_from_when_that_one_finished() -> None:
    holders, partition = Holders(), owned(ordering="partition")
    deliver(partition, 0, 1, 2)
    partition.state.take_ready(10, now=1.0)
    assert holders.see(partition, 1.0) == Holding(0, 0.0)
    assert holders.see(partition, 10.0) == Holding(0, 9.0)
    partition.state.mark_done([0])
    assert holders.see(partition, 12.0) == Holding(1, 0.0)
    assert holders.see(partition, 15.0) == Holding(1, 3.0)


def view(offset: int | None, age: float | None, partition: int = 0) -> PartitionView:
    return PartitionView("orders", partition, 0, 10, 3, age, False, holding_offset=offset, holding_age=age)


def test_one_warning_per_record_once_it_held_its_partition_past_the_threshold(
    caplog: pytest.LogCaptureFixture,
) -> None:
    warnings = StuckWarnings(after=300)
    with caplog.at_level(logging.WARNING, logger="bridge"):
        warnings.check([view(7, 299.0)])
        assert caplog.records == []
        warnings.check([view(7, 300.0), view(4, 1000.0, partition=1)])
        warnings.check([view(7, 400.0), view(4, 1100.0, partition=1)])
        warnings.check([view(None, None), view(4, 1200.0, partition=1)])
        warnings.check([view(7, 500.0)])
        warnings.check([view(8, 301.0)])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("orders[0]@7 has held its partition for 300s (BRIDGE_STUCK_AFTER=300s)")
    assert lines[1].startswith("orders[1]@4 has held its partition for 1000s")
    assert lines[2].startswith("orders[0]@8 ")
    assert [r.offset for r in caplog.records] == [7, 4, 8]  # type: ignore[attr-defined]


def test_the_warning_can_be_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bridge"):
        StuckWarnings(after=0).check([view(7, 10_000.0)])
    assert caplog.records == []


def test_a_batch_whose_worker_died_too_often_is_dead_lettered_whole_and_the_next_batch_goes_out() -> None:
    partition = owned(ordering="partition")
    partition.state = BatchState(options=BatchOptions(3, 0.0, "partition"), ordering="partition", epoch=1,
                                 max_bytes=1 << 20, start_offset=0)
    for o in range(6):
        partition.state.deliver(o, b"k", envelope(T, 0, o, b"k", b"v", None, None), 2)
    first = partition.state.take_ready(100)
    assert [e.offset for e in first] == [0, 1, 2], "the next batch waits for this one"
    router = RecordingRouter()
    given_up = give_up(router, partition, first[0], Stuck({"reason": "stuck", "attempts": 4}, None), 1.0)  # type: ignore[arg-type]
    assert given_up == []
    assert [(o, reason) for o, reason, _ in router.failed] == [(0, "stuck"), (1, "stuck"), (2, "stuck")]
    assert [e.offset for e in partition.state.take_ready(100)] == [3, 4, 5]
