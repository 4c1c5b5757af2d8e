"""Lag in seconds: now minus the timestamp of the oldest record not yet committed, from what the
bridge holds or, for a partition that does not fetch, read from Kafka."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest

from bridge.keys import status_key
from bridge.metrics import Metrics
from bridge.owned import Owned, Partitions
from bridge.reporting import Reporting
from bridge.stats import Stats
from bridge.timelag import TimestampReader, lag_seconds, read_timestamps
from tests.unit.fake_kafka import FakeConsumer
from tests.unit.parts import GROUP, T, ledger, owned, settings

WALL = 1_700_000_100.0  # the wall clock of these tests: 100 s after the fake log's first timestamp
FIRST = 1_700_000_000_000  # FakeMessage's timestamp of offset 0 (ms); offset n is n ms later


def test_lag_seconds_is_zero_when_caught_up_unknown_without_a_timestamp_and_never_negative() -> None:
    assert lag_seconds(0, None, WALL) == 0.0
    assert lag_seconds(3, None, WALL) is None
    assert lag_seconds(None, FIRST, WALL) is None
    assert lag_seconds(3, FIRST, WALL) == 100.0
    assert lag_seconds(3, FIRST + 200_000, WALL) == 0.0, "a producer clock ahead of ours"


class StubReader:
    """Answers what a Kafka read would, and remembers what it was asked."""

    def __init__(self, known: dict[tuple[str, int], int]) -> None:
        self.known = known
        self.asked: list[tuple[tuple[str, int], int]] = []
        self.closed = False

    def timestamp(self, tp: tuple[str, int], offset: int) -> int | None:
        self.asked.append((tp, offset))
        return self.known.get(tp)

    def close(self) -> None:
        self.closed = True


def reporting(reader: StubReader, end: int = 10, **overrides: Any) -> tuple[Reporting, Owned, Metrics, Any]:
    partitions, stats, store = Partitions(), Stats(), ledger()
    consumer = FakeConsumer({})
    consumer.add(T, 0, end)
    metrics = Metrics(stats)
    room = Reporting(settings(**overrides), store, consumer, partitions, stats, metrics, "host:1",
                     timestamps=reader, wall=lambda: WALL)  # type: ignore[arg-type]
    partition = owned(ordering="partition")
    partitions.add(partition)
    return room, partition, metrics, store


def deliver(partition: Owned, *offsets: int) -> None:
    for o in offsets:
        partition.state.deliver(o, b"k", {"o": o}, 10, timestamp=FIRST + o * 10_000)


def lag_of(room: Reporting, now: float = 50.0) -> float | None:
    (view,) = room.views(now)
    return view.lag_seconds


def test_the_oldest_record_held_and_not_committed_gives_the_lag_done_or_not() -> None:
    reader = StubReader({})
    room, partition, _, _ = reporting(reader)
    partition.marks.confirmed = 0
    deliver(partition, 0, 1, 2)
    assert lag_of(room) == 100.0
    partition.state.mark_done([0])
    assert lag_of(room) == 100.0, "done is not committed: it still counts until the commit passes it"
    partition.state.committable()
    partition.marks.confirmed = 1
    assert lag_of(room) == 90.0
    assert reader.asked == [], "what the bridge holds needs no read from Kafka"


def test_a_paused_partition_that_holds_nothing_reads_the_record_at_its_commit_from_kafka() -> None:
    reader = StubReader({})
    room, partition, metrics, _ = reporting(reader, end=10)
    partition.paused, partition.marks.confirmed = True, 4
    partition.state = type(partition.state)(ordering="partition", epoch=1, start_offset=4)
    assert lag_of(room) is None, "unknown until read"
    assert reader.asked == [((T, 0), 4)]
    reader.known[(T, 0)] = FIRST + 40_000
    room.publish_view(50.0, joined=True, outage_since=None, last_poll=50.0)
    (view,) = metrics.view.partitions
    assert (view.lag, view.lag_seconds) == (6, 60.0)
    text = metrics.registry.get_sample_value(
        "kafka_dramatiq_bridge_partition_lag_seconds", {"topic": T, "partition": "0"})
    assert text == 60.0


def test_a_partition_caught_up_has_no_lag_and_asks_nothing() -> None:
    reader = StubReader({})
    room, partition, _, _ = reporting(reader, end=3)
    partition.marks.confirmed = 3
    partition.state = type(partition.state)(ordering="partition", epoch=1, start_offset=3)
    assert lag_of(room) == 0.0
    assert reader.asked == []


def test_the_progress_line_and_the_status_carry_the_time_lag_and_the_record_holding_the_partition(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reader = StubReader({})
    room, partition, _, store = reporting(reader, progress_interval=10.0)
    partition.marks.confirmed = 0
    deliver(partition, 0, 1)
    partition.state.take_ready(10, now=40.0)
    caplog.set_level(logging.INFO, "bridge")
    room.tick(50.0)
    room.tick(60.0)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert "lag 10 (100s)" in line
    published = json.loads(store.client.hget(status_key(GROUP), f"{T}|0"))
    # Held since the first view saw it (50), not since its dispatch (40): the loop looks twice a second.
    assert (published["lag_s"], published["holding_offset"], published["holding_age_s"]) == (100.0, 0, 10.0)
    room.close()
    assert reader.closed


def test_reading_timestamps_takes_the_first_record_at_or_after_each_position_by_assignment() -> None:
    consumer = FakeConsumer({})
    consumer.add(T, 0, 10)
    consumer.add(T, 1, 3)
    consumer.add("other", 0, 5)
    found = read_timestamps(consumer, {(T, 0): 7, (T, 1): 2, ("other", 0): 5}, timeout=0.2)
    assert found == {(T, 0): FIRST + 7, (T, 1): FIRST + 2}, "past the end: no record, no timestamp"
    assert consumer.assigned == set(), "nothing stays assigned"


def test_the_reader_reads_in_its_own_thread_and_answers_once_read() -> None:
    consumers: list[FakeConsumer] = []

    def factory(config: dict[str, Any]) -> FakeConsumer:
        assert config["auto.offset.reset"] == "earliest" and config["enable.auto.commit"] is False
        consumer = FakeConsumer(config)
        consumer.add(T, 0, 10)
        consumers.append(consumer)
        return consumer

    reader = TimestampReader(settings(), consumer_factory=factory, interval=0.01, timeout=0.5)
    try:
        assert reader.timestamp((T, 0), 6) is None
        deadline = time.monotonic() + 5
        while reader.timestamp((T, 0), 6) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reader.timestamp((T, 0), 6) == FIRST + 6
    finally:
        reader.close()
    assert len(consumers) == 1 and consumers[0].closed

