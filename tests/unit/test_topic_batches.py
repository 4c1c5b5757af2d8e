"""batch_by="topic": parts of several partitions joined into one message, in the bridge and in a worker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from bridge import BatchFailed, Record, kafka_handler
from bridge.batch import batch_envelope
from bridge.batch_messages import batch_message, runs, take
from bridge.batching import MESSAGE_OVERHEAD, BatchState, encoded_size, flush
from bridge.completions import Completions
from bridge.dispatch import Dispatcher
from bridge.keys import PartitionKeys, lane_name
from bridge.ledger import Ledger, Try
from bridge.owned import Assignment, Owned, Partitions
from bridge.partition import Entry
from bridge.protocol import OPTION, TOPIC_BATCH_VERSION, Meta, Part
from bridge.record import envelope
from bridge.registry import BatchOptions, Handler, Ordering
from bridge.settings import WorkerSettings
from bridge.stats import Stats
from bridge.worker import LedgerMiddleware, install
from tests.unit.parts import GROUP, RecordingRouter, T, handler, settings
from tests.unit.parts import ledger as new_ledger

# -- the bridge: joining parts ------------------------------------------------------------------


def topic_partition(partition: int, *, size: int = 6, timeout: float = 1.0, ordering: Ordering = "partition",
                    max_bytes: int = 1 << 20, of: Handler | None = None) -> Owned:
    options = BatchOptions(size, timeout, "topic")
    return Owned(
        topic=T, partition=partition, handler=of or handler(None, ordering, batch=options),
        keys=PartitionKeys(GROUP, T, partition), lane=lane_name(GROUP, T, partition), window=1000,
        dead_letter_topic=None, stages=False,
        state=BatchState(options=options, ordering=ordering, epoch=1, max_bytes=max_bytes, start_offset=0),
        start_offset=0, assignment=Assignment(handing_over=False),
    )


def deliver(owned: Owned, offsets: range | list[int], now: float = 0.0, value: bytes = b"v") -> None:
    for o in offsets:
        env = envelope(T, owned.partition, o, b"k", value, None, None)
        owned.state.deliver(o, b"k", env, len(value) + 1, now)


def sends(taken: list[tuple[Owned, list[Entry]]]) -> list[tuple[Owned, Entry, int]]:
    return [(owned, entry, 1) for owned, entries in taken for entry in entries]


def messages(taken: list[tuple[Owned, list[Entry]]]) -> list[list[tuple[int, int]]]:
    """Each message's records as (partition, offset)."""
    flat = sends(taken)
    return [[(o.partition, e.offset) for o, e, _ in flat[a:b]] for a, b in runs(flat)]


def test_parts_of_several_partitions_go_in_one_message_once_they_hold_a_batch_together() -> None:
    p0, p1, p2 = (topic_partition(p, size=6) for p in range(3))
    deliver(p0, range(2))
    deliver(p1, range(3))
    assert take([p0, p1, p2], 100, now=0.1) == [], "5 records wait for a sixth"
    deliver(p2, range(1))
    assert messages(take([p0, p1, p2], 100, now=0.2)) == [[(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0)]]


def test_a_partial_topic_batch_waits_for_the_timeout_of_its_oldest_record_over_every_partition() -> None:
    p0, p1 = topic_partition(0, timeout=1.0), topic_partition(1, timeout=1.0)
    deliver(p0, [0], now=10.0)
    deliver(p1, [0, 1], now=10.6)
    assert take([p0, p1], 100, now=10.9) == []
    # The partition that waited longest goes first.
    assert messages(take([p1, p0], 100, now=11.0)) == [[(0, 0), (1, 0), (1, 1)]]


def test_a_full_topic_batch_takes_at_most_batch_size_records_and_the_rest_waits() -> None:
    p0, p1 = topic_partition(0, size=4, ordering="none"), topic_partition(1, size=4, ordering="none")
    deliver(p0, range(3), now=1.0)
    deliver(p1, range(3), now=2.0)
    assert messages(take([p0, p1], 100, now=2.0)) == [[(0, 0), (0, 1), (0, 2), (1, 0)]]
    assert messages(take([p0, p1], 100, now=2.5)) == [], "two records wait for the timeout"
    assert messages(take([p0, p1], 100, now=3.0)) == [[(1, 1), (1, 2)]]


def test_in_partition_order_a_partitions_next_part_waits_for_its_previous_one_while_others_go() -> None:
    p0, p1 = topic_partition(0, size=4, timeout=0.0), topic_partition(1, size=4, timeout=0.0)
    deliver(p0, range(2))
    deliver(p1, range(2))
    first = take([p0, p1], 100, now=1.0)
    assert messages(first) == [[(0, 0), (0, 1), (1, 0), (1, 1)]]
    deliver(p0, [2])
    deliver(p1, [2])
    p1.state.mark_done([0, 1])
    assert messages(take([p0, p1], 100, now=2.0)) == [[(1, 2)]], "p0's part 0-1 is still running"
    p0.state.mark_done([0])
    assert take([p0, p1], 100, now=3.0) == [], "every record of p0's part must be final first"
    p0.state.mark_done([1])
    assert messages(take([p0, p1], 100, now=4.0)) == [[(0, 2)]]


