"""``replay``: send dead letters back to the topic they came from, to be processed again.

Reads a dead-letter topic up to the end offsets it had when the command started and produces each
record (original key, value and headers, without the bridge's ``kdb.*`` headers) to its original
topic with ``acks=all``. Progress is committed in the consumer group ``<group>.replay`` as the run
goes: after each batch, for each partition, up to the last record whose copy Kafka acknowledged
and before which every copy was acknowledged too. A run that stops partway (a record without the
origin header, a copy Kafka refused, an interrupt) commits what was acknowledged before it stops.
Running the command again therefore continues where it stopped, and a copy Kafka acknowledged is
not sent again unless the process died between that acknowledgement and the next commit.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from .consumer import consumer_config
from .deadletter import HEADER_PREFIX, producer_config
from .errors import ConfigurationError, KafkaUnavailable
from .settings import Settings

logger = logging.getLogger("bridge.replay")

#: Records read, produced and then committed as one step.
BATCH = 500
#: Seconds to wait for Kafka to acknowledge a batch of copies. Each copy gives up after the
#: producer's ``message.timeout.ms`` (30 s), so in practice a flush ends before this.
FLUSH_TIMEOUT = 60.0
#: Seconds to keep retrying while the group coordinator is loading or moving.
COORDINATOR_TIMEOUT = 30.0
#: Seconds without a single record while records are still due before the run gives up.
STALL_TIMEOUT = 60.0


@dataclass(slots=True)
class _Copy:
    """One record of the dead-letter topic on its way back; ``acked``/``error`` come from its
    delivery report."""

    offset: int
    target: str
    acked: bool = False
    error: str | None = None


@dataclass
class _Progress:
    """Copies per dead-letter partition, in offset order, and the offsets they make committable."""

    topic: str
    copies: dict[int, deque[_Copy]] = field(default_factory=dict)
    #: Next offset to read, per partition: everything before it was acknowledged.
    committable: dict[int, int] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)
    sent: Counter[str] = field(default_factory=Counter)

    def add(self, partition: int, offset: int, target: str) -> _Copy:
        copy = _Copy(offset, target)
        self.copies.setdefault(partition, deque()).append(copy)
        return copy

    def unsettled(self) -> int:
        return sum(len(q) for q in self.copies.values())

    def settle(self) -> str | None:
        """Move the committable offsets over the acknowledged prefix of each partition; returns
        the first delivery error found, if any (nothing after a failed copy becomes committable)."""
        first_error = None
        for partition, queue in self.copies.items():
            while queue and queue[0].acked:
                copy = queue.popleft()
                self.sent[copy.target] += 1
                self.committable[partition] = copy.offset + 1
            if queue and queue[0].error is not None and first_error is None:
                copy = queue[0]
                first_error = f"the copy of {self.topic}[{partition}]@{copy.offset} to {copy.target}: {copy.error}"
        return first_error

    def started(self) -> bool:
        return bool(self.copies)

    def uncommitted(self) -> list[TopicPartition]:
        return [
            TopicPartition(self.topic, p, o) for p, o in sorted(self.committable.items()) if self.committed.get(p) != o
        ]


def replay(
    settings: Settings, dead_letter_topic: str, *, to: str | None = None, limit: int | None = None
) -> Counter[str]:
    """Replay ``dead_letter_topic``; returns how many copies Kafka acknowledged, per target topic.

    Raises:
      ConfigurationError: the dead-letter topic does not exist, or a record has no ``kdb.topic``
        header and ``to`` is not given (progress before that record is committed first).
      KafkaUnavailable: Kafka could not be reached, or did not acknowledge a copy (progress up
        to the first copy not acknowledged is committed first).
      KeyboardInterrupt: SIGINT or SIGTERM arrived; the run stopped after committing the batch in
        progress (at once on a second signal).
    """
    run = _Replay(settings, dead_letter_topic, to=to, limit=limit)
    with _stop_on_signals(run):
        try:
            run.run()
        except BaseException:
            run.finish(stopped=True)
            raise
        run.finish(stopped=False)
    return run.progress.sent


@contextlib.contextmanager
def _stop_on_signals(run: _Replay) -> Iterator[None]:
    """The first SIGINT or SIGTERM stops the run after the batch in progress is acknowledged and
    committed; a second one interrupts at once. Raising from the first signal could land inside a
    delivery report and lose the acknowledgement it carries. Only the main thread can set
    signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if run.stop_requested:
            raise KeyboardInterrupt(name)
        logger.info("%s: stopping after the batch in progress", name)
        run.stop_requested = name

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _coordinator_busy(error: KafkaError) -> bool:
    """A group coordinator that is loading, moving or not elected yet: worth asking again."""
    return error.retriable() or error.code() in (
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
    )


