"""The bridge process: poll Kafka, dispatch records onto lanes, read the ledger, commit.

Everything runs on one thread, the one that calls :meth:`Bridge.run`; rebalance callbacks are
invoked by the consumer from inside ``consume()`` on that same thread, so partition state needs
no locks. The only cross-thread input is :meth:`Bridge.stop`, a flag.

When the ledger (or the task broker) stops answering, the bridge pauses every partition and
keeps polling, so it stays in the consumer group; it neither dispatches nor commits until the
ledger answers again.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import dramatiq
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from . import protocol
from .consumer import consumer_config, is_cooperative
from .deadletter import DeadLetters, Outcome, dead_letter_headers
from .denied import access_denied
from .enqueue import EnqueueError, enqueue_many, pipelined
from .errors import (
    ConfigurationError,
    FatalError,
    KafkaFatalError,
    KafkaUnavailable,
    LedgerUnavailable,
    OffsetOutOfRange,
    TaskBrokerUnavailable,
)
from .handlers import Handler, run_hooks
from .keys import PartitionKeys, lane_name, status_key
from .ledger import Ledger, Progress, connect
from .logs import coordinates
from .metrics import Metrics, PartitionView, View
from .partition import Entry, PartitionState
from .probe import Probe
from .protocol import OPTION, Meta, Reason, failure_epoch, staged_value
from .record import envelope
from .settings import Settings
from .stats import Stats

logger = logging.getLogger("bridge")

TP = tuple[str, int]

#: Errors after which the bridge pauses, keeps its group membership, and retries with backoff.
_OUTAGES = (LedgerUnavailable, TaskBrokerUnavailable)

#: Seconds the ledger keeps the keys of a partition nobody owns (a deleted topic or partition);
#: a new owner's epoch bump keeps them for good.
RETIRED_PARTITION_TTL = 7 * 86400

#: How many records a re-dispatch summary names.
_NAMED = 10


class _BatchFailed(Exception):
    """Records of a batch from index ``sent`` on may not be on their lanes."""

    def __init__(self, sent: int, error: TaskBrokerUnavailable | LedgerUnavailable) -> None:
        super().__init__(str(error))
        self.sent = sent
        self.error = error


@dataclass(slots=True, eq=False)
class Owned:
    """A partition this bridge currently owns."""

    topic: str
    partition: int
    handler: Handler
    keys: PartitionKeys
    lane: str
    state: PartitionState
    window: int
    start_offset: int
    dead_letter_topic: str | None
    #: Ordered mode on a Redis broker: records behind an unfinished one are staged in the ledger,
    #: and the worker that finishes a record starts the next itself.
    stages: bool = False
    needs_setup: bool = False
    handing_over: bool = True
    handover_deadline: float = 0.0
    #: No handover before this time (after a ledger loss, workers need a heartbeat to register
    #: the records they are running again).
    handover_after: float = 0.0
    waiting_logged: bool = False
    paused: bool = False
    confirmed: int = -1
    requested: int = -1
    pruned: int = -1
    #: Final failures on their way to the dead-letter topic, by offset.
    failing: dict[int, Entry] = field(default_factory=dict)
    #: Final failures recorded under an older assignment for records not delivered yet: they are
    #: dead-lettered as they arrive, never run again.
    adopted: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: The ledger handed this partition to a newer owner before Kafka told this bridge.
    fenced: bool = False

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def key(self) -> TP:
        return (self.topic, self.partition)

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]"


class Bridge:
    """Moves records of the handlers' topics from Kafka onto dramatiq lanes, and commits only
    the contiguous prefix of records the ledger shows done."""

    def __init__(
        self,
        settings: Settings,
        handlers: Mapping[str, Handler],
        *,
        ledger: Ledger | None = None,
        consumer_factory: Any = Consumer,
        dead_letters: DeadLetters | None = None,
    ) -> None:
        if not handlers:
            raise ConfigurationError("no Kafka handlers registered")
        self.settings = settings
        self.handlers = dict(handlers)
        self.ledger = ledger or Ledger(connect(settings.redis_url))
        self.dead_letters = dead_letters
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self.owned: dict[TP, Owned] = {}
        self.stats = Stats()
        self.metrics = Metrics(self.stats)
        self._joined = False
        self._last_poll: float | None = None
        self._next_publish = 0.0
        self._next_idle_ping = 0.0
        self._commits_sent: collections.deque[float] = collections.deque()
        self.probe = Probe.from_settings(settings.event_log, settings.crash_at)
        self._consumer_factory = consumer_factory
        self._consumer: Any = None
        self._cooperative = True
        self._stop = threading.Event()
        self._fatal: FatalError | None = None
        self._acked: list[Outcome] = []
        self._outage_since: float | None = None
        self._outage_retry_at = 0.0
        self._outage_backoff = 0.0
        self._next_commit = 0.0
        self._next_progress = 0.0
        self._next_handover_check = 0.0
        self._next_redispatch_check = 0.0
        self._next_upkeep = 0.0
        #: The last epoch this bridge knew for each partition, so a new one is always higher.
        self._epochs: dict[TP, int] = {}

    # -- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to stop polling, drain, commit and return. Safe from any thread."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Run until :meth:`stop`; raises a :class:`FatalError` the bridge cannot recover from."""
        try:
            if self.start():
                while not self._stop.is_set():
                    self.poll_once()
                if self._fatal is None:
                    self._shutdown()
        finally:
            self.close()
        if self._fatal is not None:
            raise self._fatal

    def start(self) -> bool:
        """Create the consumer, wait for Kafka, check the topics and join the group.

        Returns False when stopped before Kafka answered.
        """
        config = consumer_config(self.settings, on_commit=self._on_commit, error_cb=self._on_error)
        self._cooperative = is_cooperative(config)
        # Secret values in both are masked by the log output (bridge.logs).
        logger.debug("settings: %s", self.settings.model_dump(exclude={"kafka"}))
        logger.debug("consumer configuration: %s", {k: v for k, v in config.items() if isinstance(v, str | int)})
        try:
            self._consumer = self._consumer_factory(config)
        except KafkaException as e:
            raise ConfigurationError(f"invalid Kafka configuration (BRIDGE_KAFKA / -X): {e.args[0].str()}") from None
        topics = sorted(self.handlers)
        if not self._await_topics(topics):
            return False
        if self.dead_letters is None:
            self.dead_letters = DeadLetters(self.settings)
        if self.settings.create_dead_letter_topics:
            self.dead_letters.ensure_topics(t for topic, h in self.handlers.items() if (t := h.dead_letter_for(topic)))
        logger.info(
            "bridge %s joining group %r on %s for topics %s",
            self.instance,
            self.settings.group_id,
            self.settings.bootstrap_servers,
            ", ".join(topics),
        )
        self._consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        return True

    def close(self) -> None:
        """Leave the group (revoking what is owned) and release the consumer."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def _await_topics(self, topics: list[str]) -> bool:
        """Wait for Kafka to answer, then check that the handlers' topics exist."""
        delay = 1.0
        while not self._stop.is_set():
            try:
                metadata = self._consumer.list_topics(timeout=5)
                break
            except KafkaException as e:
                # Refusals arrive as error events; consuming serves them (nothing is subscribed yet).
                self._consumer.consume(num_messages=1, timeout=0)
                denied = access_denied(e.args[0], self.settings)
                if denied is not None:
                    self._halt(denied)
                if self._fatal is not None:
                    return False
                logger.error(
                    "cannot reach Kafka at %s (%s); retrying in %.0fs", self.settings.bootstrap_servers, e, delay
                )
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
        else:
            return False
        for topic in topics:
            info = metadata.topics.get(topic)
            if info is None:
                # A listing leaves out topics the principal may not describe; asking for the
                # topic by name tells "missing" from "not authorized".
                with contextlib.suppress(KafkaException):
                    info = self._consumer.list_topics(topic=topic, timeout=5).topics.get(topic)
            if info is not None and info.error is not None:
                denied = access_denied(info.error, self.settings, topic)
                if denied is not None:
                    raise denied
        missing = [t for t in topics if t not in metadata.topics or metadata.topics[t].error is not None]
        if missing and not self.settings.wait_for_topics:
            raise ConfigurationError(
                f"topic(s) {', '.join(missing)} do not exist; create them, or set BRIDGE_WAIT_FOR_TOPICS=true "
                "to start anyway and wait for them"
            )
        if missing:
            logger.warning("topic(s) %s do not exist yet; waiting for them", ", ".join(missing))
        return True

    def poll_once(self) -> None:
        """One round of the main loop: poll, then everything the ledger and task broker allow."""
        busy = any(o.state.dispatched_open for o in self.owned.values())
        messages = self._consumer.consume(num_messages=self.settings.poll_batch, timeout=0.005 if busy else 0.05)
        for message in messages:
            self._accept(message)
        if self.dead_letters is not None:
            self._acked.extend(self.dead_letters.poll())
        now = self._last_poll = time.monotonic()
        if now >= self._next_publish:
            self._publish(now)
        if self._outage_since is not None and now < self._outage_retry_at:
            return
        try:
            if self._outage_since is not None:
                self._recover(now)
            self._work(now)
        except _OUTAGES as e:
            self._outage(e, now)

    def _work(self, now: float) -> None:
        """One round of everything that needs the ledger or the task broker."""
        if not self.owned and now >= self._next_idle_ping:
            # Nothing owned makes no ledger calls; readiness still has to notice an outage.
            self._next_idle_ping = now + 1.0
            self.ledger.ping()
        self._setup_pending(now)
        if now >= self._next_upkeep:
            self._upkeep()
            self._next_upkeep = now + self.settings.lane_refresh_interval
        if now >= self._next_handover_check:
            self._check_handovers(now)
            self._next_handover_check = now + 0.05
        self._settle_dead_letters(now)
        self._read_ledger()
        if not self._stop.is_set():
            self._dispatch(now)
            if now >= self._next_redispatch_check:
                self._redispatch(now)
                self._next_redispatch_check = now + 1.0
        self._send_dead_letters(now)
        self._apply_backpressure()
        if now >= self._next_commit:
            self._commit(list(self.owned.values()), asynchronous=True)
            self._next_commit = now + self.settings.commit_interval
        if self.settings.progress_interval and now >= self._next_progress:
            if self._next_progress:
                self._report(now)
            else:
                self.stats.mark(now)
            self._next_progress = now + self.settings.progress_interval

    def _shutdown(self) -> None:
        """Stop taking records, let dispatched ones finish, commit what is done."""
        logger.info("stopping: draining %d dispatched records", self._dispatched_open())
        self._pause_all()
        deadline = time.monotonic() + self.settings.shutdown_timeout
        while (self._dispatched_open() or self._failing()) and time.monotonic() < deadline:
            # Keep polling: a consumer that stops polling is evicted from the group.
            for message in self._consumer.consume(num_messages=self.settings.poll_batch, timeout=0.01):
                self._accept(message)
            try:
                self._drain_round()
            except _OUTAGES as e:
                logger.error("stopping without the ledger: %s", e)
                break
        left = self._dispatched_open()
        if left:
            logger.warning("stopping with %d dispatched records unfinished; they will run again", left)
        self._commit(list(self.owned.values()), asynchronous=False)
        with contextlib.suppress(*_OUTAGES):
            self._report(time.monotonic())

    def _drain_round(self, only: list[Owned] | None = None) -> None:
        """Collect completions and dead-letter acknowledgements without dispatching anything new."""
        if self.dead_letters is not None:
            self._acked.extend(self.dead_letters.poll())
        now = time.monotonic()
        self._settle_dead_letters(now)
        self._read_ledger(only)
        self._send_dead_letters(now)

    def _pause_all(self) -> None:
        for owned in self.owned.values():
            if not owned.paused:
                self._consumer.pause([owned.tp])
                owned.paused = True

    def _dispatched_open(self) -> int:
        return sum(o.state.dispatched_open for o in self.owned.values())

    def _failing(self) -> int:
        return sum(len(o.failing) for o in self.owned.values())

    # -- outages ----------------------------------------------------------------------------

    def _outage(self, error: Exception, now: float) -> None:
        if isinstance(error, FatalError):
            self._halt(error)  # a refused permission: waiting cannot help
        first = self._outage_since is None
        if first:
            self._outage_since = now
            self._outage_backoff = 0.5
        else:
            self._outage_backoff = min(self._outage_backoff * 2, 10.0)
        self._outage_retry_at = now + self._outage_backoff
        self._pause_all()
        log = logger.error if first or self._outage_backoff >= 10.0 else logger.warning
        log(
            "%s; partitions paused, not dispatching or committing, retrying in %.1fs",
            error,
            self._outage_backoff,
        )

    def _recover(self, now: float) -> None:
        self.ledger.ping()
        assert self._outage_since is not None
        logger.info("ledger answers again after %.1fs; resuming", now - self._outage_since)
        self._outage_since = None
        # Time spent in the outage is no sign of a lost message: restart the clocks.
        for owned in self.owned.values():
            for entry in owned.state.dispatched_unfinished():
                entry.checked_at = now

    # -- intake -----------------------------------------------------------------------------

    def _accept(self, message: Any) -> None:
        error = message.error()
        if error is not None:
            self._on_consume_error(message, error)
            return
        owned = self.owned.get((message.topic(), message.partition()))
        if owned is None:
            return
        key, value, headers = message.key(), message.value(), message.headers()
        ts_type, ts = message.timestamp()
        size = len(key or b"") + len(value or b"") + sum(len(n) + len(v or b"") for n, v in headers or ())
        entry = owned.state.deliver(
            message.offset(),
            key,
            envelope(owned.topic, owned.partition, message.offset(), key, value, headers, ts if ts_type else None),
            size,
        )
        self.stats.delivered += 1
        if owned.adopted and not entry.done:
            detail = owned.adopted.pop(entry.offset, None)
            if detail is not None:
                # Failed for good under the previous owner, which did not get to dead-letter it.
                owned.state.withdraw(entry)
                self._fail(owned, entry, time.monotonic(), _reason_of(detail), detail)

    def _on_consume_error(self, message: Any, error: KafkaError) -> None:
        where = f"{message.topic()}[{message.partition()}]" if message.topic() else "consumer"
        extra = coordinates(message.topic(), message.partition(), message.offset()) if message.topic() else None
        if error.code() == KafkaError._AUTO_OFFSET_RESET:
            raise OffsetOutOfRange(
                f"{where}: the committed offset is out of range ({error.str()}); the bridge does not "
                "reset offsets silently. Inspect the group and reset it explicitly."
            )
        denied = access_denied(error, self.settings, message.topic())
        if denied is not None:
            raise denied
        if error.fatal():
            raise KafkaFatalError(f"{where}: fatal Kafka error: {error.str()}")
        if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            logger.error("%s: topic does not exist (%s); waiting for it", where, error.str(), extra=extra)
            return
        logger.warning("%s: %s", where, error.str(), extra=extra)

    def _on_error(self, error: KafkaError) -> None:
        denied = access_denied(error, self.settings)
        if denied is not None:
            self._halt(denied)
        elif error.fatal():
            logger.critical("fatal Kafka error: %s", error.str())
            self._halt(KafkaFatalError(f"fatal Kafka error: {error.str()}"))
        elif error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            logger.error("Kafka at %s: %s", self.settings.bootstrap_servers, error.str())
        else:
            logger.warning("Kafka: %s", error.str())

    def _halt(self, error: FatalError) -> None:
        """Stop for good: :meth:`run` raises ``error`` (the first one) once the loop has ended;
        whoever ends the process logs it."""
        if self._fatal is None:
            self._fatal = error
        self.stop()

    # -- dispatch ---------------------------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        room = self.settings.max_in_flight - sum(o.state.dispatched_open for o in self.owned.values())
        batch: list[tuple[Owned, Entry, int]] = []
        refused: list[tuple[Owned, Entry, dict[str, Any]]] = []
        taken_all: list[tuple[Owned, Entry]] = []
        for owned in self.owned.values():
            if room <= 0:
                break
            if owned.handing_over or owned.fenced or not owned.state.has_ready():
                continue
            taken = owned.state.take_ready(room, now)
            room -= len(taken)
            for entry in taken:
                taken_all.append((owned, entry))
                if entry.size > self.settings.max_message_bytes:
                    detail = {
                        "error": {
                            "type": "RecordTooLarge",
                            "message": f"{entry.size} bytes exceed BRIDGE_MAX_MESSAGE_BYTES "
                            f"({self.settings.max_message_bytes})",
                        },
                        "attempts": 0,
                        "reason": Reason.TOO_LARGE.value,
                    }
                    refused.append((owned, entry, detail))
                    continue
                batch.append((owned, entry, 1))
        if refused:
            # In the ledger first, so the successor waiting for the record starts at once.
            failures: dict[PartitionKeys, list[tuple[int, int, dict[str, Any]]]] = {}
            for owned, entry, detail in refused:
                failures.setdefault(owned.keys, []).append((entry.offset, owned.state.epoch, detail))
            try:
                self.ledger.fail(failures)
            except LedgerUnavailable:
                for owned, entry in reversed(taken_all):
                    owned.state.undispatch(entry)
                raise
            for owned, entry, detail in refused:
                self._fail(owned, entry, now, Reason.TOO_LARGE.value, detail)
        try:
            self._enqueue(batch)
        except _BatchFailed as e:
            self._count_dispatched(batch[: e.sent])
            for owned, entry, _ in reversed(batch[e.sent :]):
                owned.state.undispatch(entry)
            raise e.error from None
        self._count_dispatched(batch)

    def _count_dispatched(self, batch: list[tuple[Owned, Entry, int]]) -> None:
        for owned, _, _ in batch:
            self.stats.add("dispatched", owned.topic)

    def _message(self, owned: Owned, entry: Entry, attempt: int) -> dramatiq.Message[Any]:
        meta = Meta(
            group=self.settings.group_id,
            topic=owned.topic,
            partition=owned.partition,
            offset=entry.offset,
            epoch=owned.state.epoch,
            attempt=attempt,
            prev=entry.prev,
            version=protocol.VERSION,
        )
        return dramatiq.Message(
            queue_name=owned.lane,
            actor_name=owned.handler.actor.actor_name,
            args=(entry.payload,),
            kwargs={},
            options={OPTION: meta.to_option()},
        )

    def _enqueue(self, batch: list[tuple[Owned, Entry, int]]) -> None:
        """Put a batch of records on their lanes (or stage them behind their predecessors) in
        order: one round trip to the ledger and one pipeline per broker, per chunk."""
        chunk = self.settings.enqueue_batch
        for start in range(0, len(batch), chunk):
            part = batch[start : start + chunk]
            lane = self._stage(part, start)
            by_broker: dict[int, list[int]] = {}
            for i in lane:
                by_broker.setdefault(id(part[i][0].handler.actor.broker), []).append(i)
            for indexes in by_broker.values():
                broker = part[indexes[0]][0].handler.actor.broker
                try:
                    enqueue_many(broker, [self._message(*part[i]) for i in indexes])
                except EnqueueError as e:
                    owned, entry, _ = part[indexes[e.done]]
                    where = f"{owned.where}@{entry.offset} on lane {owned.lane}"
                    raise _BatchFailed(start, TaskBrokerUnavailable(f"enqueue of {where} failed: {e}")) from e
            if self.probe:
                for owned, entry, attempt in part:
                    self.probe.event(
                        "dispatched", t=owned.topic, p=owned.partition, o=entry.offset, e=owned.state.epoch, a=attempt
                    )
                    self.probe.point("after-enqueue")

    def _stage(self, part: list[tuple[Owned, Entry, int]], start: int) -> list[int]:
        """Stage the records of ``part`` that wait for an unfinished predecessor; the indexes of
        the others, which go on their lanes."""
        staged: dict[PartitionKeys, list[int]] = {}
        lane: list[int] = []
        for i, (owned, entry, attempt) in enumerate(part):
            if owned.stages and entry.prev >= 0 and attempt == 1:
                staged.setdefault(owned.keys, []).append(i)
            else:
                lane.append(i)
        if not staged:
            return lane
        pairs: dict[PartitionKeys, list[tuple[int, str]]] = {}
        for keys, indexes in staged.items():
            pairs[keys] = []
            for i in indexes:
                owned, entry, attempt = part[i]
                message = self._message(owned, entry, attempt)
                body = message.copy(options={"redis_message_id": message.message_id}).encode()
                pairs[keys].append((entry.prev, staged_value(entry.offset, owned.state.epoch, attempt, body)))
        epochs = {part[indexes[0]][0].keys: part[indexes[0]][0].state.epoch for indexes in staged.values()}
        try:
            late = self.ledger.stage(epochs, pairs, self._live)
        except LedgerUnavailable as e:
            raise _BatchFailed(start, e) from e
        for keys, indexes in late.items():
            lane.extend(staged[keys][j] for j in indexes)
        return sorted(lane)

    def _redispatch(self, now: float) -> None:
        """Dispatch again records that show no sign of life for ``redispatch_timeout``: one
        round trip for every partition, one summary line per round."""
        timeout = self.settings.redispatch_timeout
        candidates: dict[PartitionKeys, tuple[Owned, list[Entry]]] = {}
        for owned in self.owned.values():
            if owned.handing_over or owned.fenced:
                continue
            # In ordered modes only the first unfinished record of a partition (key) can be lost:
            # the ones behind it wait, staged or parked, without a sign of life.
            stale = [
                e
                for e in owned.state.dispatched_unfinished()
                if e.failure is None and now - e.checked_at > timeout and owned.state.is_head(e)
            ]
            if stale:
                candidates[owned.keys] = (owned, stale)
        if not candidates:
            return
        # Completion notices are a fast path; the done facts themselves decide. Liveness is
        # judged on the ledger's clock, and a scheduled retry is alive until its eta.
        answers = self.ledger.stale({k: [e.offset for e in found] for k, (_, found) in candidates.items()}, timeout)
        again: list[tuple[Owned, Entry, int]] = []
        for keys, answer in answers.items():
            owned, found = candidates[keys]
            for entry in found:
                entry.checked_at = now
            self._apply_progress(owned, answer.progress, now)
            for entry in found:
                attempt = answer.again.get(entry.offset)
                if attempt is not None and not entry.done and entry.failure is None:
                    again.append((owned, entry, attempt))
        if not again:
            return
        named = ", ".join(f"{o.where}@{e.offset}" for o, e, _ in again[:_NAMED])
        more = f" and {len(again) - _NAMED} more" if len(again) > _NAMED else ""
        logger.warning(
            "dispatching %d record(s) again after no sign of life for %.0fs (their message was lost in the "
            "task broker or their worker died): %s%s",
            len(again),
            timeout,
            named,
            more,
        )
        try:
            self._enqueue(again)
        except _BatchFailed as e:
            raise e.error from None
        for owned, _, _ in again:
            self.stats.add("redispatched", owned.topic)

    def _apply_backpressure(self) -> None:
        total = sum(o.state.open for o in self.owned.values())
        over_total = total >= self.settings.max_in_flight
        for owned in self.owned.values():
            want = over_total or owned.state.open >= owned.window or owned.needs_setup
            if want != owned.paused:
                (self._consumer.pause if want else self._consumer.resume)([owned.tp])
                owned.paused = want

    # -- ledger -----------------------------------------------------------------------------

    def _read_ledger(self, only: list[Owned] | None = None) -> None:
        by_keys = {
            owned.keys: owned
            for owned in (only if only is not None else self.owned.values())
            if owned.state.dispatched_open and not owned.needs_setup
        }
        if not by_keys:
            return
        now = time.monotonic()
        for keys, progress in self.ledger.completions(list(by_keys)).items():
            self._apply_progress(by_keys[keys], progress, now)

    def _apply_progress(self, owned: Owned, progress: Progress, now: float) -> None:
        new = owned.state.mark_done(progress.done)
        self.stats.add("done", owned.topic, new)
        if self.probe and new:
            self.probe.event("done", t=owned.topic, p=owned.partition, offsets=progress.done)
            self.probe.point("after-done")
        if owned.failing:
            for offset in progress.done:
                owned.failing.pop(offset, None)  # a later copy succeeded: no dead letter needed
        for offset, detail in sorted(progress.failed.items()):
            entry = owned.state.entry(offset)
            if entry is None or entry.done or entry.failure is not None:
                continue
            epoch = failure_epoch(detail)
            if epoch is not None and epoch < owned.state.epoch and entry.dispatched:
                # The older owner's copy failed; this owner dispatched the record again, and its
                # own copy decides (it runs once the older one stopped).
                logger.debug("%s@%d: ignoring a failure of epoch %d", owned.where, offset, epoch)
                continue
            self._fail(owned, entry, now, _reason_of(detail), detail)

    # -- final failures and dead letters ----------------------------------------------------

    @property
    def _live(self) -> float:
        """How recent a worker's sign of life must be for its record to count as running (the
        workers use the same: three heartbeats)."""
        return 3 * self.settings.heartbeat_interval

    def _fail(self, owned: Owned, entry: Entry, now: float, reason: str, detail: dict[str, Any]) -> None:
        """Route a final failure to the dead-letter topic; its offset waits for Kafka's ack."""
        error = detail.get("error") or {}
        detail = {**detail, "reason": reason}
        entry.failure = detail
        owned.failing[entry.offset] = entry
        owned.state.release(entry)
        self.stats.add("failed", owned.topic)
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

    def _send_dead_letters(self, now: float) -> None:
        if self.dead_letters is None:
            return
        for owned in self.owned.values():
            if owned.dead_letter_topic is None:
                continue
            for entry in owned.failing.values():
                if 0 < entry.dead_letter_at <= now and entry.failure is not None:
                    entry.dead_letter_at = -1
                    headers = dead_letter_headers(
                        entry.payload,
                        group=self.settings.group_id,
                        handler=owned.handler.name,
                        reason=str(entry.failure["reason"]),
                        detail=entry.failure,
                    )
                    self.dead_letters.send(owned.dead_letter_topic, entry.payload, headers)

    def _settle_dead_letters(self, now: float) -> None:
        """Turn acknowledged dead letters into done facts; schedule failed writes again."""
        if not self._acked:
            return
        acked, self._acked = self._acked, []
        settled: dict[TP, list[int]] = {}
        for outcome in acked:
            owned = self.owned.get((outcome.topic, outcome.partition))
            entry = owned.failing.get(outcome.offset) if owned else None
            if owned is None or entry is None:
                continue  # revoked meanwhile: the next owner handles the record again
            if outcome.error is None:
                settled.setdefault((owned.topic, owned.partition), []).append(outcome.offset)
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
            owned = self.owned[(topic, partition)]
            try:
                self.ledger.settle(owned.keys, offsets)
            except LedgerUnavailable:
                # Keep the acknowledgements; they are settled once the ledger answers.
                self._acked.extend(Outcome(t, p, o, None) for (t, p), offs in items[i:] for o in offs)
                raise
            for offset in offsets:
                del owned.failing[offset]
            new = owned.state.mark_done(offsets)
            self.stats.add("done", owned.topic, new)
            if owned.dead_letter_topic is not None:
                self.stats.add("dead_lettered", owned.topic, new)

    # -- commits ----------------------------------------------------------------------------

    def _commit(self, partitions: list[Owned], *, asynchronous: bool) -> None:
        offsets: list[TopicPartition] = []
        for owned in partitions:
            target = self._commit_target(owned)
            if target is None or target <= owned.confirmed:
                continue
            if asynchronous and target <= owned.requested:
                continue
            owned.requested = target
            offsets.append(TopicPartition(owned.topic, owned.partition, target))
        if offsets:
            began = time.monotonic()
            if asynchronous:
                self._commits_sent.append(began)
            try:
                result = self._consumer.commit(offsets=offsets, asynchronous=asynchronous)
            except KafkaException as e:
                if asynchronous:
                    self._commits_sent.pop()
                for owned in partitions:
                    owned.requested = owned.confirmed
                self.stats.commit_failures += 1
                logger.warning("commit failed, will retry: %s", e)
                return
            if not asynchronous:
                self.metrics.commit_duration.observe(time.monotonic() - began)
                self.stats.commits += 1
            if self.probe:
                self.probe.event("commit", offsets=[[tp.topic, tp.partition, tp.offset] for tp in offsets])
                self.probe.point("after-commit")
            if not asynchronous and result:
                self._confirm(result)
        self._prune()

    def _commit_target(self, owned: Owned) -> int | None:
        if owned.fenced:
            return None
        target = owned.state.committable()
        if self.settings.unsafe_commit_at_dispatch and owned.state.last_dispatched >= 0:
            return max(target or 0, owned.state.last_dispatched + 1)
        if owned.state.idle and target is not None:
            # Past the last record may lie transaction markers; the consumer's position
            # includes them, and every record before it was delivered and is done.
            try:
                position = int(self._consumer.position([owned.tp])[0].offset)
            except KafkaException:
                position = -1
            if position > target:
                target = position
        return target

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        # Answers to asynchronous commits arrive in the order they were sent.
        if self._commits_sent:
            self.metrics.commit_duration.observe(time.monotonic() - self._commits_sent.popleft())
        if error is not None:
            self.stats.commit_failures += 1
            denied = access_denied(error, self.settings)
            if denied is not None:
                self._halt(denied)
                return
            logger.warning("commit failed, will retry: %s", error.str())
            for tp in partitions:
                owned = self.owned.get((tp.topic, tp.partition))
                if owned is not None:
                    owned.requested = owned.confirmed
            return
        self.stats.commits += 1
        self._confirm(partitions)

    def _confirm(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            owned = self.owned.get((tp.topic, tp.partition))
            if tp.error is not None:
                logger.warning("commit of %s[%d] failed: %s", tp.topic, tp.partition, tp.error)
                if owned is not None:
                    owned.requested = owned.confirmed
                continue
            if owned is not None and tp.offset > owned.confirmed:
                owned.confirmed = tp.offset

    def _prune(self) -> None:
        due = {o.keys: o.confirmed for o in self.owned.values() if o.confirmed > o.pruned and not o.needs_setup}
        if not due or self._outage_since is not None:
            return
        try:
            self.ledger.prune(due)
        except LedgerUnavailable as e:
            logger.warning("pruning the ledger failed, will retry: %s", e)
            return
        for owned in self.owned.values():
            if owned.keys in due:
                owned.pruned = due[owned.keys]

    # -- rebalances -------------------------------------------------------------------------

    def _committed(self, consumer: Any, partitions: list[TopicPartition]) -> list[TopicPartition]:
        for attempt in range(3):
            try:
                return list(consumer.committed(partitions, timeout=10))
            except KafkaException as e:
                logger.warning("reading committed offsets failed (attempt %d): %s", attempt + 1, e)
        raise KafkaUnavailable("cannot read the group's committed offsets for newly assigned partitions")

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._joined = True
        if not partitions:
            (consumer.incremental_assign if self._cooperative else consumer.assign)([])
            return
        committed = self._committed(consumer, partitions)
        group = self.settings.group_id
        keys = [PartitionKeys(group, tp.topic, tp.partition) for tp in committed]
        lanes = {lane_name(group, tp.topic, tp.partition): tp.topic for tp in committed}
        try:
            epochs: list[int] | None = self.ledger.bump_epochs(
                {
                    k: (max(tp.offset, -1), self._epochs.get((tp.topic, tp.partition), 0))
                    for k, tp in zip(keys, committed, strict=True)
                }
            )
            self.ledger.open_lanes(lanes)
        except LedgerUnavailable as e:
            logger.error("%s; newly assigned partitions stay paused until the ledger answers", e)
            if isinstance(e, FatalError):
                self._halt(e)
            epochs = None
        start_list: list[TopicPartition] = []
        now = time.monotonic()
        for i, (tp, pkeys) in enumerate(zip(committed, keys, strict=True)):
            handler = self.handlers[tp.topic]
            start = tp.offset if tp.offset >= 0 else -1
            if start >= 0:
                start_list.append(TopicPartition(tp.topic, tp.partition, start))
            else:
                reset = OFFSET_BEGINNING if handler.offset_reset == "earliest" else OFFSET_END
                start_list.append(TopicPartition(tp.topic, tp.partition, reset))
            lane = lane_name(group, tp.topic, tp.partition)
            owned = Owned(
                topic=tp.topic,
                partition=tp.partition,
                handler=handler,
                keys=pkeys,
                lane=lane,
                state=PartitionState(
                    ordering=handler.ordering,
                    epoch=epochs[i] if epochs else 0,
                    start_offset=start if start >= 0 else None,
                    depth=self.settings.lane_depth,
                ),
                window=handler.window or self.settings.window,
                start_offset=start,
                dead_letter_topic=handler.dead_letter_for(tp.topic),
                stages=handler.ordering != "none" and pipelined(handler.actor.broker),
                needs_setup=epochs is None,
                handover_deadline=now + self.settings.handover_timeout,
                confirmed=start,
                requested=start,
            )
            if epochs is not None:
                handler.actor.broker.declare_queue(lane)
                self._epochs[(tp.topic, tp.partition)] = owned.state.epoch
            self.owned[(tp.topic, tp.partition)] = owned
            if self.probe:
                self.probe.event("assigned", t=tp.topic, p=tp.partition, e=owned.state.epoch, start=start)
            logger.info(
                "assigned %s: epoch %s, starting at %s",
                owned.where,
                owned.state.epoch if epochs else "pending",
                start if start >= 0 else f"{handler.offset_reset} (no committed offset)",
                extra=coordinates(tp.topic, tp.partition),
            )
        (consumer.incremental_assign if self._cooperative else consumer.assign)(start_list)
        if epochs is None:
            consumer.pause([TopicPartition(tp.topic, tp.partition) for tp in committed])
            for tp in committed:
                self.owned[(tp.topic, tp.partition)].paused = True
            if self._outage_since is None:
                self._outage(LedgerUnavailable("ledger unavailable during assignment"), now)
        self.stats.rebalance("assigned")
        for tp in committed:
            run_hooks("assigned", tp.topic, tp.partition, group)

    def _upkeep(self) -> None:
        """Keep the ledger's shared state whole: register the lanes again (workers started after a
        ledger loss must still find them), notice partitions whose epoch the ledger lost or moved
        on, and drop lanes nobody registered for a long time."""
        ready = [o for o in self.owned.values() if not o.needs_setup]
        if not ready:
            return
        self.ledger.open_lanes({o.lane: o.topic for o in ready})
        lost: list[Owned] = []
        for owned, epoch in zip(ready, self.ledger.epochs([o.keys for o in ready]), strict=True):
            if epoch is None:
                lost.append(owned)
            elif epoch > owned.state.epoch and not owned.fenced:
                # A newer owner bumped it: Kafka revokes it from this bridge soon; until then it
                # neither dispatches nor commits it.
                owned.fenced = True
                logger.warning("%s: the ledger shows a newer owner (epoch %d); not dispatching or committing it",
                               owned.where, epoch)
        if lost:
            self._restart(lost)
        self.ledger.forget_lanes(int(RETIRED_PARTITION_TTL * 1000))

    def _restart(self, lost: list[Owned]) -> None:
        """The ledger lost these partitions' state (flushed, restarted without persistence,
        evicted): start a new epoch and dispatch every unfinished record again, after the
        records still running in workers registered themselves again and finished."""
        epochs = self.ledger.bump_epochs({o.keys: (o.confirmed, self._epochs.get(o.key, 0)) for o in lost})
        now = time.monotonic()
        for owned, epoch in zip(lost, epochs, strict=True):
            again = owned.state.restart(epoch)
            self._epochs[owned.key] = epoch
            owned.start_offset = owned.confirmed
            owned.handing_over = True
            owned.waiting_logged = False
            # Workers register their running records again within a heartbeat; wait that long.
            owned.handover_deadline = now + max(self.settings.handover_timeout, self._live)
            owned.handover_after = now + self._live
            logger.error(
                "%s: the ledger lost this partition's state; new epoch %d, dispatching %d unfinished record(s) "
                "again from offset %d",
                owned.where,
                epoch,
                again,
                owned.confirmed,
            )

    def _setup_pending(self, now: float) -> None:
        """Finish assignments made while the ledger was unavailable."""
        pending = [o for o in self.owned.values() if o.needs_setup]
        if not pending:
            return
        epochs = self.ledger.bump_epochs({o.keys: (o.start_offset, self._epochs.get(o.key, 0)) for o in pending})
        self.ledger.open_lanes({o.lane: o.topic for o in pending})
        for owned, epoch in zip(pending, epochs, strict=True):
            owned.state.epoch = self._epochs[owned.key] = epoch
            owned.needs_setup = False
            owned.handover_deadline = now + self.settings.handover_timeout
            owned.handler.actor.broker.declare_queue(owned.lane)
            logger.info("%s: epoch %d", owned.where, epoch)

    def _check_handovers(self, now: float) -> None:
        """Activate newly owned partitions once records of older assignments stopped running
        (ordered modes), with what the ledger knows of their final states."""
        waiting = [
            o for o in self.owned.values() if o.handing_over and not o.needs_setup and now >= o.handover_after
        ]
        if not waiting:
            return
        found = self.ledger.handover(
            {o.keys: (o.state.epoch, o.start_offset) for o in waiting}, self._live
        )
        for owned in waiting:
            ledger = found[owned.keys]
            if owned.handler.ordering != "none" and ledger.running:
                if now < owned.handover_deadline:
                    if not owned.waiting_logged:
                        owned.waiting_logged = True
                        logger.info(
                            "%s: waiting for %d record(s) of an older assignment still running (%s)",
                            owned.where,
                            len(ledger.running),
                            ", ".join(map(str, ledger.running)),
                        )
                    continue
                logger.warning(
                    "%s: records %s of an older assignment still running after %.0fs; starting anyway (a "
                    "copy of them dispatched now waits for them in its worker)",
                    owned.where,
                    ledger.running,
                    self.settings.handover_timeout,
                )
            owned.state.known_done.update(ledger.done)
            self.stats.add("done", owned.topic, owned.state.mark_done(ledger.done))
            # Final failures the older owner recorded but did not dead-letter: settled here, once.
            for offset, detail in sorted(ledger.failed.items()):
                entry = owned.state.entry(offset)
                if entry is None:
                    owned.adopted[offset] = detail
                elif not entry.done and entry.failure is None and not entry.dispatched:
                    owned.state.withdraw(entry)
                    self._fail(owned, entry, now, _reason_of(detail), detail)
            owned.handing_over = False

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        revoked = [o for tp in partitions if (o := self.owned.get((tp.topic, tp.partition))) is not None]
        if self.probe:
            self.probe.point("in-revoke")
        if revoked:
            deadline = time.monotonic() + self.settings.drain_timeout
            try:
                while time.monotonic() < deadline and (
                    any(o.state.dispatched_open for o in revoked) or any(o.failing for o in revoked)
                ):
                    self._drain_round(revoked)
                    time.sleep(0.01)
            except _OUTAGES as e:
                logger.error("revoke: cannot drain without the ledger (%s); committing what is known done", e)
            left = sum(o.state.dispatched_open for o in revoked)
            if left:
                logger.warning(
                    "revoke: %d dispatched records unfinished after %.0fs", left, self.settings.drain_timeout
                )
            self._commit(revoked, asynchronous=False)
            with contextlib.suppress(*_OUTAGES):
                self.ledger.retire([o.keys for o in revoked], RETIRED_PARTITION_TTL)
        for owned in revoked:
            del self.owned[(owned.topic, owned.partition)]
            logger.info("revoked %s: committed %d", owned.where, owned.confirmed,
                        extra=coordinates(owned.topic, owned.partition))
            if self.probe:
                self.probe.event("revoked", t=owned.topic, p=owned.partition, committed=owned.confirmed)
        self.stats.rebalance("revoked")
        for tp in partitions:
            run_hooks("revoked", tp.topic, tp.partition, self.settings.group_id)

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            if self.owned.pop((tp.topic, tp.partition), None) is not None:
                logger.warning("lost %s[%d]: dropped without commit", tp.topic, tp.partition,
                               extra=coordinates(tp.topic, tp.partition))
                if self.probe:
                    self.probe.event("lost", t=tp.topic, p=tp.partition)
            run_hooks("revoked", tp.topic, tp.partition, self.settings.group_id)
        self.stats.rebalance("lost")

    # -- reporting --------------------------------------------------------------------------

    def _end(self, owned: Owned) -> int | None:
        try:
            _, high = self._consumer.get_watermark_offsets(owned.tp, cached=True)
        except KafkaException:
            return None
        return int(high) if high >= 0 else None

    def _views(self, now: float) -> list[PartitionView]:
        """What the metrics, the health checks and the progress summary show of each partition."""
        views = []
        for owned in self.owned.values():
            oldest = owned.state.oldest_unfinished_dispatch()
            views.append(
                PartitionView(
                    topic=owned.topic,
                    partition=owned.partition,
                    committed=owned.confirmed if owned.confirmed >= 0 else None,
                    end=self._end(owned),
                    in_flight=owned.state.open,
                    oldest_unfinished_age=now - oldest if oldest else None,
                    paused=owned.paused,
                )
            )
        return views

    def _publish(self, now: float) -> None:
        """Hand the metrics and health checks a fresh view of the partitions."""
        self._next_publish = now + 0.5
        self.metrics.publish(
            View(tuple(self._views(now)), joined=self._joined, outage_since=self._outage_since,
                 last_poll=self._last_poll)
        )

    def _report(self, now: float) -> None:
        views = self._views(now)
        lag = sum(v.lag or 0 for v in views)
        in_flight = sum(v.in_flight for v in views)
        paused = sum(1 for v in views if v.paused)
        logger.info(self.stats.summary(now, in_flight=in_flight, lag=lag, partitions=len(views), paused=paused))
        wall = self.ledger.time_ms()  # status compares it with the same clock
        entries: dict[str, str] = {}
        for owned, view in zip(self.owned.values(), views, strict=True):
            age = view.oldest_unfinished_age
            entries[f"{owned.topic}|{owned.partition}"] = json.dumps(
                {
                    "owner": self.instance,
                    "epoch": owned.state.epoch,
                    "committed": owned.confirmed,
                    "in_flight": view.in_flight,
                    "dispatched": owned.state.dispatched_open,
                    "oldest_age_s": round(age, 3) if age is not None else None,
                    "lag": view.lag,
                    "paused": view.paused,
                    "updated_ms": wall,
                }
            )
        self.ledger.publish_status(status_key(self.settings.group_id), entries)


def _reason_of(detail: dict[str, Any]) -> str:
    """The dead-letter reason of a recorded final failure."""
    reason = detail.get("reason")
    if isinstance(reason, str):
        return reason
    error_type = (detail.get("error") or {}).get("type")
    return Reason.UNDECODABLE.value if error_type == "DecodeError" else Reason.FINAL_FAILURE.value