def test_flushing_one_partition_sends_the_topics_partial_batch_at_once() -> None:
    p0, p1 = topic_partition(0, size=100, timeout=600.0), topic_partition(1, size=100, timeout=600.0)
    deliver(p0, range(2))
    deliver(p1, range(2))
    assert take([p0, p1], 100, now=1.0) == []
    flush([p0])
    assert messages(take([p0, p1], 100, now=1.0)) == [[(0, 0), (0, 1), (1, 0), (1, 1)]]


def test_a_topic_batch_is_cut_where_the_next_record_would_pass_the_message_size_limit() -> None:
    value = b"x" * 300
    one = encoded_size(envelope(T, 0, 0, b"k", value, None, None))
    limit = MESSAGE_OVERHEAD + 3 * one
    p0, p1 = (topic_partition(p, size=100, timeout=0.0, max_bytes=limit, ordering="none") for p in range(2))
    deliver(p0, range(2), value=value)
    deliver(p1, range(2), value=value)
    assert messages(take([p0, p1], 100, now=1.0)) == [[(0, 0), (0, 1), (1, 0)], [(1, 1)]]


def test_the_global_room_caps_a_topic_batch() -> None:
    p0, p1 = topic_partition(0, size=10, timeout=0.0), topic_partition(1, size=10, timeout=0.0)
    deliver(p0, range(3))
    deliver(p1, range(3))
    assert messages(take([p0, p1], 4, now=1.0)) == [[(0, 0), (0, 1), (0, 2), (1, 0)]]


def test_a_part_lost_with_its_message_goes_again_alone_as_a_batch_of_its_partition() -> None:
    p0, p1 = topic_partition(0, size=4, timeout=0.0), topic_partition(1, size=4, timeout=0.0)
    deliver(p0, range(2))
    deliver(p1, range(2))
    taken = take([p0, p1], 100, now=1.0)
    p0.state.mark_done([0, 1])
    head = taken[1][1][0]
    again = p1.state.rebatch(head) if isinstance(p1.state, BatchState) else []
    flat = [(p1, e, 2) for e in again]
    assert [(a, b) for a, b in runs(flat)] == [(0, 2)]
    meta = Meta.from_option(batch_message(GROUP, flat).options[OPTION])
    assert (meta.partition, meta.batch, meta.parts, meta.attempt) == (1, (0, 1), (), 2)


def test_a_topic_batch_message_lists_every_part_with_its_epoch_and_carries_the_records_in_part_order() -> None:
    p0, p1 = topic_partition(0, timeout=0.0), topic_partition(1, timeout=0.0)
    p1.state.epoch = 7
    deliver(p0, [4, 5])
    deliver(p1, [9])
    message = batch_message(GROUP, sends(take([p0, p1], 100, now=1.0)))
    meta = Meta.from_option(message.options[OPTION])
    assert meta.version == TOPIC_BATCH_VERSION
    assert meta.parts == (Part(0, 1, 1, (4, 5)), Part(1, 7, 1, (9,)))
    assert (meta.partition, meta.offset, meta.batch) == (0, 4, (4, 5))
    assert [(e["p"], e["o"]) for e in message.args[0]["b"]] == [(0, 4), (0, 5), (1, 9)]
    assert Meta.from_option(meta.to_option()) == meta


def test_the_dispatcher_puts_one_message_for_the_parts_of_a_topic_batch_on_the_lane() -> None:
    broker = StubBroker()
    partitions, store = Partitions(), new_ledger()
    router = RecordingRouter()
    done = Completions(store, partitions, router, Stats(), None)  # type: ignore[arg-type]
    room = Dispatcher(settings(), store, partitions, router, done, Stats(), None)  # type: ignore[arg-type]
    shared = handler(broker, "partition", batch=BatchOptions(4, 0.0, "topic"))
    owners = [topic_partition(p, size=4, timeout=0.0, of=shared) for p in range(2)]
    for owned in owners:
        broker.declare_queue(owned.lane)
        partitions.add(owned)
        deliver(owned, range(2))
    room.dispatch(1.0)
    queued = [dramatiq.Message.decode(m) for m in broker.queues[owners[0].lane].queue]
    assert len(queued) == 1 and broker.queues[owners[1].lane].qsize() == 0
    assert [p.batch for p in Meta.from_option(queued[0].options[OPTION]).parts] == [(0, 1), (0, 1)]


# -- a worker: running and settling the parts ----------------------------------------------------


def keys(partition: int) -> PartitionKeys:
    return PartitionKeys(GROUP, "events", partition)


