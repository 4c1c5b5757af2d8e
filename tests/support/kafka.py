"""Kafka helpers: topics, fast keyed produce, committed consumption, offsets."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from tests.support.waiting import wait_until


@dataclass(frozen=True)
class Record:
    """One consumed record, decoded as UTF-8."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: str


def unique_name(prefix: str = "t") -> str:
    """A topic or group name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create_topic(admin: AdminClient, name: str, partitions: int = 1, config: dict[str, str] | None = None,
                 timeout: float = 30.0) -> str:
    """Create ``name`` and wait until metadata shows every partition with a leader."""
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
        operation_timeout=timeout,
    )
    futures[name].result(timeout)

    def ready() -> bool:
        topic = admin.list_topics(name, timeout=5).topics.get(name)
        if topic is None or topic.error is not None or len(topic.partitions) != partitions:
            return False
        return all(p.leader >= 0 and p.error is None for p in topic.partitions.values())

    wait_until(ready, timeout, interval=0.1, message=f"topic {name} never showed {partitions} led partitions")
    return name


def produce_keyed(
    bootstrap_servers: str,
    topic: str,
    count: int,
    *,
    key: Callable[[int], str] = lambda i: str(i % 97),
    value: Callable[[int], str] = str,
    config: dict[str, Any] | None = None,
    timeout: float = 60.0,
) -> int:
    """Produce records ``key(i) -> value(i)`` for ``i`` in ``range(count)`` and wait for every ack.

    Idempotent with acks=all, so retries cannot reorder or duplicate records of a
    key. Raises if any record was not delivered; returns ``count``.
    """
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    producer = Producer(
        {
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "batch.num.messages": 10_000,
            **(config or {}),
        }
    )
    for i in range(count):
        while True:
            try:
                producer.produce(topic, key=key(i), value=value(i), on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain
                producer.poll(0.05)
        producer.poll(0)
    remaining = producer.flush(timeout)
    if remaining or errors:
        raise AssertionError(f"{remaining} records undelivered after {timeout}s; errors: {errors[:5]}")
    return count


def consumer(bootstrap_servers: str, group_id: str, **overrides: Any) -> Consumer:
    """A consumer that starts at the earliest offset and commits only when told to."""
    return Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            **overrides,
        }
    )


def _record(msg: Message) -> Record:
    topic, partition, offset, key, value = msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value()
    assert topic is not None and partition is not None and offset is not None and value is not None
    return Record(
        topic=topic,
        partition=partition,
        offset=offset,
        key=None if key is None else key.decode(),
        value=value.decode(),
    )


def consume_committing(
    bootstrap_servers: str,
    topic: str,
    group_id: str,
    expected: int,
    *,
    timeout: float = 60.0,
    batch: int = 500,
) -> list[Record]:
    """Consume ``topic`` in group ``group_id`` until ``expected`` records arrived or ``timeout``.

    Each batch is processed (recorded) before its offsets are committed
    asynchronously; the final commit is synchronous, so on return the group's
    committed offsets cover everything returned.
    """
    records: list[Record] = []
    c = consumer(bootstrap_servers, group_id)
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            msgs = c.consume(num_messages=batch, timeout=0.5)
            processed = False
            for msg in msgs:
                if msg.error() is not None:
                    raise KafkaException(msg.error())
                records.append(_record(msg))
                processed = True
            if processed:
                c.commit(asynchronous=True)
        if records:
            try:
                c.commit(asynchronous=False)
            except KafkaException as exc:
                # Nothing new since the last async commit is not a failure.
                if exc.args[0].code() != KafkaError._NO_OFFSET:
                    raise
    finally:
        c.close()
    return records


def read_all(bootstrap_servers: str, topic: str, partitions: int, *, timeout: float = 60.0) -> list[Record]:
    """Every record of ``topic`` from the beginning up to the current high watermarks.

    Uses manual assignment, so no group is joined and nothing is committed.
    """
    highs = high_watermarks(bootstrap_servers, topic, partitions)
    c = consumer(bootstrap_servers, unique_name("reader"))
    records: list[Record] = []
    try:
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        pending = {p for p, high in highs.items() if high > 0}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for msg in c.consume(num_messages=1000, timeout=0.5):
                if msg.error() is not None:
                    raise KafkaException(msg.error())
                record = _record(msg)
                records.append(record)
                if record.offset + 1 >= highs[record.partition]:
                    pending.discard(record.partition)
    finally:
        c.close()
    return records


def high_watermarks(bootstrap_servers: str, topic: str, partitions: int, timeout: float = 30.0) -> dict[int, int]:
    """High watermark (next offset to be written) of each partition.

    Retries retriable errors (a partition still moving its leader) until ``timeout``.
    """
    c = consumer(bootstrap_servers, unique_name("watermarks"))
    deadline = time.monotonic() + timeout
    try:
        highs: dict[int, int] = {}
        for p in range(partitions):
            while True:
                try:
                    highs[p] = c.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
                    break
                except KafkaException as exc:
                    if not exc.args[0].retriable() or time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        return highs
    finally:
        c.close()


def committed_offsets(
    bootstrap_servers: str, group_id: str, topic: str, partitions: Iterable[int], timeout: float = 10.0
) -> dict[int, int]:
    """The group's committed offset per partition, read by a fresh consumer (negative: none)."""
    c = consumer(bootstrap_servers, group_id)
    try:
        tps = c.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def delete_topics(admin: AdminClient, names: list[str], timeout: float = 30.0) -> None:
    """Delete topics, ignoring ones that are already gone."""
    if not names:
        return
    for future in admin.delete_topics(names, operation_timeout=timeout).values():
        try:
            future.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise


def read_raw(bootstrap_servers: str, topic: str, expected: int, *, timeout: float = 60.0,
             settle: float = 2.0) -> list[Message]:
    """Every message of ``topic`` from the beginning: waits for ``expected`` messages, then
    ``settle`` seconds more so that extra (duplicate) messages are seen too."""
    c = consumer(bootstrap_servers, unique_name("reader"))
    messages: list[Message] = []
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + timeout
        quiet_until: float | None = None
        while time.monotonic() < deadline:
            for msg in c.consume(num_messages=500, timeout=0.5):
                if msg.error() is None:
                    messages.append(msg)
            if len(messages) >= expected:
                quiet_until = quiet_until or time.monotonic() + settle
                if time.monotonic() >= quiet_until:
                    break
    finally:
        c.close()
    return messages
