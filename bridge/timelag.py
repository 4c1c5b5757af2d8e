"""Lag in seconds: now minus the Kafka timestamp of the oldest record not yet committed.

The bridge knows the timestamps of the records it holds. The oldest record not committed may not
be held, though: a partition paused (its window full, an outage) stops fetching while records
keep arriving, and ``status`` runs without a bridge. Then the record is read from Kafka itself by
a consumer that only ``assign()``s partitions at given offsets: it joins no group and commits
nothing, and it asks the group coordinator nothing (no AdminClient group call).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, TopicPartition

from .consumer import consumer_config
from .settings import Settings

logger = logging.getLogger("bridge")

TP = tuple[str, int]


def lag_seconds(lag_records: int | None, timestamp_ms: int | None, now: float) -> float | None:
    """The time lag of a partition: 0 when nothing is left to commit, None while the oldest
    record's timestamp is unknown; never negative (a producer's clock may run ahead)."""
    if lag_records is None:
        return None
    if lag_records <= 0:
        return 0.0
    if timestamp_ms is None:
        return None
    return round(max(now - timestamp_ms / 1000, 0.0), 3)


def reader_config(settings: Settings) -> dict[str, Any]:
    """A consumer for single records: small fetches; a position before the log start (retention
    deleted it) reads the oldest record there is."""
    config = consumer_config(settings)
    config.update(
        {
            "client.id": f"{config['client.id']}-timestamps",
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": 1048576,
            "max.partition.fetch.bytes": 65536,
            "queued.max.messages.kbytes": 1024,
        }
    )
    return config


def read_timestamps(
    consumer: Any, positions: Mapping[TP, int], timeout: float, stop: threading.Event | None = None
) -> dict[TP, int]:
    """The timestamp (ms) of the first record at or after each position (an offset, or
    ``OFFSET_BEGINNING``), for the partitions that answered within ``timeout`` (or until ``stop``
    is set). Partitions without such a record, or whose record carries no timestamp, are left out.

    Raises:
      KafkaException: from ``assign``.
    """
    if not positions:
        return {}
    stop = stop or threading.Event()
    consumer.assign([TopicPartition(t, p, o) for (t, p), o in positions.items()])
    found: dict[TP, int] = {}
    pending = set(positions)
    deadline = time.monotonic() + timeout
    try:
        while pending and not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            began, wait = time.monotonic(), min(left, 0.5)
            messages = consumer.consume(num_messages=max(len(pending), 10), timeout=wait)
            if not messages:
                stop.wait(max(began + wait - time.monotonic(), 0.0))  # in case the client did not wait
            for message in messages:
                tp = (message.topic(), message.partition())
                if message.error() is not None or tp not in pending or message.offset() < positions[tp]:
                    continue
                pending.discard(tp)
                kind, ts = message.timestamp()
                if kind != TIMESTAMP_NOT_AVAILABLE and ts >= 0:
                    found[tp] = ts
    finally:
        consumer.unassign()
    return found


class TimestampReader:
    """The bridge's reader of timestamps it does not hold, in a thread of its own so that the loop
    never waits for Kafka. :meth:`timestamp` answers from what was read and asks for what was not.
    Thread-safe."""

    def __init__(self, settings: Settings, *, consumer_factory: Callable[[dict[str, Any]], Any] = Consumer,
                 interval: float = 2.0, timeout: float = 5.0) -> None:
        self._settings = settings
        self._factory = consumer_factory
        self._interval = interval
        self._timeout = timeout
        self._lock = threading.Lock()
        self._wanted: dict[TP, int] = {}
        self._known: dict[TP, tuple[int, int]] = {}
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def timestamp(self, tp: TP, offset: int) -> int | None:
        """The timestamp of the first record at or after ``offset`` if read already; else None,
        and it is read soon."""
        with self._lock:
            known = self._known.get(tp)
            if known is not None and known[0] == offset:
                return known[1]
            self._wanted[tp] = offset
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._run, name="bridge-timestamps", daemon=True)
                self._thread.start()
        self._wake.set()
        return None

    def close(self) -> None:
        """Stop the thread and close its consumer (waits for a read in progress)."""
        self._closed.set()
        self._wake.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(self._timeout + 5)

    def _run(self) -> None:
        consumer: Any = None
        try:
            while not self._closed.is_set():
                self._wake.wait()
                self._wake.clear()
                with self._lock:
                    wanted, self._wanted = self._wanted, {}
                if self._closed.is_set():
                    break
                if wanted:
                    try:
                        consumer = consumer or self._factory(reader_config(self._settings))
                        found = read_timestamps(consumer, wanted, self._timeout, self._closed)
                    except Exception as e:  # KafkaException, or a client that cannot be made: try later
                        logger.debug("reading record timestamps for the time lag failed: %s", e)
                        found = {}
                    with self._lock:
                        self._known.update({tp: (wanted[tp], ts) for tp, ts in found.items()})
                # At most one read per interval, however often the loop asks.
                self._closed.wait(self._interval)
        finally:
            if consumer is not None:
                consumer.close()
