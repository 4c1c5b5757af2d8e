"""Dead-letter topics: where final failures and poison records go, so that nothing is dropped.

The original record (raw key, value, headers, timestamp) is written with ``acks=all`` and
idempotence on, plus ``kdb.*`` headers that say where it came from and why it failed. An offset
becomes committable only once Kafka acknowledged its dead letter; a failed write is retried with
backoff by the caller.

Used from the bridge's main thread only: ``send`` queues a write, ``poll`` serves delivery
reports and returns what was acknowledged or failed since the previous call.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from .record import raw_parts
from .settings import Settings

logger = logging.getLogger("bridge.deadletter")

#: Header names the bridge adds to a dead letter (the original headers come first).
HEADER_PREFIX = "kdb."

# librdkafka properties that only mean something to a consumer; not passed to the producer.
_CONSUMER_ONLY = (
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "partition.assignment.strategy",
    "group.",
    "fetch.",
    "queued.",
    "auto.commit",
    "enable.auto",
    "check.crcs",
    "isolation.level",
    "consume.callback.max.messages",
)


def producer_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {k: v for k, v in settings.kafka.items() if not k.startswith(_CONSUMER_ONLY)}
    config.update(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "client.id": f"kafka-dramatiq-bridge-dlq-{socket.gethostname()}",
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "message.timeout.ms": 30000,
            # librdkafka's own log lines go through the bridge's format and secret masking.
            "logger": logging.getLogger("bridge.kafka"),
        }
    )
    return config


@dataclass(frozen=True, slots=True)
class Outcome:
    """The delivery report of one dead letter."""

    topic: str
    partition: int
    offset: int
    error: str | None


def dead_letter_headers(
    env: Mapping[str, Any],
    *,
    group: str,
    handler: str,
    reason: str,
    detail: Mapping[str, Any],
) -> list[tuple[str, bytes | None]]:
    """The original headers followed by the bridge's ``kdb.*`` headers."""
    _, _, original = raw_parts(env)
    error = detail.get("error") or {}
    ours = {
        "topic": env["t"],
        "partition": env["p"],
        "offset": env["o"],
        "timestamp": env.get("ts"),
        "group": group,
        "handler": detail.get("actor") or handler,
        "reason": reason,
        "error.type": error.get("type"),
        "error.message": error.get("message"),
        "attempts": detail.get("attempts"),
    }
    extra = [(HEADER_PREFIX + k, str(v).encode()) for k, v in ours.items() if v is not None]
    return [*original, *extra]


class DeadLetters:
    def __init__(self, settings: Settings, producer_factory: Any = Producer) -> None:
        self.settings = settings
        self._producer: Any = producer_factory(producer_config(settings))
        self._outcomes: list[Outcome] = []

    def ensure_topics(self, topics: Iterable[str], timeout: float = 15.0) -> None:
        """Create dead-letter topics that do not exist yet (one partition, the broker's default
        replication). A failure is logged; writes are retried until the topic exists."""
        wanted = sorted(set(topics))
        if not wanted:
            return
        admin = AdminClient(producer_config(self.settings))
        try:
            existing = admin.list_topics(timeout=timeout).topics
        except KafkaException as e:
            logger.warning("cannot check dead-letter topics %s: %s", ", ".join(wanted), e)
            return
        missing = [t for t in wanted if t not in existing]
        if not missing:
            return
        futures = admin.create_topics([NewTopic(t, num_partitions=1) for t in missing], operation_timeout=timeout)
        for topic, future in futures.items():
            try:
                future.result(timeout)
                logger.info("created dead-letter topic %s", topic)
            except KafkaException as e:
                if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    logger.error("cannot create dead-letter topic %s: %s", topic, e)

    def send(self, dead_letter_topic: str, env: Mapping[str, Any], headers: list[tuple[str, bytes | None]]) -> None:
        """Queue the dead letter of the record in ``env``; its outcome comes from :meth:`poll`."""
        raw_key, raw_value, _ = raw_parts(env)
        topic, partition, offset = env["t"], int(env["p"]), int(env["o"])

        def report(error: KafkaError | None, _message: Any) -> None:
            self._outcomes.append(Outcome(topic, partition, offset, None if error is None else error.str()))

        kwargs: dict[str, Any] = {"key": raw_key, "value": raw_value, "headers": headers, "on_delivery": report}
        if env.get("ts") is not None:
            kwargs["timestamp"] = int(env["ts"])
        try:
            self._producer.produce(dead_letter_topic, **kwargs)
        except (BufferError, KafkaException) as e:
            self._outcomes.append(Outcome(topic, partition, offset, str(e)))

    def poll(self) -> list[Outcome]:
        self._producer.poll(0)
        outcomes, self._outcomes = self._outcomes, []
        return outcomes

    def flush(self, timeout: float) -> list[Outcome]:
        self._producer.flush(timeout)
        return self.poll()
