"""The Kafka consumer: the surface the bridge uses, the one place its configuration is built,
and the translation of its errors.

The safety-critical properties are forced here and cannot be overridden (``Settings`` rejects
them in the pass-through, and they are applied last).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from .denied import access_denied
from .errors import ConfigurationError, FatalError, KafkaFatalError, OffsetOutOfRange
from .logs import coordinates
from .settings import Settings

logger = logging.getLogger("bridge")

Rebalance = Callable[[Any, list[TopicPartition]], None]


class KafkaMessage(Protocol):
    """A polled record, or an error event (``error()`` not None)."""

    def error(self) -> KafkaError | None: ...
    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> list[tuple[str, bytes | None]] | None: ...
    def timestamp(self) -> tuple[int, int]: ...


class KafkaConsumer(Protocol):
    """The part of ``confluent_kafka.Consumer`` the bridge uses. The unit tier's scripted consumer
    implements it too, and one contract test module runs against both (tests/contract)."""

    def subscribe(self, topics: list[str], on_assign: Rebalance, on_revoke: Rebalance, on_lost: Rebalance) -> None:
        """Join the group; the callbacks run inside :meth:`consume`, on the calling thread."""
        ...

    def consume(self, num_messages: int, timeout: float) -> Sequence[KafkaMessage]: ...
    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any: ...
    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]: ...
    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]: ...

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> list[TopicPartition] | None:
        """Asynchronous: the outcome reaches ``on_commit`` inside a later :meth:`consume`."""
        ...

    def pause(self, partitions: list[TopicPartition]) -> None: ...
    def resume(self, partitions: list[TopicPartition]) -> None: ...
    def assign(self, partitions: list[TopicPartition]) -> None: ...
    def incremental_assign(self, partitions: list[TopicPartition]) -> None: ...

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]: ...

    def close(self) -> None: ...

#: Forced on every consumer: offsets move only when the bridge commits them, and an
#: out-of-range committed offset is an error instead of a silent reset.
FORCED: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "error",
    "enable.partition.eof": False,
}


def take(consumer: KafkaConsumer, batch: int, wait: float) -> list[KafkaMessage]:
    """Up to ``batch`` records, waiting at most ``wait`` seconds for the first.

    librdkafka's batch consume waits its whole timeout for the batch to fill, so one record after
    a quiet spell would wait that timeout out: wait for one, then take what else is there at once.
    """
    first = consumer.consume(num_messages=1, timeout=wait)
    if not first or batch <= 1:
        return list(first)
    return [*first, *consumer.consume(num_messages=batch - 1, timeout=0)]


def consumer_config(settings: Settings, **callbacks: Any) -> dict[str, Any]:
    """librdkafka configuration of the bridge's consumer."""
    config: dict[str, Any] = {
        "client.id": f"kafka-dramatiq-bridge-{socket.gethostname()}",
        # Fetch no further ahead than the bridge holds anyway, to bound memory.
        "queued.max.messages.kbytes": 16384,
        # Notice partitions added to a topic within half a minute (librdkafka's default is 5).
        "topic.metadata.refresh.interval.ms": 30000,
        # The bridge polls every few milliseconds (handlers run in workers), so a short poll
        # interval costs nothing and bounds how long a join lost in a broker restart can hang.
        "max.poll.interval.ms": 60000,
        # A fetch parked on the broker for librdkafka's default 500 ms measurably delayed other
        # clients' appends on a small broker (a paced producer's append latency: 671 ms -> 1 ms).
        "fetch.wait.max.ms": 100,
        # librdkafka's own log lines go through the bridge's format and secret masking.
        "logger": logging.getLogger("bridge.kafka"),
    }
    if settings.group_protocol == "classic":
        config["partition.assignment.strategy"] = "cooperative-sticky"
    config.update(settings.kafka)
    config.update(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": settings.group_id,
            "group.protocol": settings.group_protocol,
            "isolation.level": settings.isolation_level,
        }
    )
    config.update(FORCED)
    config.update(callbacks)
    return config