class _Replay:
    """One run of the command, from the main thread."""

    def __init__(self, settings: Settings, topic: str, *, to: str | None, limit: int | None) -> None:
        self.settings = settings
        self.topic = topic
        self.to = to
        self.limit = limit
        self.progress = _Progress(topic)
        group = f"{settings.group_id}.replay"
        self.consumer: Any = Consumer(consumer_config(settings.model_copy(update={"group_id": group})))
        self.producer: Any = None  # created once there is something to send
        #: Set by a signal handler: the name of the signal that asks the run to stop.
        self.stop_requested: str | None = None

    def run(self) -> None:
        ends, starts = self._bounds()
        todo = [
            TopicPartition(self.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
            for tp in starts
            if max(tp.offset, 0) < ends[tp.partition]
        ]
        if not todo:
            return
        self.producer = Producer(producer_config(self.settings))
        self.consumer.assign(todo)
        remaining = {tp.partition for tp in todo}
        produced = 0
        last_record = time.monotonic()
        while remaining and (self.limit is None or produced < self.limit):
            batch = BATCH if self.limit is None else min(BATCH, self.limit - produced)
            messages = self.consumer.consume(num_messages=batch, timeout=1.0)
            missing_origin: str | None = None
            for message in messages:
                error = message.error()
                if error is not None:
                    raise KafkaUnavailable(f"reading {self.topic}: {error}")
                partition, offset = int(message.partition() or 0), int(message.offset() or 0)
                if partition not in remaining or offset >= ends[partition]:
                    continue  # written after the run started: the next run's
                headers: list[tuple[str, Any]] = list(cast(Any, message.headers()) or [])
                target = self.to or bytes(dict(headers).get(HEADER_PREFIX + "topic") or b"").decode()
                if not target:
                    missing_origin = f"{self.topic}[{partition}]@{offset}"
                    break
                kept = [(k, v) for k, v in headers if not k.startswith(HEADER_PREFIX)]
                self._produce(target, message, kept, self.progress.add(partition, offset, target))
                produced += 1
                if offset + 1 >= ends[partition]:
                    remaining.discard(partition)
            if messages:
                last_record = time.monotonic()
            elif time.monotonic() - last_record > STALL_TIMEOUT:
                raise KafkaUnavailable(f"no record of {self.topic} arrived for {STALL_TIMEOUT:.0f}s; stopping")
            # Partitions whose remaining offsets hold no record (compaction, transaction markers).
            for tp in self.consumer.position([TopicPartition(self.topic, p) for p in remaining]):
                if tp.offset >= ends[tp.partition]:
                    remaining.discard(tp.partition)
            self._checkpoint()
            if missing_origin is not None:
                raise ConfigurationError(
                    f"{missing_origin} has no {HEADER_PREFIX}topic header, so its original topic is unknown; "
                    "replay it with --to TOPIC"
                )
            if self.stop_requested:
                raise KeyboardInterrupt(self.stop_requested)

    def _bounds(self) -> tuple[dict[int, int], list[TopicPartition]]:
        """End offset of each partition now, and the replay group's committed offsets."""
        deadline = time.monotonic() + COORDINATOR_TIMEOUT
        while True:
            try:
                info = self.consumer.list_topics(self.topic, timeout=10).topics.get(self.topic)
                if info is None or info.error is not None:
                    raise ConfigurationError(f"dead-letter topic {self.topic!r} does not exist")
                partitions = [TopicPartition(self.topic, p) for p in sorted(info.partitions)]
                ends = {tp.partition: self.consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions}
                return ends, self.consumer.committed(partitions, timeout=10)
            except KafkaException as e:
                if not _coordinator_busy(e.args[0]) or time.monotonic() > deadline:
                    raise KafkaUnavailable(f"cannot reach Kafka at {self.settings.bootstrap_servers}: {e}") from e
                logger.debug("asking again: %s", e)
                time.sleep(0.5)

    def _produce(self, target: str, message: Any, headers: list[tuple[str, Any]], copy: _Copy) -> None:
        def report(error: KafkaError | None, _message: Any) -> None:
            if error is None:
                copy.acked = True
            else:
                copy.error = error.str()

        while True:
            try:
                self.producer.produce(
                    target, value=message.value(), key=message.key(), headers=headers, on_delivery=report
                )
                break
            except BufferError:  # the local queue is full: let deliveries drain
                self.producer.poll(0.1)
            except KafkaException as e:
                copy.error = str(e)
                break
        self.producer.poll(0)

    def _checkpoint(self) -> None:
        """Wait for the copies produced so far, then commit the acknowledged prefix."""
        if self.progress.unsettled():
            self.producer.flush(FLUSH_TIMEOUT)
        error = self.progress.settle()
        self._commit()
        if error is not None:
            raise KafkaUnavailable(f"Kafka did not acknowledge {error}")
        if self.progress.unsettled():
            raise KafkaUnavailable(
                f"Kafka did not acknowledge {self.progress.unsettled()} copies within {FLUSH_TIMEOUT:.0f}s"
            )

    def _commit(self) -> None:
        offsets = self.progress.uncommitted()
        if not offsets:
            return
        deadline = time.monotonic() + COORDINATOR_TIMEOUT
        while True:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=False)
                break
            except KafkaException as e:
                if not _coordinator_busy(e.args[0]) or time.monotonic() > deadline:
                    raise KafkaUnavailable(f"cannot commit the replay's progress on {self.topic}: {e}") from e
                time.sleep(0.5)
        self.progress.committed.update({tp.partition: tp.offset for tp in offsets})
        where = ", ".join(f"[{tp.partition}]@{tp.offset}" for tp in offsets)
        logger.debug("%s: progress committed at %s", self.topic, where)

    def finish(self, *, stopped: bool) -> None:
        """On every way out: wait for copies still on their way, commit what they acknowledged,
        and release both clients (serving their last log lines through ``bridge.kafka``)."""
        try:
            if self.progress.unsettled():
                self.producer.flush(FLUSH_TIMEOUT)
                self.progress.settle()
            with contextlib.suppress(KafkaUnavailable):
                self._commit()
            left = self.progress.unsettled()
            if left:
                logger.warning("%d copies from %s not acknowledged; the next run sends them again", left, self.topic)
            if stopped and self.progress.started():
                where = ", ".join(f"[{p}]@{o}" for p, o in sorted(self.progress.committed.items())) or "none"
                logger.info(
                    "stopping: %d record(s) of %s replayed; progress committed at %s",
                    sum(self.progress.sent.values()), self.topic, where,
                )
        finally:
            try:
                # Producer.close() is newer than our floor (2.12); older clients free the handle
                # when the last reference goes, after the flush above.
                close = getattr(self.producer, "close", None)
                self.producer = None
                if close is not None:
                    close()
            finally:
                self.consumer.close()
