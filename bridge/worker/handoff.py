"""Running a record again in a worker: a parked record whose predecessor finished, or the
successor a finish started. With dramatiq's Redis and RabbitMQ brokers the record goes onto this
process's own work queue (no round trip through the broker); with any other broker it goes back on
its lane, whose consumer acknowledges it as its own delivery.

The dramatiq internals this relies on, all here: the worker's ``work_queue`` and its item type,
and how each broker's consumer acknowledges a message that is no delivery of its own: the Redis
broker's acknowledgement of an id it does not hold changes nothing, and RabbitMQ's consumer finds
no delivery tag and logs a warning, which :meth:`Handoff.quiet_acks` drops. (A RabbitMQ delivery
tag must never be acknowledged twice, and a tag from before a reconnect may name another delivery
now: a record run again carries no tag.)

Records handed back here and not yet started are remembered, so that a shutdown puts them back
on their lanes, and so that their start, when a finish recorded it already, is not asked again.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy

try:  # dramatiq 2.x: the work queue's item type (dramatiq 1.x queues (priority, message) tuples)
    from dramatiq.worker import _WorkQueueItem
except ImportError:  # pragma: no cover - dramatiq 1.x
    _WorkQueueItem = None  # type: ignore[assignment,misc]

from ..enqueue import hands_over
from ..keys import PartitionKeys
from ..ledger import StartResult
from ..logs import coordinates
from ..protocol import OPTION, Meta, ProtocolError, meta_of
from .signs import Signs

logger = logging.getLogger("bridge.worker")

#: The priority of a record put on a worker's own work queue: ahead of everything queued.
_FIRST = -(1 << 62)

#: What dramatiq's RabbitMQ consumer logs when it acknowledges a message with no delivery tag.
_UNTAGGED_ACKS = frozenset({"Failed to ack message: not in known tags.", "Failed to nack message: not in known tags."})
#: The logger of dramatiq's RabbitMQ consumer.
_RABBITMQ_CONSUMER_LOGGER = "dramatiq.brokers.rabbitmq._RabbitmqConsumer"


class Untagged(MessageProxy):
    """A record run again from this process's own work queue: no delivery of the broker."""

    _tag = None


def plain(message: Any) -> dramatiq.Message[Any]:
    """The message under a broker's proxy (a RabbitMQ delivery, a MessageProxy)."""
    while isinstance(message, MessageProxy):
        message = message._message
    assert isinstance(message, dramatiq.Message)
    return message


def retries_of(message: Any) -> int:
    """dramatiq's retry count of a message: its copies for retries are not duplicates."""
    return int(message.options.get("retries", 0) or 0)


