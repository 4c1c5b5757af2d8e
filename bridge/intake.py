"""Intake: polled Kafka records into their partition's delivery window."""

from __future__ import annotations

from .completions import reason_of
from .consumer import KafkaMessage, consume_error
from .deadletter import DeadLetterRouter
from .owned import Partitions
from .record import envelope
from .settings import Settings
from .stats import Stats


class Intake:
    """Accepts what the consumer returns. Called from the loop's thread only."""

    def __init__(self, settings: Settings, partitions: Partitions, router: DeadLetterRouter, stats: Stats) -> None:
        self._settings = settings
        self._partitions = partitions
        self._router = router
        self._stats = stats

    def accept(self, message: KafkaMessage, now: float) -> None:
        """Deliver one polled record (or act on an error event).

        Raises:
          FatalError: an error event the bridge cannot go on from (see
          :func:`bridge.consumer.consume_error`).
        """
        error = message.error()
        if error is not None:
            consume_error(message, error, self._settings)
            return
        owned = self._partitions.get(message.topic(), message.partition())
        offset = message.offset()
        if owned is None or offset is None:
            return  # revoked since it was fetched
        key, value, headers = message.key(), message.value(), message.headers()
        ts_type, ts = message.timestamp()
        size = len(key or b"") + len(value or b"") + sum(len(n) + len(v or b"") for n, v in headers or ())
        env = envelope(owned.topic, owned.partition, offset, key, value, headers, ts if ts_type else None)
        entry = owned.state.deliver(offset, key, env, size, now, ts if ts_type else None)
        self._stats.delivered += 1
        if owned.letters.adopted and not entry.done:
            detail = owned.letters.adopted.pop(entry.offset, None)
            if detail is not None:
                # Failed for good under the previous owner, which did not get to dead-letter it.
                owned.state.withdraw(entry)
                self._router.fail(owned, entry, now, reason_of(detail), detail)
