"""``replay`` commits its progress as copies are acknowledged: never past a copy Kafka has not
acknowledged, and on every way out, so a run that stops partway is continued without repeats."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, TopicPartition

from bridge import replay as replay_module
from bridge.errors import ConfigurationError, KafkaUnavailable
from bridge.replay import _Progress, replay
from bridge.settings import Settings
from tests.unit.fake_kafka import FakeConsumer

DLQ = "orders.dlq"
ORIGIN = [("kdb.topic", b"orders"), ("kdb.reason", b"final-failure")]


class ReplayConsumer(FakeConsumer):
    """The fake consumer with manual assignment, as replay uses it."""

    interrupt_after: int | None = None
    signal_at: int | None = None
    consumed_batches = 0

    def list_topics(self, topic: str | None = None, timeout: float = 0) -> Any:
        partitions = {p: None for t, p in self.logs if t == topic}
        return SimpleNamespace(topics={topic: SimpleNamespace(error=None, partitions=partitions)} if partitions else {})

    def assign(self, partitions: list[TopicPartition]) -> None:  # type: ignore[override]
        self.incremental_assign(partitions)

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        if self.interrupt_after is not None and self.consumed_batches >= self.interrupt_after:
            raise KeyboardInterrupt
        self.consumed_batches += 1
        if self.consumed_batches == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().consume(num_messages, timeout)


class FakeProducer:
    """Copies wait in ``pending`` until a flush; ``refuse`` decides which ones Kafka rejects,
    ``order`` in which order the delivery reports arrive."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, bytes | None, Callable[[Any, Any], None]]] = []
        self.delivered: list[tuple[str, bytes | None]] = []
        self.refuse: Callable[[bytes | None], bool] = lambda value: False
        self.order: Callable[[list[Any]], list[Any]] = lambda pending: pending
        self.closed = False

    def produce(self, topic: str, *, value: bytes | None, key: bytes | None, headers: Any,
                on_delivery: Callable[[Any, Any], None]) -> None:
        self.pending.append((topic, value, on_delivery))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        for topic, value, report in self.order(self.pending):
            if self.refuse(value):
                report(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), None)
            else:
                self.delivered.append((topic, value))
                report(None, None)
        self.pending = []
        return 0

    def close(self) -> None:
        self.flush()
        self.closed = True


@pytest.fixture
def kafka(monkeypatch: pytest.MonkeyPatch) -> tuple[ReplayConsumer, FakeProducer]:
    consumer = ReplayConsumer({})
    producer = FakeProducer()
    monkeypatch.setattr(replay_module, "Consumer", lambda config: consumer)
    monkeypatch.setattr(replay_module, "Producer", lambda config: producer)
    return consumer, producer


def dead_letters(consumer: ReplayConsumer, partition: int, count: int, *, without_origin: int | None = None) -> None:
    consumer.add(DLQ, partition, count, _headers=ORIGIN)
    for message in consumer.logs[(DLQ, partition)]:
        message._value = f"{partition}-{message._offset}".encode()
        if message._offset == without_origin:
            message._headers = [("trace-id", b"t")]


def committed(consumer: ReplayConsumer) -> dict[int, int]:
    return {p: o for (t, p), o in consumer.committed_offsets.items() if t == DLQ}


def test_acknowledgements_in_any_order_make_only_the_contiguous_prefix_committable() -> None:
    progress = _Progress(DLQ)
    copies = [progress.add(0, offset, "orders") for offset in (3, 5, 6, 9)]  # gaps: compaction
    copies[1].acked = copies[3].acked = True
    assert progress.settle() is None
    assert progress.committable == {}
    copies[0].acked = True
    progress.settle()
    assert progress.committable == {0: 6}
    copies[2].acked = True
    progress.settle()
    assert progress.committable == {0: 10}
    assert progress.sent == {"orders": 4}


