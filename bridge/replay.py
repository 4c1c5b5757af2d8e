"""``replay``: send dead letters back to the topic they came from, to be processed again.

Reads a dead-letter topic up to the end offsets it had when the command started, produces each
record (original key, value, timestamp and headers, without the bridge's ``kdb.*`` headers) to
its original topic with ``acks=all``, and commits its progress in the consumer group
``<group>.replay`` only after Kafka acknowledged the copies — so running it again continues where
it stopped and never replays a record twice on purpose.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from .consumer import consumer_config
from .deadletter import HEADER_PREFIX, producer_config
from .errors import ConfigurationError, KafkaUnavailable
from .settings import Settings

logger = logging.getLogger("bridge.replay")


def replay(
    settings: Settings, dead_letter_topic: str, *, to: str | None = None, limit: int | None = None
) -> Counter[str]:
    """Replay ``dead_letter_topic``; returns how many records went to each topic."""
    group = f"{settings.group_id}.replay"
    consumer = Consumer({**consumer_config(settings.model_copy(update={"group_id": group}))})
    producer = Producer(producer_config(settings))
    sent: Counter[str] = Counter()
    errors: list[str] = []

    def report(error: Any, message: Any) -> None:
        if error is not None:
            errors.append(f"{message.topic()}: {error.str()}")

    try:
        try:
            metadata = consumer.list_topics(dead_letter_topic, timeout=10)
        except KafkaException as e:
            raise KafkaUnavailable(f"cannot reach Kafka at {settings.bootstrap_servers}: {e}") from e
        info = metadata.topics.get(dead_letter_topic)
        if info is None or info.error is not None:
            raise ConfigurationError(f"dead-letter topic {dead_letter_topic!r} does not exist")
        partitions = [TopicPartition(dead_letter_topic, p) for p in sorted(info.partitions)]
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions}
        starts = consumer.committed(partitions, timeout=10)
        todo = [
            TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
            for tp in starts
            if (tp.offset if tp.offset >= 0 else 0) < ends[tp.partition]
        ]
        if not todo:
            return sent
        consumer.assign(todo)
        remaining = {tp.partition for tp in todo}
        progress: dict[int, int] = {}
        while remaining and (limit is None or sum(sent.values()) < limit):
            for message in consumer.consume(num_messages=500, timeout=1.0):
                error = message.error()
                if error is not None:
                    raise KafkaUnavailable(f"reading {dead_letter_topic}: {error}")
                partition, offset = int(message.partition() or 0), int(message.offset() or 0)
                if partition not in remaining:
                    continue
                headers: list[tuple[str, Any]] = list(cast(Any, message.headers()) or [])
                original = {k: v for k, v in headers if k.startswith(HEADER_PREFIX)}
                target = to or bytes(original.get(HEADER_PREFIX + "topic") or b"").decode()
                if not target:
                    raise ConfigurationError(
                        f"{dead_letter_topic}[{partition}]@{offset} has no {HEADER_PREFIX}topic header; pass --to"
                    )
                kept = [(k, v) for k, v in headers if not k.startswith(HEADER_PREFIX)]
                producer.produce(target, value=message.value(), key=message.key(), headers=kept, on_delivery=report)
                producer.poll(0)
                sent[target] += 1
                progress[partition] = offset + 1
                if offset + 1 >= ends[partition]:
                    remaining.discard(partition)
                if limit is not None and sum(sent.values()) >= limit:
                    break
        if producer.flush(60) or errors:
            raise KafkaUnavailable(f"replayed records were not all acknowledged: {errors[:3]}")
        consumer.commit(
            offsets=[TopicPartition(dead_letter_topic, p, o) for p, o in progress.items()], asynchronous=False
        )
        return sent
    finally:
        consumer.close()