class Handoff:
    """Where a record runs again. Thread-safe."""

    def __init__(self, signs: Signs) -> None:
        self._signs = signs
        self._lock = threading.Lock()
        self._worker: dramatiq.Worker | None = None
        self._broker: dramatiq.Broker | None = None
        # Whether records run again go onto the worker's own queue (decided at boot, by broker).
        self._own_queue = False
        self._stopping = False
        # Message id -> records handed to the work queue and not started yet.
        self._released: dict[str, Any] = {}
        # Of those, the ones whose start a finish recorded: message id -> (token, retries).
        self._approved: dict[str, tuple[str, int]] = {}
        # Per worker thread: whether the message dramatiq acknowledges next is an Untagged one.
        self._acking = threading.local()

    def boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._broker, self._worker, self._stopping = broker, worker, False
        self._own_queue = hands_over(broker)
        logging.getLogger(_RABBITMQ_CONSUMER_LOGGER).addFilter(self.quiet_acks)

    def stopping(self) -> None:
        self._stopping = True

    @property
    def broker(self) -> dramatiq.Broker:
        return self._broker or dramatiq.get_broker()

    @property
    def in_worker(self) -> bool:
        """Booted inside a dramatiq worker (its finishes may start a staged successor)."""
        return self._worker is not None

    @property
    def waiting(self) -> int:
        """Records handed to this process's work queue and not started yet."""
        with self._lock:
            return len(self._released)

    def take(self, message_id: str) -> tuple[str, int] | None:
        """Forget a record handed to the work queue (it starts, or another middleware skipped it);
        the recorded start it carries, if any."""
        if not self._released:
            return None
        with self._lock:
            self._released.pop(message_id, None)
            return self._approved.pop(message_id, None)

    def ended(self, message: Any) -> tuple[str, int] | None:
        """``message`` ran or was skipped, and dramatiq acknowledges it next in this thread; what
        :meth:`take` returns."""
        self._acking.untagged = isinstance(message, Untagged)
        return self.take(message.message_id)

    def quiet_acks(self, record: logging.LogRecord) -> bool:
        """Logging filter: drop the RabbitMQ consumer's warning about a record run again here."""
        return not (record.msg in _UNTAGGED_ACKS and getattr(self._acking, "untagged", False))

    def run_again(self, message: Any, *, token: str | None = None) -> bool:
        """Run ``message`` again; ``token`` names the start a finish recorded for it. True when it
        went onto this process's work queue."""
        worker = self._worker
        consumer = worker.consumers.get(message.queue_name) if worker is not None else None
        queue = getattr(worker, "work_queue", None)
        local = self._own_queue and queue is not None
        if consumer is None or self._stopping or not local:
            self.requeue(message, token=token)
            return False
        with self._lock:
            self._released[message.message_id] = message
            if token is not None:
                self._approved[message.message_id] = (token, retries_of(message))
        assert queue is not None
        # The head of its partition: ahead of records that would only park again.
        proxy = Untagged(plain(message))
        queue.put(_WorkQueueItem(_FIRST, proxy) if _WorkQueueItem is not None else (_FIRST, proxy))
        return True

    def unpark(self, message: Any) -> None:
        """A parked record's predecessor finished (or its recheck is due): run it again."""
        self._forget_parked(message)
        self.run_again(message)

    def hand_over(self, successor: Any, verdict: StartResult | None, token: str, retries: int) -> None:
        """Run the successor whose start a finish decided, or drop it if it must not run."""
        if verdict == "run":
            if retries > retries_of(successor):
                successor.options["retries"] = retries
            self._forget_parked(successor)
            self.run_again(successor, token=token)
        elif verdict in ("wait", "duplicate"):
            self.unpark(successor)
        elif verdict is not None:
            found = _meta(successor)
            if found is not None:
                self._forget_parked(successor)
                logger.info("not running %s: %s (epoch %d)", found.where, verdict, found.epoch,
                            extra=coordinates(found.topic, found.partition, found.offset))

    def _forget_parked(self, message: Any) -> None:
        found = _meta(message)
        if found is not None:
            self._signs.unparked((PartitionKeys(found.group, found.topic, found.partition), found.offset))

    def requeue(self, message: Any, *, token: str | None = None) -> None:
        """Put a record back on its lane; ``token`` names the start recorded for it already."""
        copy = plain(message)
        try:
            meta = meta_of(copy)
        except ProtocolError:
            meta = None
        if meta is not None:
            copy = copy.copy(options={OPTION: replace(meta, token=token).to_option()})
        try:
            self.broker.enqueue(copy)
        except Exception as e:
            # Its heartbeat stops with it: the bridge dispatches the record again after its
            # re-dispatch timeout.
            logger.error("could not put a record back on lane %s: %s", message.queue_name, e)

    def release_all(self) -> int:
        """At shutdown: put every record handed here and not started back on its lane."""
        with self._lock:
            waiting = [(m, self._approved.get(m.message_id)) for m in self._released.values()]
            self._released.clear()
            self._approved.clear()
        for message, approved in waiting:
            self.requeue(message, token=approved[0] if approved else None)
        return len(waiting)


def _meta(message: Any) -> Meta | None:
    try:
        return meta_of(message)
    except ProtocolError:
        return None
