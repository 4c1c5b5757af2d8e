"""The ledger middleware records each terminal state, with a real dramatiq Worker on a StubBroker."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Middleware, Retries, SkipMessage

from bridge import Record, current_record, kafka_handler
from bridge.keys import PartitionKeys, lane_name
from bridge.ledger import Ledger, Try
from bridge.protocol import OPTION, Meta
from bridge.record import envelope
from bridge.settings import WorkerSettings
from bridge.worker import LedgerMiddleware, install

GROUP = "g"


def configured(ledger: Ledger, **settings: Any) -> LedgerMiddleware:
    """The middleware with its ledger and settings given, as a test installs it before any handler."""
    return LedgerMiddleware(WorkerSettings(**{"lane_refresh_interval": 0.02, **settings}), ledger=ledger)


@pytest.fixture
def middleware(stub_broker: StubBroker, ledger: Ledger) -> LedgerMiddleware:
    return install(stub_broker, configured(ledger))


@pytest.fixture
def worker(stub_broker: StubBroker, middleware: LedgerMiddleware) -> Iterator[dramatiq.Worker]:
    # Handlers must be registered before the worker boots; the test body does that, so the
    # fixture hands out a factory-like worker started lazily by send().
    w = dramatiq.Worker(stub_broker, worker_timeout=50, worker_threads=2)
    yield w
    w.stop()


def send(
    broker: StubBroker,
    actor: dramatiq.Actor[Any, Any],
    topic: str,
    offset: int,
    *,
    value: bytes | None = b"v",
    key: bytes | None = b"k",
    epoch: int = 1,
    attempt: int = 1,
    **options: Any,
) -> None:
    lane = lane_name(GROUP, topic, 0)
    broker.declare_queue(lane)
    broker.enqueue(
        dramatiq.Message(
            queue_name=lane,
            actor_name=actor.actor_name,
            args=(envelope(topic, 0, offset, key, value, [("h", b"\x00"), ("h", None)], 1700000000000),),
            kwargs={},
            options={OPTION: meta(topic, offset, epoch=epoch, attempt=attempt), **options},
        )
    )


def run(broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger, topic: str) -> None:
    worker.start()
    broker.join(lane_name(GROUP, topic, 0), timeout=10_000, fail_fast=False)
    worker.join()


def meta(topic: str, offset: int, *, epoch: int = 1, **fields: Any) -> dict[str, Any]:
    """The ``kdb`` option of a message the bridge would send."""
    return Meta(GROUP, topic, 0, offset, epoch, **fields).to_option()


def keys(topic: str) -> PartitionKeys:
    return PartitionKeys(GROUP, topic, 0)


def failed_of(ledger: Ledger, topic: str) -> dict[int, dict[str, Any]]:
    """Final failures the ledger holds for the bridge."""
    return {int(o): json.loads(v) for o, v in ledger.client.hgetall(keys(topic).failed).items()}


def finished(ledger: Ledger, topic: str, offset: int) -> None:
    """A copy of ``offset`` finished elsewhere."""
    ledger.finish(keys(topic), Try(offset, 1, 1, 0, "elsewhere"), "done")


def test_success_is_a_done_fact_and_the_actor_gets_the_record(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    seen: list[Record] = []

    @kafka_handler("orders")
    @dramatiq.actor
    def handle(record: Record) -> None:
        assert current_record() == record
        seen.append(record)

    send(stub_broker, handle, "orders", 5, value=b"\xff\x00")
    run(stub_broker, worker, ledger, "orders")
    assert ledger.done_from(keys("orders"), 0) == {5}
    assert ledger.running(keys("orders")) == {}
    assert seen == [Record("orders", 0, 5, b"k", b"\xff\x00", (("h", b"\x00"), ("h", None)), 1700000000000)]


def test_the_value_format_passes_the_decoded_value_and_exposes_the_record(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    seen: list[tuple[Any, int]] = []

    @kafka_handler("events", message_format="value", value_codec="json", key_codec="text")
    @dramatiq.actor
    def handle(payload: Any) -> None:
        seen.append((payload, current_record().offset))

    send(stub_broker, handle, "events", 9, value=json.dumps({"a": [1, 2]}).encode())
    run(stub_broker, worker, ledger, "events")
    assert seen == [({"a": [1, 2]}, 9)]


def test_retries_exhausted_is_a_final_failure_and_never_done(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    calls: list[int] = []

    @kafka_handler("orders")
    @dramatiq.actor(max_retries=2, min_backoff=1, max_backoff=5)
    def handle(record: Record) -> None:
        calls.append(record.offset)
        raise ValueError("boom")

    send(stub_broker, handle, "orders", 1)
    run(stub_broker, worker, ledger, "orders")
    failed = failed_of(ledger, "orders")
    assert calls == [1, 1, 1]
    assert ledger.done_from(keys("orders"), 0) == set()
    assert failed[1]["error"] == {"type": "ValueError", "message": "boom"}
    assert failed[1]["attempts"] == 3


def test_a_failure_that_will_be_retried_is_alive_until_its_backoff_ends(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    calls: list[int] = []

    @kafka_handler("orders")
    @dramatiq.actor(max_retries=5, min_backoff=30_000, max_backoff=30_000)
    def handle(record: Record) -> None:
        calls.append(record.offset)
        raise ValueError("transient")

    send(stub_broker, handle, "orders", 4)
    before = ledger.time_ms()
    worker.start()
    eventually(lambda: ledger.running(keys("orders")).get(4, {}).get("s") == "retry")
    worker.stop()
    entry = ledger.running(keys("orders"))[4]
    assert calls == [4]
    assert ledger.done_from(keys("orders"), 0) == set() and failed_of(ledger, "orders") == {}
    assert entry["r"] == 1, "the retry's count"
    # dramatiq's backoff jitters between half and all of it: the eta lies that far ahead.
    assert entry["t"] >= before + 15_000
    assert ledger.stale({keys("orders"): [4]}, timeout=10.0)[keys("orders")].again == {}


def test_a_retry_then_success_ends_done(stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger) -> None:
    calls: list[int] = []

    @kafka_handler("orders")
    @dramatiq.actor(max_retries=3, min_backoff=1, max_backoff=5)
    def handle(record: Record) -> None:
        calls.append(record.offset)
        if len(calls) < 3:
            raise RuntimeError("not yet")

    send(stub_broker, handle, "orders", 2)
    run(stub_broker, worker, ledger, "orders")
    assert calls == [2, 2, 2]
    assert ledger.done_from(keys("orders"), 0) == {2}


def test_a_message_skipped_by_another_middleware_is_done(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    class SkipAll(Middleware):
        def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
            raise SkipMessage("not needed")

    stub_broker.add_middleware(SkipAll(), before=Retries)

    @kafka_handler("orders")
    @dramatiq.actor
    def handle(record: Record) -> None:
        raise AssertionError("skipped messages do not run")

    send(stub_broker, handle, "orders", 3)
    run(stub_broker, worker, ledger, "orders")
    assert ledger.done_from(keys("orders"), 0) == {3}


def test_an_expired_age_limit_is_a_final_failure(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    @kafka_handler("orders")
    @dramatiq.actor(max_age=1)
    def handle(record: Record) -> None:
        raise AssertionError("expired messages do not run")

    send(stub_broker, handle, "orders", 6)
    time.sleep(0.01)
    run(stub_broker, worker, ledger, "orders")
    assert ledger.done_from(keys("orders"), 0) == set()
    assert 6 in failed_of(ledger, "orders")


def test_a_message_for_an_unknown_actor_is_a_final_failure(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    @kafka_handler("orders")
    @dramatiq.actor
    def handle(record: Record) -> None:
        pass

    lane = lane_name(GROUP, "orders", 0)
    stub_broker.declare_queue(lane)
    stub_broker.enqueue(
        dramatiq.Message(
            queue_name=lane,
            actor_name="no_such_actor",
            args=(envelope("orders", 0, 8, None, b"", None, None),),
            kwargs={},
            options={OPTION: meta("orders", 8)},
        )
    )
    run(stub_broker, worker, ledger, "orders")
    # dramatiq's consumer thread marks the nack done before its after_nack hook writes the failure.
    eventually(lambda: 8 in failed_of(ledger, "orders"))
    assert 8 in failed_of(ledger, "orders")


def test_a_message_of_an_older_epoch_does_not_run_and_is_not_done(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    calls, handle = offset_recorder()
    (old,) = ledger.bump_epochs({keys("orders"): (-1, 0)})
    (new,) = ledger.bump_epochs({keys("orders"): (-1, 0)})
    send(stub_broker, handle, "orders", 1, epoch=old)
    send(stub_broker, handle, "orders", 2, epoch=new)
    run(stub_broker, worker, ledger, "orders")
    assert calls == [2]
    assert ledger.done_from(keys("orders"), 0) == {2}


def test_a_record_already_done_does_not_run_again(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    calls, handle = offset_recorder()
    finished(ledger, "orders", 1)
    send(stub_broker, handle, "orders", 1)
    run(stub_broker, worker, ledger, "orders")
    assert calls == []


def test_an_undecodable_value_fails_at_once_without_reaching_the_actor(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    calls: list[int] = []

    @kafka_handler("orders", value_codec="json")
    @dramatiq.actor(max_retries=5)
    def handle(record: Record) -> None:
        calls.append(record.offset)

    send(stub_broker, handle, "orders", 1, value=b"{not json")
    run(stub_broker, worker, ledger, "orders")
    failed = failed_of(ledger, "orders")
    assert calls == []
    assert failed[1]["error"]["type"] == "DecodeError"
    assert "value (json codec)" in failed[1]["error"]["message"]
    assert failed[1]["attempts"] == 1


def test_the_middleware_sits_before_retries(stub_broker: StubBroker, middleware: LedgerMiddleware) -> None:
    @kafka_handler("orders")
    @dramatiq.actor
    def handle(record: Record) -> None:
        pass

    kinds = [type(m) for m in stub_broker.middleware]
    assert kinds.index(LedgerMiddleware) == kinds.index(Retries) - 1
    assert kinds.count(LedgerMiddleware) == 1


def test_lanes_opened_by_a_bridge_are_declared_in_the_worker(
    stub_broker: StubBroker, ledger: Ledger, middleware: LedgerMiddleware
) -> None:
    @kafka_handler("orders")
    @dramatiq.actor
    def handle(record: Record) -> None:
        pass

    ledger.open_lanes({lane_name(GROUP, "orders", 0): "orders", lane_name(GROUP, "other", 0): "other"})
    worker = dramatiq.Worker(stub_broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        assert lane_name(GROUP, "orders", 0) in stub_broker.get_declared_queues()
        assert lane_name(GROUP, "other", 0) not in stub_broker.get_declared_queues()
        ledger.open_lanes({lane_name(GROUP, "orders", 7): "orders"})
        deadline = time.monotonic() + 5
        while lane_name(GROUP, "orders", 7) not in stub_broker.get_declared_queues():
            assert time.monotonic() < deadline, "a lane opened after boot was never declared"
            time.sleep(0.01)
        assert lane_name(GROUP, "orders", 7) in worker.consumers
    finally:
        worker.stop()


def send_chained(broker: StubBroker, actor: dramatiq.Actor[Any, Any], topic: str, offset: int, prev: int) -> None:
    lane = lane_name(GROUP, topic, 0)
    broker.declare_queue(lane)
    broker.enqueue(
        dramatiq.Message(
            queue_name=lane,
            actor_name=actor.actor_name,
            args=(envelope(topic, 0, offset, b"k", b"v", [], None),),
            kwargs={},
            options={OPTION: meta(topic, offset, prev=prev)},
        )
    )


def test_a_pipelined_record_starts_only_after_its_predecessor_finished(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    events: list[tuple[str, int]] = []

    @kafka_handler("orders")
    @dramatiq.actor(max_retries=0)
    def handle(record: Record) -> None:
        events.append(("start", record.offset))
        time.sleep(0.2 if record.offset == 5 else 0)
        events.append(("end", record.offset))

    send_chained(stub_broker, handle, "orders", 5, -1)
    send_chained(stub_broker, handle, "orders", 6, 5)
    send_chained(stub_broker, handle, "orders", 7, 6)
    run(stub_broker, worker, ledger, "orders")
    assert events == [("start", 5), ("end", 5), ("start", 6), ("end", 6), ("start", 7), ("end", 7)]
    assert ledger.done_from(keys("orders"), 0) == {5, 6, 7}


def offset_recorder(**actor_options: Any) -> tuple[list[int], dramatiq.Actor[Any, Any]]:
    """A handler of "orders" that records the offsets it runs."""
    calls: list[int] = []

    @kafka_handler("orders")
    @dramatiq.actor(**actor_options)
    def handle(record: Record) -> None:
        calls.append(record.offset)

    return calls, handle


def one_thread_worker(
    broker: StubBroker, ledger: Ledger, recheck: float | None = None
) -> tuple[list[int], dramatiq.Actor[Any, Any], LedgerMiddleware, dramatiq.Worker]:
    """A handler recording offsets, and a started worker with a single thread."""
    middleware = install(broker, configured(ledger, **({"park_recheck_interval": recheck} if recheck else {})))
    events, handle = offset_recorder(max_retries=0)
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    worker.start()
    return events, handle, middleware, worker


def eventually(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_record_whose_predecessor_is_late_is_parked_without_holding_a_thread(
    stub_broker: StubBroker, ledger: Ledger
) -> None:
    events, handle, middleware, worker = one_thread_worker(stub_broker, ledger)
    try:
        send_chained(stub_broker, handle, "orders", 7, 6)
        send_chained(stub_broker, handle, "orders", 6, 5)  # both wait for 5, which arrives later
        eventually(lambda: middleware.parking.parked == 2)
        assert middleware.parking.parked == 2 and events == [], "parked, not run, not holding the one thread"
        send_chained(stub_broker, handle, "orders", 5, -1)
        eventually(lambda: ledger.done_from(keys("orders"), 0) == {5, 6, 7})
    finally:
        worker.stop()
    assert events == [5, 6, 7]
    assert middleware.parking.parked == 0


def test_a_missed_announcement_is_covered_by_the_recheck(stub_broker: StubBroker, ledger: Ledger) -> None:
    events, handle, middleware, worker = one_thread_worker(stub_broker, ledger, recheck=0.2)
    try:
        send_chained(stub_broker, handle, "orders", 6, 5)
        eventually(lambda: middleware.parking.parked == 1)
        ledger.client.zadd(keys("orders").done, {"5": 5})  # finished without an announcement
        eventually(lambda: events == [6])
    finally:
        worker.stop()
    assert events == [6]


def test_a_shutdown_puts_parked_records_back_on_their_lane(stub_broker: StubBroker, ledger: Ledger) -> None:
    events, handle, middleware, worker = one_thread_worker(stub_broker, ledger)
    send_chained(stub_broker, handle, "orders", 6, 5)
    eventually(lambda: middleware.parking.parked == 1)
    worker.stop()
    lane = stub_broker.queues[lane_name(GROUP, "orders", 0)]
    assert lane.qsize() == 1 and events == [], "the parked record is back on its lane, not run"


def test_a_failed_ledger_write_is_counted_for_the_workers_metrics(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger, middleware: LedgerMiddleware,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prometheus_client import REGISTRY

    from bridge.errors import LedgerUnavailable

    @kafka_handler("metered")
    @dramatiq.actor
    def handle(record: Record) -> None:
        pass

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise LedgerUnavailable("ledger down")

    name = "kafka_dramatiq_bridge_worker_ledger_write_failures_total"
    before = REGISTRY.get_sample_value(name, {"operation": "finish"}) or 0.0
    monkeypatch.setattr(ledger, "finish", unavailable)
    send(stub_broker, handle, "metered", 3)
    run(stub_broker, worker, ledger, "metered")
    assert REGISTRY.get_sample_value(name, {"operation": "finish"}) == before + 1
    assert REGISTRY.get_sample_value(name, {"operation": "start"}) is not None, "exported from 0 on"
    assert middleware.ledger_write_failures == 1
    assert ledger.done_from(keys("metered"), 0) == set(), "nothing recorded: the bridge dispatches it again"


def test_a_message_of_a_newer_protocol_version_is_refused_loudly_and_goes_back(
    stub_broker: StubBroker, ledger: Ledger, middleware: LedgerMiddleware, caplog: pytest.LogCaptureFixture
) -> None:
    _, handle = offset_recorder()
    lane = lane_name(GROUP, "orders", 0)
    stub_broker.declare_queue(lane)
    message = dramatiq.MessageProxy(
        dramatiq.Message(
            queue_name=lane,
            actor_name=handle.actor_name,
            args=(envelope("orders", 0, 3, b"k", b"v", [], None),),
            kwargs={},
            options={OPTION: {"v": 99, "g": GROUP, "t": "orders", "p": 0, "o": 3, "e": 1}},
        )
    )
    for _ in range(2):
        with pytest.raises(SkipMessage):
            middleware.before_process_message(stub_broker, message)
    assert ledger.running(keys("orders")) == {} and ledger.done_from(keys("orders"), 0) == set()
    delayed = stub_broker.queues[f"{lane}.DQ"]
    assert delayed.qsize() == 2, "each time the record waits to be offered to an upgraded worker"
    back = dramatiq.Message.decode(delayed.get())
    assert back.options[OPTION]["v"] == 99 and back.options["eta"] > 0
    refusals = [r for r in caplog.records if r.levelname == "ERROR" and "protocol version 99" in r.getMessage()]
    assert len(refusals) == 1, "one line a minute, not one per message"
    assert "orders[0]@3" in refusals[0].getMessage() and "upgrade this worker" in refusals[0].getMessage()


def test_a_copy_dispatched_again_continues_the_retry_count_of_the_one_it_replaces(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger
) -> None:
    calls: list[int] = []

    @kafka_handler("orders")
    @dramatiq.actor(max_retries=2, min_backoff=1, max_backoff=1)
    def handle(record: Record) -> None:
        calls.append(record.offset)
        raise ValueError("still broken")

    # Two tries failed already; the second retry was lost and the bridge dispatched attempt 2.
    ledger.finish(keys("orders"), Try(1, 1, 1, 2, "lost"), "retry", delay_ms=0)
    assert ledger.stale({keys("orders"): [1]}, timeout=-1)[keys("orders")].again == {1: 2}
    lane = lane_name(GROUP, "orders", 0)
    stub_broker.declare_queue(lane)
    stub_broker.enqueue(
        dramatiq.Message(
            queue_name=lane,
            actor_name=handle.actor_name,
            args=(envelope("orders", 0, 1, b"k", b"v", [], None),),
            kwargs={},
            options={OPTION: meta("orders", 1, attempt=2)},
        )
    )
    run(stub_broker, worker, ledger, "orders")
    assert calls == [1], "max_retries=2: the third try was the last"
    assert failed_of(ledger, "orders")[1]["attempts"] == 3


def test_an_unparked_record_skipped_by_another_middleware_leaks_nothing_and_is_not_requeued() -> None:
    import fakeredis
    from dramatiq.brokers.redis import RedisBroker

    from bridge.registry import clear_registry

    server = fakeredis.FakeServer()
    ledger = Ledger(fakeredis.FakeRedis(server=server, decode_responses=True))

    class SkipSixWhenUnparked(Middleware):
        seen = 0

        def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
            if message.options.get(OPTION, {}).get("o") == 6:
                self.seen += 1
                if self.seen == 2:  # the first time it parks; handed over, it is skipped
                    raise SkipMessage("not wanted")

    clear_registry()
    broker = RedisBroker(client=fakeredis.FakeRedis(server=server))
    broker.add_middleware(SkipSixWhenUnparked(), before=Retries)
    dramatiq.set_broker(broker)
    try:
        middleware = install(broker, configured(ledger))
        calls, handle = offset_recorder(max_retries=0)
        lane = lane_name(GROUP, "orders", 0)
        broker.declare_queue(lane)
        worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
        worker.start()
        try:
            for offset, prev in ((6, 5), (5, -1)):  # 6 parks, 5 runs and hands 6 over
                broker.enqueue(
                    dramatiq.Message(
                        queue_name=lane,
                        actor_name=handle.actor_name,
                        args=(envelope("orders", 0, offset, b"k", b"v", [], None),),
                        kwargs={},
                        options={OPTION: meta("orders", offset, prev=prev)},
                    )
                )
                if offset == 6:
                    eventually(lambda: middleware.parking.parked == 1)
            eventually(lambda: ledger.done_from(keys("orders"), 0) == {5, 6})
        finally:
            worker.stop()
        assert calls == [5]
        assert middleware.handoff.waiting == 0, "nothing left to put back at shutdown"
        assert ledger.running(keys("orders")) == {}, "the start recorded for 6 went with its skip"
        assert ledger.client.llen(f"dramatiq:{lane}") == 0, "nothing put back to run again"
    finally:
        broker.close()
        clear_registry()


def test_unordered_records_start_and_end_through_batches_and_their_ends_are_in_the_ledger(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger, middleware: LedgerMiddleware,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []

    @kafka_handler("orders", ordering="none")
    @dramatiq.actor(max_retries=0)
    def handle(record: Record) -> None:
        calls.append(record.offset)
        if record.offset == 3:
            raise ValueError("bad")

    def one_by_one(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an unordered record went to the ledger alone")

    monkeypatch.setattr(ledger, "start", one_by_one)
    monkeypatch.setattr(ledger, "finish", one_by_one)
    for offset in (1, 2, 3):
        send(stub_broker, handle, "orders", offset)
    run(stub_broker, worker, ledger, "orders")
    middleware.batcher.close()
    assert sorted(calls) == [1, 2, 3]
    assert ledger.done_from(keys("orders"), 0) == {1, 2}
    assert failed_of(ledger, "orders")[3]["error"]["type"] == "ValueError"
    assert ledger.running(keys("orders")) == {}


def test_an_unordered_copy_superseded_or_of_an_older_epoch_does_not_run(
    stub_broker: StubBroker, worker: dramatiq.Worker, ledger: Ledger, middleware: LedgerMiddleware,
) -> None:
    calls: list[int] = []

    @kafka_handler("orders", ordering="none")
    @dramatiq.actor(max_retries=0)
    def handle(record: Record) -> None:
        calls.append(record.offset)

    (old,) = ledger.bump_epochs({keys("orders"): (-1, 0)})
    (new,) = ledger.bump_epochs({keys("orders"): (-1, 0)})
    # The bridge found offset 1 without a sign of life and dispatched it again as attempt 2.
    (stale,) = ledger.stale({keys("orders"): [1]}, 0).values()
    assert stale.again == {1: 2}
    send(stub_broker, handle, "orders", 1, epoch=new)  # the first copy, still waiting in its lane
    send(stub_broker, handle, "orders", 1, epoch=new, attempt=2)
    send(stub_broker, handle, "orders", 2, epoch=old)  # fenced: the partition moved meanwhile
    run(stub_broker, worker, ledger, "orders")
    middleware.batcher.close()  # ends are written a moment later
    assert calls == [1], "only the newest copy of the current epoch runs"
    assert ledger.done_from(keys("orders"), 0) == {1}
