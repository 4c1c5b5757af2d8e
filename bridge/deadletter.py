"""Dead-letter topics: where final failures and poison records go, so that nothing is dropped.

The original record (raw key, value, headers, timestamp) is written with ``acks=all`` and
idempotence on, plus ``kdb.*`` headers that say where it came from and why it failed. An offset
becomes committable only once Kafka acknowledged its dead letter; a failed write is retried with
backoff (2 s doubling to 60 s), and one that found its topic missing asks Kafka to create it again.

:class:`DeadLetters` is the producer; :class:`DeadLetterRouter` is the loop's room that routes a
final failure to it and turns acknowledged dead letters into done facts. Both are used from the
loop's thread only.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from .ledger import Ledger, LedgerError
from .logs import coordinates
from .owned import Owned, Partitions
from .partition import Entry
from .record import raw_parts
from .settings import Settings
from .stats import Stats

logger = logging.getLogger("bridge.deadletter")

#: Header names the bridge adds to a dead letter (the original headers come first).
HEADER_PREFIX = "kdb."

#: What a write to a dead-letter topic that does not exist reports.
_MISSING_TOPIC = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC)
#: Seconds between two requests to create the same missing dead-letter topic.
RECREATE_INTERVAL = 30.0

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
        self._admin: Any = None
        #: Dead-letter topics a write found missing since the last poll, and when each was last asked for.
        self._missing: set[str] = set()
        self._asked: dict[str, float] = {}

    def ensure_topics(self, topics: Iterable[str], timeout: float = 15.0) -> None:
        """Create dead-letter topics that do not exist yet (one partition, the broker's default
        replication). A failure is logged; writes are retried until the topic exists."""
        wanted = sorted(set(topics))
        if not wanted:
            return
        admin = AdminClient(producer_config(self.settings))
        try:
            existing = admin.list_topics(timeout=timeout).topics
            admin.poll(0)  # its librdkafka lines go through the logger
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
            except TimeoutError:
                # A broker lost while the controller creates it: the creation may still finish.
                logger.error("cannot create dead-letter topic %s: Kafka at %s gave no answer within %.0fs",
                             topic, self.settings.bootstrap_servers, timeout)
        admin.poll(0)

    def send(self, dead_letter_topic: str, env: Mapping[str, Any], headers: list[tuple[str, bytes | None]]) -> None:
        """Queue the dead letter of the record in ``env``; its outcome comes from :meth:`poll`."""
        raw_key, raw_value, _ = raw_parts(env)
        topic, partition, offset = env["t"], int(env["p"]), int(env["o"])

        def report(error: KafkaError | None, _message: Any) -> None:
            self._outcomes.append(Outcome(topic, partition, offset, None if error is None else error.str()))
            if error is not None and error.code() in _MISSING_TOPIC:
                self._missing.add(dead_letter_topic)

        kwargs: dict[str, Any] = {"key": raw_key, "value": raw_value, "headers": headers, "on_delivery": report}
        if env.get("ts") is not None:
            kwargs["timestamp"] = int(env["ts"])
        try:
            self._producer.produce(dead_letter_topic, **kwargs)
        except (BufferError, KafkaException) as e:
            self._outcomes.append(Outcome(topic, partition, offset, str(e)))

    def poll(self) -> list[Outcome]:
        self._producer.poll(0)
        if self._missing:
            self._create_missing()
        if self._admin is not None:
            self._admin.poll(0)
        outcomes, self._outcomes = self._outcomes, []
        return outcomes

    def _create_missing(self) -> None:
        """Ask Kafka again for dead-letter topics that writes found missing (a creation at start that
        a broker failure cut short); does not wait: the writes are retried after their backoff."""
        missing, self._missing = self._missing, set()
        if not self.settings.create_dead_letter_topics:
            return
        now = time.monotonic()
        due = sorted(t for t in missing if now - self._asked.get(t, now - RECREATE_INTERVAL) >= RECREATE_INTERVAL)
        if not due:
            return
        if self._admin is None:
            self._admin = AdminClient(producer_config(self.settings))
        for topic, future in self._admin.create_topics([NewTopic(t, num_partitions=1) for t in due]).items():
            self._asked[topic] = now
            logger.warning("dead-letter topic %s does not exist; asking Kafka to create it", topic)
            future.add_done_callback(partial(_created, topic))

    def flush(self, timeout: float) -> list[Outcome]:
        self._producer.flush(timeout)
        return self.poll()


def _created(topic: str, future: Future[None]) -> None:
    error = future.exception()
    if error is None:
        logger.info("created dead-letter topic %s", topic)
    elif not (isinstance(error, KafkaException) and error.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS):
        logger.error("cannot create dead-letter topic %s: %s", topic, error)


class DeadLetterRouter:
    """Routes final failures to dead-letter topics and settles them once Kafka acknowledged."""

    def __init__(
        self, settings: Settings, ledger: Ledger, partitions: Partitions, stats: Stats, producer: DeadLetters | None
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._partitions = partitions
        self._stats = stats
        self.producer = producer
        self._acked: list[Outcome] = []
        self._broken = False

    def fail(self, owned: Owned, entry: Entry, now: float, reason: str, detail: dict[str, Any]) -> None:
        """Route a final failure to the dead-letter topic; its offset waits for Kafka's ack."""
        error = detail.get("error") or {}
        detail = {**detail, "reason": reason}
        entry.failure = detail
        owned.letters.failing[entry.offset] = entry
        owned.state.release(entry)
        self._stats.add("failed", owned.topic)
        logger.error(
            "%s@%d: %s in %s after %s attempt(s): %s: %s; %s",
            owned.where,
            entry.offset,
            reason,
            detail.get("actor", owned.handler.name),
            detail.get("attempts", "?"),
            error.get("type"),
            error.get("message"),
            f"writing it to {owned.dead_letter_topic}" if owned.dead_letter_topic else "dead-lettering is off",
            extra=coordinates(owned.topic, owned.partition, entry.offset),
        )
        if owned.dead_letter_topic is None:
            self._acked.append(Outcome(owned.topic, owned.partition, entry.offset, None))
        else:
            entry.dead_letter_at = now

    def send_due(self, now: float) -> None:
        """Write the dead letters that are due (new ones, and failed writes whose backoff ended)."""
        if self.producer is None:
            return
        for owned in self._partitions:
            if owned.dead_letter_topic is None:
                continue
            for entry in owned.letters.failing.values():
                if 0 < entry.dead_letter_at <= now and entry.failure is not None:
                    entry.dead_letter_at = -1
                    headers = dead_letter_headers(
                        entry.payload,
                        group=self._settings.group_id,
                        handler=owned.handler.name,
                        reason=str(entry.failure["reason"]),
                        detail=entry.failure,
                    )
                    self.producer.send(owned.dead_letter_topic, entry.payload, headers)

    def collect(self) -> None:
        """Take the producer's delivery reports (serves its callbacks). A producer that failed for
        good (a refused idempotent producer id) writes nothing more: its dead letters wait, and
        the error is the bridge's to act on, not this loop's to crash on."""
        if self.producer is None:
            return
        try:
            self._acked.extend(self.producer.poll())
        except KafkaException as e:
            if not self._broken:
                self._broken = True
                logger.error("the dead-letter producer failed for good, dead letters wait: %s", e)

    def settle(self, now: float) -> None:
        """Turn acknowledged dead letters into done facts; schedule failed writes again.

        Raises:
          LedgerUnavailable: the acknowledgements not settled yet are kept for the next call.
        """
        if not self._acked:
            return
        acked, self._acked = self._acked, []
        settled: dict[tuple[str, int], list[int]] = {}
        for outcome in acked:
            owned = self._partitions.get(outcome.topic, outcome.partition)
            entry = owned.letters.failing.get(outcome.offset) if owned else None
            if owned is None or entry is None:
                continue  # revoked meanwhile: the next owner handles the record again
            if outcome.error is None:
                settled.setdefault(owned.key, []).append(outcome.offset)
                continue
            entry.dead_letter_tries += 1
            delay = min(2.0**entry.dead_letter_tries, 60.0)
            entry.dead_letter_at = now + delay
            logger.error(
                "%s@%d: writing to dead-letter topic %s failed (%s); retrying in %.0fs, the offset waits",
                owned.where,
                outcome.offset,
                owned.dead_letter_topic,
                outcome.error,
                delay,
                extra=coordinates(owned.topic, owned.partition, outcome.offset),
            )
        items = list(settled.items())
        for i, ((topic, partition), offsets) in enumerate(items):
            owned = self._partitions.get(topic, partition)
            assert owned is not None
            try:
                self._ledger.settle(owned.keys, offsets)
            except LedgerError:
                # Keep the acknowledgements; they are settled once the ledger answers.
                self._acked.extend(Outcome(t, p, o, None) for (t, p), offs in items[i:] for o in offs)
                raise
            for offset in offsets:
                del owned.letters.failing[offset]
            new = owned.state.mark_done(offsets)
            self._stats.add("done", owned.topic, new)
            if owned.dead_letter_topic is not None:
                self._stats.add("dead_lettered", owned.topic, new)