def test_progress_is_committed_after_every_batch_not_only_at_the_end(
    kafka: tuple[ReplayConsumer, FakeProducer], monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer, _ = kafka
    monkeypatch.setattr(replay_module, "BATCH", 10)
    dead_letters(consumer, 0, 35)
    sent = replay(Settings(), DLQ)
    assert sent == {"orders": 35}
    assert [c[(DLQ, 0)] for c in consumer.commits] == [10, 20, 30, 35]


def test_a_record_without_origin_stops_the_run_after_committing_every_copy_before_it(
    kafka: tuple[ReplayConsumer, FakeProducer],
) -> None:
    consumer, producer = kafka
    dead_letters(consumer, 0, 20, without_origin=12)
    with pytest.raises(ConfigurationError, match=r"orders\.dlq\[0\]@12 has no kdb\.topic header.*--to"):
        replay(Settings(), DLQ)
    assert committed(consumer) == {0: 12}
    assert [value for _, value in producer.delivered] == [f"0-{o}".encode() for o in range(12)]
    assert producer.closed


def test_the_next_run_with_to_continues_at_the_record_without_origin_and_sends_each_record_once(
    kafka: tuple[ReplayConsumer, FakeProducer],
) -> None:
    consumer, producer = kafka
    dead_letters(consumer, 0, 20, without_origin=12)
    with pytest.raises(ConfigurationError):
        replay(Settings(), DLQ)
    consumer.assigned.clear()
    consumer.positions.clear()
    assert replay(Settings(), DLQ, to="orders-retry") == {"orders-retry": 8}
    values = [value for _, value in producer.delivered]
    assert sorted(values) == sorted(f"0-{o}".encode() for o in range(20))
    assert committed(consumer) == {0: 20}


def test_a_copy_kafka_refuses_stops_the_run_and_the_commit_stays_below_it(
    kafka: tuple[ReplayConsumer, FakeProducer],
) -> None:
    consumer, producer = kafka
    dead_letters(consumer, 0, 20)
    producer.refuse = lambda value: value == b"0-7"
    # Reports of other copies arrive before and after the refused one.
    producer.order = lambda pending: list(reversed(pending))
    with pytest.raises(KafkaUnavailable, match=r"orders\.dlq\[0\]@7 to orders"):
        replay(Settings(), DLQ)
    assert committed(consumer) == {0: 7}


def test_an_interrupt_between_batches_keeps_the_progress_of_the_batches_before_it(
    kafka: tuple[ReplayConsumer, FakeProducer], monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer, producer = kafka
    monkeypatch.setattr(replay_module, "BATCH", 10)
    dead_letters(consumer, 0, 25)
    consumer.interrupt_after = 2
    with pytest.raises(KeyboardInterrupt):
        replay(Settings(), DLQ)
    assert committed(consumer) == {0: 20}
    assert producer.closed


def test_sigterm_stops_the_run_after_the_batch_in_progress_is_acknowledged_and_committed(
    kafka: tuple[ReplayConsumer, FakeProducer], monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer, producer = kafka
    monkeypatch.setattr(replay_module, "BATCH", 10)
    dead_letters(consumer, 0, 50)
    consumer.signal_at = 2
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        replay(Settings(), DLQ)
    assert committed(consumer) == {0: 20}
    assert len(producer.delivered) == 20
    assert signal.getsignal(signal.SIGTERM) is before


def test_each_partition_commits_its_own_acknowledged_prefix(kafka: tuple[ReplayConsumer, FakeProducer]) -> None:
    consumer, producer = kafka
    dead_letters(consumer, 0, 10)
    dead_letters(consumer, 1, 6, without_origin=4)
    consumer.committed_offsets[(DLQ, 1)] = 2  # a previous run got this far
    with pytest.raises(ConfigurationError, match=r"orders\.dlq\[1\]@4"):
        replay(Settings(), DLQ)
    assert committed(consumer) == {0: 10, 1: 4}
    assert sorted(value for _, value in producer.delivered) == sorted(
        [f"0-{o}".encode() for o in range(10)] + [b"1-2", b"1-3"]
    )


def test_records_written_after_the_run_started_are_left_for_the_next_run(
    kafka: tuple[ReplayConsumer, FakeProducer], monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer, _ = kafka
    dead_letters(consumer, 0, 5)
    ends = consumer.get_watermark_offsets

    def grows(tp: TopicPartition, cached: bool = False, timeout: float = 0) -> tuple[int, int]:
        low, high = ends(tp)
        consumer.add(DLQ, 0, 3, _headers=ORIGIN)  # arrive as the run starts
        return low, high

    monkeypatch.setattr(consumer, "get_watermark_offsets", grows)
    assert replay(Settings(), DLQ) == {"orders": 5}
    assert committed(consumer) == {0: 5}


def test_a_missing_dead_letter_topic_is_a_configuration_error(kafka: tuple[ReplayConsumer, FakeProducer]) -> None:
    with pytest.raises(ConfigurationError, match=r"dead-letter topic 'nope\.dlq' does not exist"):
        replay(Settings(), "nope.dlq")


def test_an_empty_run_commits_nothing_and_creates_no_producer(
    kafka: tuple[ReplayConsumer, FakeProducer], monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer, _ = kafka
    dead_letters(consumer, 0, 3)
    consumer.committed_offsets[(DLQ, 0)] = 3
    monkeypatch.setattr(replay_module, "Producer", lambda config: pytest.fail("a producer was created"))
    assert replay(Settings(), DLQ) == {}
    assert consumer.commits == []
