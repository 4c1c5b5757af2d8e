"""A scripted stand-in for confluent_kafka.Consumer: the bridge's :class:`KafkaConsumer` surface,
with every commit, pause and assignment recorded for assertions. mypy checks it against the
protocol (``_conforms`` below), and tests/contract runs the same contract tests against it and
against a real broker."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from bridge.consumer import KafkaConsumer, Rebalance


@dataclass
class FakeMessage:
    _topic: str
    _partition: int
    _offset: int
    _key: bytes | None = b"k"
    _value: bytes | None = b"v"
    _headers: list[tuple[str, bytes | None]] | None = None

    def error(self) -> KafkaError | None:
        return None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000 + self._offset)


@dataclass
class FakeConsumer:
    """Partitions and their logs; ``grant``/``take_back``/``lose`` schedule rebalance callbacks,
    which run inside the next ``consume`` as with the real client."""

    config: dict[str, Any]
    logs: dict[tuple[str, int], list[FakeMessage]] = field(default_factory=dict)
    committed_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    commits: list[dict[tuple[str, int], int]] = field(default_factory=list)
    paused: set[tuple[str, int]] = field(default_factory=set)
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    assigned: set[tuple[str, int]] = field(default_factory=set)
    _callbacks: dict[str, Any] = field(default_factory=dict)
    _events: deque[tuple[str, list[tuple[str, int]]]] = field(default_factory=deque)
    _pending_commit_reports: list[list[TopicPartition]] = field(default_factory=list)
    _mid_batch: list[list[tuple[str, int]]] = field(default_factory=list)
    closed: bool = False
    #: Metadata requests fail, as when no broker answers.
    unreachable: bool = False

    def add(self, topic: str, partition: int, count: int, **fields: Any) -> None:
        log = self.logs.setdefault((topic, partition), [])
        start = len(log)
        log.extend(FakeMessage(topic, partition, start + i, **fields) for i in range(count))

    def grant(self, *tps: tuple[str, int]) -> None:
        """The group assigns ``tps`` (the callback runs inside the next ``consume``)."""
        self._events.append(("assign", list(tps)))

    def take_back(self, *tps: tuple[str, int]) -> None:
        """The group revokes ``tps``."""
        self._events.append(("revoke", list(tps)))

    def take_back_mid_batch(self, *tps: tuple[str, int]) -> None:
        """The group revokes ``tps`` inside the next ``consume`` that takes records, after it took
        them: as librdkafka serves a rebalance met in the middle of a batch. The position already
        counts those records; the revoked partitions' ones are purged from the batch, so the
        application never sees them."""
        self._mid_batch.append(list(tps))

    def lose(self, *tps: tuple[str, int]) -> None:
        """The group lost ``tps`` (session timeout)."""
        self._events.append(("lost", list(tps)))

    # -- the consumer surface ----------------------------------------------------------------

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        if self.unreachable:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "no broker answers (test)"))
        return SimpleNamespace(topics={t: SimpleNamespace(error=None) for t, _ in self.logs})

    def subscribe(self, topics: list[str], on_assign: Rebalance, on_revoke: Rebalance, on_lost: Rebalance) -> None:
        self._callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}

    def is_subscribed(self) -> bool:
        return bool(self._callbacks)

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        for report in self._pending_commit_reports:
            self.config["on_commit"](None, report)
        self._pending_commit_reports.clear()
        while self._events:
            kind, tps = self._events.popleft()
            self._callbacks[kind](self, [TopicPartition(t, p) for t, p in tps])
            if kind != "assign":
                self.assigned -= set(tps)
        out: list[FakeMessage] = []
        for tp in sorted(self.assigned):
            if tp in self.paused:
                continue
            log = self.logs.get(tp, [])
            while self.positions.get(tp, 0) < len(log) and len(out) < num_messages:
                out.append(log[self.positions[tp]])
                self.positions[tp] += 1
        if out and self._mid_batch:
            revoked = set(self._mid_batch.pop(0))
            self._callbacks["revoke"](self, [TopicPartition(t, p) for t, p in sorted(revoked)])
            self.assigned -= revoked
            out = [m for m in out if (m.topic(), m.partition()) not in revoked]
        return out

    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.committed_offsets.get((tp.topic, tp.partition), -1001))
                for tp in partitions]

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned.clear()
        self.incremental_assign(partitions)

    def unassign(self) -> None:
        self.assigned.clear()

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.assigned.add(key)
            self.positions[key] = 0 if tp.offset == OFFSET_BEGINNING else tp.offset

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
            assert value >= self.committed_offsets.get(key, 0), f"commit of {key} went backwards"
        self.commits.append(done)
        self.committed_offsets.update(done)
        result = [TopicPartition(tp.topic, tp.partition, tp.offset) for tp in offsets]
        if asynchronous:
            self._pending_commit_reports.append(result)
            return None
        return result

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]:
        return 0, len(self.logs.get((partition.topic, partition.partition), []))

    def close(self) -> None:
        """Leave the group: what is assigned is revoked first, as the real client does."""
        if self.assigned and "revoke" in self._callbacks:
            self._callbacks["revoke"](self, [TopicPartition(t, p) for t, p in sorted(self.assigned)])
        self.assigned.clear()
        self.closed = True


def _conforms(consumer: FakeConsumer) -> KafkaConsumer:
    return consumer
