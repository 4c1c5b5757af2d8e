"""Kafka in memory for the testing kit: a scripted consumer the real bridge loop polls, and a
producer that keeps the dead letters the real dead-letter writer produces.

The consumer implements :class:`bridge.consumer.KafkaConsumer` (mypy checks it, ``_conforms``
below). It is one group member that owns every partition fed so far: a partition is assigned when
:meth:`ScriptedConsumer.grant_fed` runs after its first record, and the rebalance callbacks run
inside the next :meth:`~ScriptedConsumer.consume`, on the loop's thread, as with the real client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, TopicPartition

from ..consumer import KafkaConsumer, Rebalance

Headers = list[tuple[str, bytes | None]]

#: confluent_kafka's TIMESTAMP_CREATE_TIME: a producer set the timestamp.
_CREATE_TIME = 1


@dataclass(frozen=True)
class FedMessage:
    """A record in a partition's log, with the accessors of ``confluent_kafka.Message``."""

    topic_name: str
    partition_number: int
    offset_number: int
    raw_key: bytes | None
    raw_value: bytes | None
    raw_headers: Headers | None
    timestamp_ms: int

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self.topic_name

    def partition(self) -> int:
        return self.partition_number

    def offset(self) -> int:
        return self.offset_number

    def key(self) -> bytes | None:
        return self.raw_key

    def value(self) -> bytes | None:
        return self.raw_value

    def headers(self) -> Headers | None:
        return list(self.raw_headers) if self.raw_headers is not None else None

    def timestamp(self) -> tuple[int, int]:
        return (_CREATE_TIME, self.timestamp_ms)


TP = tuple[str, int]


@dataclass
class ScriptedConsumer:
    """Partition logs fed by the test; commits, pauses and assignments as the bridge asked them.

    ``topics`` are the topics that exist (the handlers' topics): the bridge checks them at start.
    """

    topics: frozenset[str]
    config: dict[str, Any] = field(default_factory=dict)
    logs: dict[TP, list[FedMessage]] = field(default_factory=dict)
    committed_offsets: dict[TP, int] = field(default_factory=dict)
    paused: set[TP] = field(default_factory=set)
    positions: dict[TP, int] = field(default_factory=dict)
    assigned: set[TP] = field(default_factory=set)
    granted: set[TP] = field(default_factory=set)
    closed: bool = False
    _callbacks: dict[str, Rebalance] = field(default_factory=dict)
    _events: list[tuple[str, list[TP]]] = field(default_factory=list)
    _commit_reports: list[list[Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def append(
        self, topic: str, partition: int, key: bytes | None, value: bytes | None, headers: Headers | None,
        timestamp_ms: int,
    ) -> int:
        """Add a record at the end of ``topic[partition]``; returns its offset."""
        with self._lock:
            log = self.logs.setdefault((topic, partition), [])
            log.append(FedMessage(topic, partition, len(log), key, value, headers, timestamp_ms))
            return len(log) - 1

    def grant_fed(self) -> None:
        """Assign the partitions fed since the last call (the callback runs inside the next poll)."""
        with self._lock:
            new = sorted(set(self.logs) - self.granted)
            self.granted.update(new)
        if new:
            self._events.append(("assign", new))

    def end(self, tp: TP) -> int:
        with self._lock:
            return len(self.logs.get(tp, ()))

    # -- the consumer surface ----------------------------------------------------------------

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        return SimpleNamespace(topics={t: SimpleNamespace(error=None, partitions={}) for t in self.topics})

    def subscribe(self, topics: list[str], on_assign: Rebalance, on_revoke: Rebalance, on_lost: Rebalance) -> None:
        self._callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}

    def consume(self, num_messages: int, timeout: float) -> list[FedMessage]:
        reports, self._commit_reports = self._commit_reports, []
        for report in reports:
            self.config["on_commit"](None, report)
        events, self._events = self._events, []
        for kind, tps in events:
            self._callbacks[kind](self, [TopicPartition(t, p) for t, p in tps])
        out: list[FedMessage] = []
        with self._lock:
            for tp in sorted(self.assigned - self.paused):
                log = self.logs.get(tp, [])
                while self.positions.get(tp, 0) < len(log) and len(out) < num_messages:
                    out.append(log[self.positions[tp]])
                    self.positions[tp] += 1
        if not out and not reports and not events and timeout > 0:
            # The real client blocks up to the timeout when nothing arrived; so does the loop here.
            time.sleep(timeout)
        return out

    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.committed_offsets.get((tp.topic, tp.partition), -1001))
                for tp in partitions]

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned.clear()
        self.incremental_assign(partitions)

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.assigned.add(key)
            if tp.offset == OFFSET_BEGINNING:
                self.positions[key] = 0
            elif tp.offset == OFFSET_END:
                self.positions[key] = self.end(key)
            else:
                self.positions[key] = tp.offset

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in partitions}

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.positions.get((tp.topic, tp.partition), -1001))
                for tp in partitions]

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> list[TopicPartition] | None:
        done = {(tp.topic, tp.partition): tp.offset for tp in offsets}
        for key, value in done.items():
            if value < self.committed_offsets.get(key, 0):
                raise AssertionError(f"the commit of {key[0]}[{key[1]}] went backwards: {value}")
        self.committed_offsets.update(done)
        result = [TopicPartition(tp.topic, tp.partition, tp.offset) for tp in offsets]
        if asynchronous:
            self._commit_reports.append(result)
            return None
        return result

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]:
        return 0, self.end((partition.topic, partition.partition))

    def close(self) -> None:
        """Leave the group: what is assigned is revoked first, as the real client does."""
        if self.assigned and "revoke" in self._callbacks:
            self._callbacks["revoke"](self, [TopicPartition(t, p) for t, p in sorted(self.assigned)])
        self.assigned.clear()
        self.closed = True


def _conforms(consumer: ScriptedConsumer) -> KafkaConsumer:
    return consumer


@dataclass(frozen=True)
class Produced:
    """One record the dead-letter writer produced."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp: int | None


class MemoryProducer:
    """The part of ``confluent_kafka.Producer`` the dead-letter writer uses; every write is
    acknowledged at the next poll, and kept."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.produced: list[Produced] = []
        self._reports: list[tuple[Any, Produced]] = []
        self._lock = threading.Lock()

    def produce(
        self, topic: str, key: bytes | None = None, value: bytes | None = None,
        headers: Iterable[tuple[str, bytes | None]] | None = None, on_delivery: Any = None,
        timestamp: int | None = None,
    ) -> None:
        record = Produced(topic, key, value, tuple(headers or ()), timestamp)
        with self._lock:
            self.produced.append(record)
            self._reports.append((on_delivery, record))

    def poll(self, timeout: float = 0) -> int:
        with self._lock:
            reports, self._reports = self._reports, []
        for on_delivery, record in reports:
            if on_delivery is not None:
                on_delivery(None, record)
        return len(reports)

    def flush(self, timeout: float = -1) -> int:
        self.poll()
        return 0
