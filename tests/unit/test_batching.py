"""Batch accumulation (BatchState), batch options, the batch end script and the worker's batch path."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from unittest.mock import ANY

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from bridge import BatchFailed, HandlerError, Record, kafka_handler
from bridge.batch import batch_envelope
from bridge.batching import MESSAGE_OVERHEAD, BatchState, encoded_size
from bridge.keys import PartitionKeys, lane_name
from bridge.ledger import BatchEnd, Ledger, Try
from bridge.protocol import BATCH_VERSION, OPTION, Meta
from bridge.record import envelope
from bridge.registry import BatchOptions, handlers_by_topic
from bridge.settings import WorkerSettings
from bridge.worker import LedgerMiddleware, install

P = PartitionKeys("g", "events", 0)


def state(size: int = 3, timeout: float = 1.0, ordering: Any = "partition", by: Any = "partition",
          max_bytes: int = 1 << 20) -> BatchState:
    return BatchState(options=BatchOptions(size, timeout, by), ordering=ordering, epoch=1, max_bytes=max_bytes,
                      start_offset=0)


def deliver(s: BatchState, offsets: range | list[int], now: float = 0.0, key: bytes | None = b"k",
            value: bytes = b"v") -> None:
    for o in offsets:
        env = envelope("events", 0, o, key, value, None, None)
        s.deliver(o, key, env, len(value) + len(key or b""), now)


def offsets(entries: Any) -> list[int]:
    return [e.offset for e in entries]


# -- accumulation -------------------------------------------------------------------------------


def test_a_full_batch_goes_at_once_and_a_partial_one_waits_for_its_timeout() -> None:
    s = state(size=3, timeout=1.0)
    deliver(s, range(5), now=10.0)
    assert offsets(s.take_ready(100, now=10.0)) == [0, 1, 2]
    s.mark_done([0, 1, 2])
    assert s.take_ready(100, now=10.5) == [], "two records wait for a third until the timeout"
    taken = s.take_ready(100, now=11.0)
    assert offsets(taken) == [3, 4]
    assert {e.lead for e in taken} == {3}


def test_in_partition_order_the_next_batch_waits_until_every_record_of_the_previous_is_final() -> None:
    s = state(size=2, timeout=0.0)
    deliver(s, range(6))
    first = s.take_ready(100)
    assert offsets(first) == [0, 1], "one batch of a partition at a time"
    s.mark_done([0])
    assert s.take_ready(100) == []
    s.mark_done([1])
    assert offsets(s.take_ready(100)) == [2, 3]


def test_in_none_order_batches_of_a_partition_go_side_by_side() -> None:
    s = state(size=2, timeout=0.0, ordering="none")
    deliver(s, range(5))
    taken = s.take_ready(100)
    assert offsets(taken) == [0, 1, 2, 3, 4]
    assert [e.lead for e in taken] == [0, 0, 2, 2, 4]


def test_batch_by_key_groups_one_keys_records_and_keeps_key_order() -> None:
    s = state(size=10, timeout=0.0, ordering="key", by="key")
    for o in range(6):
        deliver(s, [o], key=b"a" if o % 2 == 0 else b"b")
    taken = s.take_ready(100)
    assert sorted(offsets(e for e in taken if e.lead == 0)) == [0, 2, 4]
    assert sorted(offsets(e for e in taken if e.lead == 1)) == [1, 3, 5]
    deliver(s, [6], key=b"a")
    assert s.take_ready(100) == [], "key a's next batch waits for its first"
    s.mark_done([0, 2, 4])
    assert offsets(s.take_ready(100)) == [6]


def test_flushing_sends_a_partial_batch_before_its_timeout() -> None:
    s = state(size=100, timeout=600.0)
    deliver(s, range(3))
    assert s.take_ready(100, now=1.0) == []
    assert s.held() == 3
    s.flushing = True
    assert offsets(s.take_ready(100, now=1.0)) == [0, 1, 2]
    assert s.held() == 0


def test_a_batch_is_cut_where_the_next_record_would_pass_the_message_size_limit() -> None:
    value = b"x" * 300
    one = encoded_size(envelope("events", 0, 0, b"k", value, None, None))
    s = state(size=100, timeout=0.0, max_bytes=MESSAGE_OVERHEAD + 4 * one)
    deliver(s, range(10), value=value)
    assert offsets(s.take_ready(100)) == [0, 1, 2, 3]


def test_a_record_too_large_for_any_message_goes_alone_and_ends_the_batch_before_it() -> None:
    s = state(size=100, timeout=0.0, ordering="none", max_bytes=4096)
    deliver(s, range(3))
    deliver(s, [3], value=b"x" * 5000)
    deliver(s, range(4, 6))
    taken = s.take_ready(100)
    assert [(e.offset, e.lead) for e in taken] == [(0, 0), (1, 0), (2, 0), (3, 3), (4, 4), (5, 4)]


def test_the_commit_covers_a_batch_only_when_every_record_of_it_is_done() -> None:
    s = state(size=4, timeout=0.0)
    deliver(s, range(4))
    s.take_ready(100)
    s.mark_done([0, 1, 2])
    assert s.committable() == 3, "the prefix of done records, never past the unfinished one"
    s.mark_done([3])
    assert s.committable() == 4


def test_a_lost_batch_goes_again_whole_and_only_its_first_unfinished_record_is_watched() -> None:
    s = state(size=4, timeout=0.0, ordering="none")
    deliver(s, range(4))
    taken = s.take_ready(100)
    assert [s.is_head(e) for e in taken] == [True, False, False, False]
    s.mark_done([0])  # settled under another lead: its batch-mates are watched through 1 now
    assert s.is_head(taken[1])
    again = s.rebatch(taken[1])
    assert offsets(again) == [1, 2, 3]
    assert {e.lead for e in again} == {1}
    assert s.in_flight_batches() == 1


def test_an_undispatched_batch_goes_out_again_in_the_same_order() -> None:
    s = state(size=3, timeout=0.0)
    deliver(s, range(3))
    taken = s.take_ready(100)
    for entry in reversed(taken):
        s.undispatch(entry)
    assert offsets(s.take_ready(100)) == [0, 1, 2]


# -- options ------------------------------------------------------------------------------------


def test_a_batch_handler_is_registered_with_its_options(stub_broker: StubBroker) -> None:
    @kafka_handler("events", batch_size=50, batch_timeout=0.5)
    @dramatiq.actor
    def handle(records: list[Record]) -> int:
        return len(records)

    assert handlers_by_topic()["events"].batch == BatchOptions(50, 0.5, "partition")
    assert handle([Record("events", 0, 1, None, None)]) == 1


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": True}, "batch_size=True"),
        ({"batch_size": 10, "batch_timeout": -1}, "batch_timeout=-1"),
        ({"batch_timeout": 1.0}, "need batch_size"),
        ({"batch_size": 10, "batch_by": "topics"}, "batch_by='topics'"),
        ({"batch_size": 10, "batch_by": "key"}, "batch_by='key'"),
        ({"batch_size": 10, "message_format": "value"}, "message_format='value'"),
    ],
)
def test_an_invalid_batch_option_is_an_error_naming_it(
    stub_broker: StubBroker, options: dict[str, Any], named: str
) -> None:
    @dramatiq.actor
    def handle(records: list[Record]) -> None: ...

    with pytest.raises(HandlerError, match=named.replace("(", r"\(").replace("[", r"\[")):
        kafka_handler("events", **options)(handle)


def test_batch_failed_names_records_or_offsets_and_refuses_an_empty_map() -> None:
    record = Record("events", 0, 7, None, None)
    failed = BatchFailed({record: ValueError("bad"), 9: "also bad"})
    assert failed.failed == {7: failed.failed[7], 9: "also bad"}
    assert failed.detail(7) == {"type": "ValueError", "message": "bad"}
    assert failed.detail(9) == {"type": "BatchFailed", "message": "also bad"}
    with pytest.raises(ValueError, match="names no failed record"):
        BatchFailed({})
    decoded = Record("events", 0, 8, None, {"json": ["values"]})
    assert BatchFailed({decoded: "a dict value does not keep a record from being named"}).failed == {8: ANY}


# -- the ledger's batch end ---------------------------------------------------------------------


def test_a_batch_end_settles_every_offset_at_once(ledger: Ledger) -> None:
    copy = Try(10, 1, 1, 0, "tok")
    assert ledger.start(P, copy, "w")[0] == "run"
    error = {"error": {"type": "E", "message": "m"}}
    (settled,) = ledger.finish_batch([(P, BatchEnd(copy, [10, 11, 13], {12: error}))], "w")
    assert settled == 4
    assert ledger.done_from(P, 0) == {10, 11, 13}
    assert ledger.running(P) == {}
    progress = ledger.completions([P])[P]
    assert sorted(progress.done) == [10, 11, 13]
    assert progress.failed[12]["error"] == error["error"]


def test_a_batch_retry_keeps_the_batch_alive_under_the_first_record_it_retries(ledger: Ledger) -> None:
    copy = Try(10, 1, 1, 0, "tok")
    ledger.start(P, copy, "w")
    ledger.finish_batch([(P, BatchEnd(Try(10, 1, 1, 1, "tok"), [10, 11], {}, next=12, delay_ms=60_000))], "w")
    running = ledger.running(P)
    assert set(running) == {12} and running[12]["s"] == "retry"
    assert ledger.done_from(P, 0) == {10, 11}
    assert ledger.start(P, Try(12, 1, 1, 1, "retry-tok"), "w") == ("run", 1)


def test_a_batch_retry_that_started_before_its_previous_try_ended_keeps_its_own_registration(
    ledger: Ledger,
) -> None:
    # dramatiq enqueues the retry before the try's end is written; with a short backoff another
    # thread starts it first.
    ledger.start(P, Try(10, 1, 1, 0, "first"), "w")
    assert ledger.start(P, Try(11, 1, 1, 1, "retry"), "w")[0] == "run"
    ledger.finish_batch([(P, BatchEnd(Try(10, 1, 1, 1, "first"), [10], {}, next=11, delay_ms=60_000))], "w")
    running = ledger.running(P)
    assert set(running) == {11} and (running[11]["k"], running[11]["s"]) == ("retry", "run")


def test_a_superseded_batch_copy_cannot_fail_records_but_its_successes_count(ledger: Ledger) -> None:
    ledger.start(P, Try(10, 1, 1, 0, "old"), "w")
    ledger.stale({P: [10]}, 0.0)  # the bridge dispatched the batch again: attempt 2
    ledger.finish_batch([(P, BatchEnd(Try(10, 1, 1, 0, "old"), [10], {11: {"error": {}}}))], "w")
    assert ledger.done_from(P, 0) == {10}
    assert ledger.completions([P])[P].failed == {}


# -- the worker's batch path --------------------------------------------------------------------


@pytest.fixture
def worker(stub_broker: StubBroker, ledger: Ledger) -> Iterator[dramatiq.Worker]:
    install(stub_broker, LedgerMiddleware(WorkerSettings(lane_refresh_interval=0.02), ledger=ledger))
    w = dramatiq.Worker(stub_broker, worker_timeout=50, worker_threads=2)
    yield w
    w.stop()


def send_batch(broker: StubBroker, actor: Any, first: int, count: int, values: dict[int, bytes] | None = None) -> None:
    lane = lane_name("g", "events", 0)
    broker.declare_queue(lane)
    batch = list(range(first, first + count))
    envs = [envelope("events", 0, o, b"k", (values or {}).get(o, b'{"n": %d}' % o), None, None) for o in batch]
    meta = Meta("g", "events", 0, first, 1, version=BATCH_VERSION, batch=tuple(batch))
    broker.enqueue(dramatiq.Message(queue_name=lane, actor_name=actor.actor_name, args=(batch_envelope(envs),),
                                    kwargs={}, options={OPTION: meta.to_option()}))


def drain(broker: StubBroker, worker: dramatiq.Worker) -> None:
    worker.start()
    broker.join(lane_name("g", "events", 0), timeout=10_000, fail_fast=False)
    worker.join()


def test_a_batch_message_reaches_the_actor_as_records_and_settles_every_offset(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    calls: list[list[Record]] = []

    @kafka_handler("events", batch_size=10, value_codec="json")
    @dramatiq.actor
    def handle(records: list[Record]) -> None:
        calls.append(records)

    send_batch(stub_broker, handle, 5, 4)
    drain(stub_broker, worker)
    assert [[(r.offset, r.value) for r in c] for c in calls] == [[(o, {"n": o}) for o in range(5, 9)]]
    assert ledger.done_from(P, 0) == {5, 6, 7, 8}
    assert ledger.running(P) == {}


def test_a_partial_failure_retries_only_the_failed_records_then_dead_letters_them(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    calls: list[list[int]] = []

    @kafka_handler("events", batch_size=10)
    @dramatiq.actor(max_retries=1, min_backoff=1, max_backoff=1)
    def handle(records: list[Record]) -> None:
        calls.append([r.offset for r in records])
        raise BatchFailed({r: RuntimeError(f"no {r.offset}") for r in records if r.offset in (6, 8)})

    send_batch(stub_broker, handle, 5, 4)
    drain(stub_broker, worker)
    assert calls == [[5, 6, 7, 8], [6, 8]]
    assert ledger.done_from(P, 0) == {5, 7}
    failed = {int(o): json.loads(v) for o, v in ledger.client.hgetall(P.failed).items()}
    assert sorted(failed) == [6, 8]
    assert failed[6]["error"] == {"type": "RuntimeError", "message": "no 6"}
    assert failed[8]["attempts"] == 2
    assert ledger.running(P) == {}


def test_undecodable_records_of_a_batch_are_failed_and_the_rest_run(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    calls: list[list[int]] = []

    @kafka_handler("events", batch_size=10, value_codec="json")
    @dramatiq.actor
    def handle(records: list[Record]) -> None:
        calls.append([r.offset for r in records])

    send_batch(stub_broker, handle, 0, 3, values={0: b"{not json"})
    drain(stub_broker, worker)
    assert calls == [[1, 2]]
    assert ledger.done_from(P, 0) == {1, 2}
    failed = {int(o): json.loads(v) for o, v in ledger.client.hgetall(P.failed).items()}
    assert failed[0]["error"]["type"] == "DecodeError"