@pytest.fixture
def worker(stub_broker: StubBroker, ledger: Ledger) -> Iterator[dramatiq.Worker]:
    install(stub_broker, LedgerMiddleware(WorkerSettings(lane_refresh_interval=0.02), ledger=ledger))
    w = dramatiq.Worker(stub_broker, worker_timeout=50, worker_threads=2)
    yield w
    w.stop()


def send_parts(broker: StubBroker, actor: Any, parts: dict[int, list[int]]) -> None:
    lane = lane_name(GROUP, "events", 0)
    broker.declare_queue(lane)
    envs = [envelope("events", p, o, b"k", b"v%d" % o, None, None) for p, found in parts.items() for o in found]
    listed = tuple(Part(p, 1, 1, tuple(found)) for p, found in parts.items())
    first = listed[0]
    meta = Meta(GROUP, "events", first.partition, first.offset, 1, version=TOPIC_BATCH_VERSION, batch=first.batch,
                parts=listed)
    broker.enqueue(dramatiq.Message(queue_name=lane, actor_name=actor.actor_name, args=(batch_envelope(envs),),
                                    kwargs={}, options={OPTION: meta.to_option()}))


def drain(broker: StubBroker, worker: dramatiq.Worker) -> None:
    worker.start()
    broker.join(lane_name(GROUP, "events", 0), timeout=10_000, fail_fast=False)
    worker.join()


def failed(ledger: Ledger, partition: int) -> dict[int, Any]:
    return {int(o): json.loads(v) for o, v in ledger.client.hgetall(keys(partition).failed).items()}


def test_a_topic_batch_runs_once_and_settles_each_partitions_offsets_in_its_own_ledger(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    calls: list[list[tuple[int, int]]] = []

    @kafka_handler("events", batch_size=10, batch_by="topic")
    @dramatiq.actor
    def handle(records: list[Record]) -> None:
        calls.append([(r.partition, r.offset) for r in records])

    send_parts(stub_broker, handle, {0: [3, 4], 2: [3]})
    drain(stub_broker, worker)
    assert calls == [[(0, 3), (0, 4), (2, 3)]]
    assert ledger.done_from(keys(0), 0) == {3, 4}
    assert ledger.done_from(keys(2), 0) == {3}
    assert ledger.running(keys(0)) == {} and ledger.running(keys(2)) == {}


def test_a_partial_failure_of_a_topic_batch_retries_and_dead_letters_only_the_named_records(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    calls: list[list[tuple[int, int]]] = []

    @kafka_handler("events", batch_size=10, batch_by="topic")
    @dramatiq.actor(max_retries=1, min_backoff=1, max_backoff=1)
    def handle(records: list[Record]) -> None:
        calls.append([(r.partition, r.offset) for r in records])
        # Offset 5 exists in both partitions: records name which one failed.
        raise BatchFailed({r: f"no {r.partition}@{r.offset}" for r in records if (r.partition, r.offset) == (1, 5)})

    send_parts(stub_broker, handle, {0: [5, 6], 1: [5, 6]})
    drain(stub_broker, worker)
    assert calls == [[(0, 5), (0, 6), (1, 5), (1, 6)], [(1, 5)]]
    assert ledger.done_from(keys(0), 0) == {5, 6}
    assert ledger.done_from(keys(1), 0) == {6}
    assert failed(ledger, 0) == {}
    assert failed(ledger, 1)[5]["error"] == {"type": "BatchFailed", "message": "no 1@5"}
    assert ledger.running(keys(0)) == {} and ledger.running(keys(1)) == {}


def test_an_offset_two_partitions_of_the_batch_share_names_neither_and_fails_the_whole_batch(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    @kafka_handler("events", batch_size=10, batch_by="topic")
    @dramatiq.actor(max_retries=0)
    def handle(records: list[Record]) -> None:
        raise BatchFailed({5: "which one?"})

    send_parts(stub_broker, handle, {0: [5], 1: [5]})
    drain(stub_broker, worker)
    for partition in (0, 1):
        assert failed(ledger, partition)[5]["error"]["type"] == "ValueError"
        assert "partitions [0, 1] share" in failed(ledger, partition)[5]["error"]["message"]


def test_a_part_the_ledger_shows_done_is_left_out_and_the_other_parts_run(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    calls: list[list[tuple[int, int]]] = []

    @kafka_handler("events", batch_size=10, batch_by="topic")
    @dramatiq.actor
    def handle(records: list[Record]) -> None:
        calls.append([(r.partition, r.offset) for r in records])

    # Partition 1's part ran already under another copy (a re-dispatch after a lost message).
    assert ledger.start(keys(1), Try(0, 1, 1, 0, "other"), "w")[0] == "run"
    ledger.finish(keys(1), Try(0, 1, 1, 0, "other"), "done")
    send_parts(stub_broker, handle, {0: [0, 1], 1: [0]})
    drain(stub_broker, worker)
    assert calls == [[(0, 0), (0, 1)]]
    assert ledger.done_from(keys(0), 0) == {0, 1}
    assert ledger.running(keys(0)) == {}
