"""What the bridge relies on from its Kafka consumer, checked against the unit tier's scripted
consumer and against a real broker with the same tests: when a stand-in and the real client
disagree, the unit tier proves nothing."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from bridge.consumer import KafkaConsumer, KafkaMessage, consumer_config
from bridge.settings import load_settings
from tests.support.kafka import create_topic, produce_keyed, unique_name
from tests.unit.fake_kafka import FakeConsumer

RECORDS = 5


@dataclass
class Harness:
    """A consumer of one single-partition topic holding RECORDS records, and its callbacks' log."""

    consumer: KafkaConsumer
    topic: str
    #: Hands the partition to the consumer (the fake's script; a real group does it by itself).
    grant: Callable[[], None]
    events: list[tuple[str, list[tuple[str, int, int]], int]] = field(default_factory=list)
    commits: list[tuple[KafkaError | None, list[tuple[str, int, int]]]] = field(default_factory=list)

    def callback(self, kind: str) -> Callable[[Any, list[TopicPartition]], None]:
        def record(consumer: Any, partitions: list[TopicPartition]) -> None:
            self.events.append((kind, [(p.topic, p.partition, p.offset) for p in partitions], threading.get_ident()))
            if kind == "assign":
                starts = [TopicPartition(p.topic, p.partition, OFFSET_BEGINNING) for p in partitions]
                consumer.incremental_assign(starts)

        return record

    def on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        self.commits.append((error, [(p.topic, p.partition, p.offset) for p in partitions]))

    def poll_until(self, done: Callable[[list[KafkaMessage]], bool], timeout: float = 30.0) -> list[KafkaMessage]:
        got: list[KafkaMessage] = []
        deadline = time.monotonic() + timeout
        while not done(got):
            assert time.monotonic() < deadline, f"{len(got)} records after {timeout}s; events {self.events}"
            got.extend(m for m in self.consumer.consume(num_messages=100, timeout=0.2) if m.error() is None)
        return got

    def join(self) -> list[KafkaMessage]:
        self.consumer.subscribe([self.topic], on_assign=self.callback("assign"), on_revoke=self.callback("revoke"),
                                on_lost=self.callback("lost"))
        self.grant()
        return self.poll_until(lambda got: len(got) >= RECORDS)


@pytest.fixture(params=["scripted", pytest.param("real", marks=pytest.mark.integration)])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    if request.param == "scripted":
        holder: list[Harness] = []
        fake = FakeConsumer({"on_commit": lambda e, p: holder[0].on_commit(e, p)})
        fake.add("contract", 0, RECORDS)
        made = Harness(fake, "contract", lambda: fake.grant(("contract", 0)))
        holder.append(made)
        yield made
        return
    kafka = request.getfixturevalue("kafka")
    topic = create_topic(AdminClient({"bootstrap.servers": kafka.bootstrap_servers}), unique_name("contract"), 1)
    produce_keyed(kafka.bootstrap_servers, topic, RECORDS)
    settings = load_settings(bootstrap_servers=kafka.bootstrap_servers, group_id=unique_name("contract"))
    holder = []
    config = consumer_config(settings, on_commit=lambda e, p: holder[0].on_commit(e, p))
    real = Consumer(config)
    made = Harness(real, topic, lambda: None)
    holder.append(made)
    yield made
    with contextlib.suppress(RuntimeError):  # closed by the test already
        real.close()


def test_assignment_callbacks_run_inside_consume_on_the_calling_thread(harness: Harness) -> None:
    harness.join()
    kind, partitions, thread = harness.events[0]
    assert kind == "assign" and [(t, p) for t, p, _ in partitions] == [(harness.topic, 0)]
    assert thread == threading.get_ident()


def test_records_arrive_in_offset_order_from_the_assigned_position(harness: Harness) -> None:
    records = harness.join()
    assert [m.offset() for m in records[:RECORDS]] == list(range(RECORDS))
    assert all(m.topic() == harness.topic and m.partition() == 0 for m in records)
    assert harness.consumer.position([TopicPartition(harness.topic, 0)])[0].offset == RECORDS
    _, high = harness.consumer.get_watermark_offsets(TopicPartition(harness.topic, 0), timeout=10, cached=False)
    assert high == RECORDS


def test_a_synchronous_commit_is_what_committed_reads_back(harness: Harness) -> None:
    harness.join()
    tp = TopicPartition(harness.topic, 0, 3)
    result = harness.consumer.commit(offsets=[tp], asynchronous=False)
    assert result is not None and [(r.topic, r.partition, r.offset) for r in result] == [(harness.topic, 0, 3)]
    (committed,) = harness.consumer.committed([TopicPartition(harness.topic, 0)], timeout=10)
    assert committed.offset == 3


def test_an_asynchronous_commit_is_answered_through_on_commit_inside_a_later_consume(harness: Harness) -> None:
    harness.join()
    harness.consumer.commit(offsets=[TopicPartition(harness.topic, 0, 4)], asynchronous=True)
    assert harness.commits == [], "not answered from inside commit"
    harness.poll_until(lambda got: bool(harness.commits))
    error, partitions = harness.commits[0]
    assert error is None and partitions == [(harness.topic, 0, 4)]


def test_a_paused_partition_delivers_nothing_until_resumed(harness: Harness, request: pytest.FixtureRequest) -> None:
    harness.join()
    tp = TopicPartition(harness.topic, 0)
    harness.consumer.pause([tp])
    if isinstance(harness.consumer, FakeConsumer):
        harness.consumer.add(harness.topic, 0, 2)
    else:
        produce_keyed(request.getfixturevalue("kafka").bootstrap_servers, harness.topic, 2)
    for _ in range(5):
        assert [m for m in harness.consumer.consume(num_messages=100, timeout=0.2) if m.error() is None] == []
    harness.consumer.resume([tp])
    later = harness.poll_until(lambda got: len(got) >= 2)
    assert [m.offset() for m in later] == [RECORDS, RECORDS + 1]


def test_closing_revokes_what_is_assigned_first(harness: Harness) -> None:
    harness.join()
    harness.consumer.close()
    assert [kind for kind, _, _ in harness.events] == ["assign", "revoke"]
    assert [(t, p) for t, p, _ in harness.events[-1][1]] == [(harness.topic, 0)]