def is_cooperative(config: dict[str, Any]) -> bool:
    """Whether assignments change incrementally (cooperative assignor or the KIP-848 protocol)."""
    if config.get("group.protocol") == "consumer":
        return True
    return "cooperative" in str(config.get("partition.assignment.strategy", ""))


def consume_error(message: KafkaMessage, error: KafkaError, settings: Settings) -> None:
    """Act on an error event from :meth:`KafkaConsumer.consume`: raise what stops the bridge, log
    the rest (librdkafka retries those itself)."""
    topic, partition = message.topic(), message.partition()
    where = f"{topic}[{partition}]" if topic else "consumer"
    extra = coordinates(topic, partition or 0, message.offset()) if topic else None
    if error.code() == KafkaError._AUTO_OFFSET_RESET:
        raise OffsetOutOfRange(
            f"{where}: the committed offset is out of range ({error.str()}); the bridge does not "
            "reset offsets silently. Inspect the group and reset it explicitly.",
            topic=topic,
            partition=partition,
        )
    denied = access_denied(error, settings, topic)
    if denied is not None:
        raise denied
    if error.fatal():
        raise KafkaFatalError(f"{where}: fatal Kafka error: {error.str()}", topic=topic, partition=partition)
    if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
        logger.error("%s: topic does not exist (%s); waiting for it", where, error.str(), extra=extra)
        return
    logger.warning("%s: %s", where, error.str(), extra=extra)


def client_error(error: KafkaError, settings: Settings) -> FatalError | None:
    """Act on an error from the client's ``error_cb``: the fatal error to stop with, or None
    after logging it."""
    denied = access_denied(error, settings)
    if denied is not None:
        return denied
    if error.fatal():
        logger.critical("fatal Kafka error: %s", error.str())
        return KafkaFatalError(f"fatal Kafka error: {error.str()}")
    if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
        logger.error("Kafka at %s: %s", settings.bootstrap_servers, error.str())
    else:
        logger.warning("Kafka: %s", error.str())
    return None


def await_topics(
    consumer: KafkaConsumer, topics: list[str], settings: Settings, stopped: Callable[[], bool],
    wait: Callable[[float], object],
) -> bool:
    """Wait for Kafka to answer (backing off 1 s doubling to 30 s), then check that ``topics``
    exist. Returns False when stopped first.

    Raises:
      KafkaAccessDenied: a refusal; ConfigurationError: a missing topic (unless
      ``BRIDGE_WAIT_FOR_TOPICS``).
    """
    delay = 1.0
    while True:
        if stopped():
            return False
        try:
            metadata = consumer.list_topics(timeout=5)
            break
        except KafkaException as e:
            # Refusals arrive as error events; consuming serves them (nothing is subscribed yet).
            consumer.consume(num_messages=1, timeout=0)
            denied = access_denied(e.args[0], settings)
            if denied is not None:
                raise denied from None
            if stopped():
                return False
            logger.error("cannot reach Kafka at %s (%s); retrying in %.0fs", settings.bootstrap_servers, e, delay)
            wait(delay)
            delay = min(delay * 2, 30.0)
    for topic in topics:
        info = metadata.topics.get(topic)
        if info is None:
            # A listing leaves out topics the principal may not describe; asking for the topic by
            # name tells "missing" from "not authorized".
            with contextlib.suppress(KafkaException):
                info = consumer.list_topics(topic=topic, timeout=5).topics.get(topic)
        if info is not None and info.error is not None:
            denied = access_denied(info.error, settings, topic)
            if denied is not None:
                raise denied
    missing = [t for t in topics if t not in metadata.topics or metadata.topics[t].error is not None]
    if missing and not settings.wait_for_topics:
        raise ConfigurationError(
            f"topic(s) {', '.join(missing)} do not exist; create them, or set BRIDGE_WAIT_FOR_TOPICS=true "
            "to start anyway and wait for them"
        )
    if missing:
        logger.warning("topic(s) %s do not exist yet; waiting for them", ", ".join(missing))
    return True
