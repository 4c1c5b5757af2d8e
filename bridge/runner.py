"""The bridge process: poll Kafka, dispatch records onto lanes, read the ledger, commit.

Everything runs on one thread, the one that calls :meth:`Bridge.run`; rebalance callbacks are
invoked by the consumer from inside ``consume()`` on that same thread, so partition state needs
no locks. The only cross-thread input is :meth:`Bridge.stop`, a flag.
"""

from __future__ import annotations

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

from .consumer import consumer_config, is_cooperative
from .errors import FatalError
from .handlers import Handler, run_hooks
from .keys import PartitionKeys, lane_name, status_key
from .ledger import Ledger, Progress, connect
from .middleware import OPTION
from .partition import PartitionState
from .record import envelope
from .settings import Settings
from .stats import Stats

logger = logging.getLogger("bridge")

TP = tuple[str, int]


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
    handing_over: bool = False
    waiting_logged: bool = False
    handover_deadline: float = 0.0
    paused: bool = False
    confirmed: int = -1
    requested: int = -1
    pruned: int = -1
    assigned_at: float = field(default_factory=time.monotonic)

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

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
    ) -> None:
        if not handlers:
            raise FatalError("no Kafka handlers registered")
        self.settings = settings
        self.handlers = dict(handlers)
        self.ledger = ledger or Ledger(connect(settings.redis_url))
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self.owned: dict[TP, Owned] = {}
        self.stats = Stats()
        self._consumer_factory = consumer_factory
        self._consumer: Any = None
        self._cooperative = True
        self._stop = threading.Event()
        self._next_commit = 0.0
        self._next_progress = 0.0
        self._next_handover_check = 0.0

    # -- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to stop polling, drain, commit and return. Safe from any thread."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        config = consumer_config(
            self.settings,
            on_commit=self._on_commit,
            error_cb=self._on_error,
        )
        self._cooperative = is_cooperative(config)
        self._consumer = self._consumer_factory(config)
        topics = sorted(self.handlers)
        logger.info(
            "bridge %s joining group %r on %s for topics %s",
            self.instance,
            self.settings.group_id,
            self.settings.bootstrap_servers,
            ", ".join(topics),
        )
        self._consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        try:
            while not self._stop.is_set():
                self._tick()
            self._shutdown()
        finally:
            self._consumer.close()
            self._consumer = None

    def _tick(self) -> None:
        busy = any(o.state.dispatched_open for o in self.owned.values())
        timeout = 0.005 if busy else 0.05
        messages = self._consumer.consume(num_messages=self.settings.poll_batch, timeout=timeout)
        for message in messages:
            self._accept(message)
        now = time.monotonic()
        if now >= self._next_handover_check:
            self._check_handovers(now)
            self._next_handover_check = now + 0.05
        self._read_ledger()
        if not self._stop.is_set():
            self._dispatch(now)
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
        for owned in self.owned.values():
            if not owned.paused:
                self._consumer.pause([owned.tp])
                owned.paused = True
        deadline = time.monotonic() + self.settings.shutdown_timeout
        while self._dispatched_open() and time.monotonic() < deadline:
            # Keep polling: a consumer that stops polling is evicted from the group.
            for message in self._consumer.consume(num_messages=self.settings.poll_batch, timeout=0.01):
                self._accept(message)
            self._read_ledger()
        left = self._dispatched_open()
        if left:
            logger.warning("stopping with %d dispatched records unfinished; they will run again", left)
        self._commit(list(self.owned.values()), asynchronous=False)
        self._report(time.monotonic())

    def _dispatched_open(self) -> int:
        return sum(o.state.dispatched_open for o in self.owned.values())

    # -- intake -----------------------------------------------------------------------------

    def _accept(self, message: Any) -> None:
        error = message.error()
        if error is not None:
            self._on_consume_error(message, error)
            return
        owned = self.owned.get((message.topic(), message.partition()))
        if owned is None:
            return
        ts_type, ts = message.timestamp()
        owned.state.deliver(
            message.offset(),
            message.key(),
            envelope(
                owned.topic,
                owned.partition,
                message.offset(),
                message.key(),
                message.value(),
                message.headers(),
                ts if ts_type else None,
            ),
        )
        self.stats.delivered += 1

    def _on_consume_error(self, message: Any, error: KafkaError) -> None:
        where = f"{message.topic()}[{message.partition()}]" if message.topic() else "consumer"
        if error.code() == KafkaError._AUTO_OFFSET_RESET:
            raise FatalError(
                f"{where}: the committed offset is out of range ({error.str()}); the bridge does not "
                "reset offsets silently. Inspect the group and reset it explicitly."
            )
        if error.fatal():
            raise FatalError(f"{where}: fatal Kafka error: {error.str()}")
        if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            logger.error("%s: topic does not exist (%s); waiting for it", where, error.str())
            return
        logger.warning("%s: %s", where, error.str())

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            logger.critical("fatal Kafka error: %s", error.str())
            self.stop()
        else:
            logger.warning("Kafka: %s", error.str())

    # -- dispatch ---------------------------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        room = self.settings.max_in_flight - sum(o.state.dispatched_open for o in self.owned.values())
        for owned in self.owned.values():
            if room <= 0:
                return
            if owned.handing_over or not owned.state.has_ready():
                continue
            for entry in owned.state.take_ready(room, now):
                message: dramatiq.Message[Any] = dramatiq.Message(
                    queue_name=owned.lane,
                    actor_name=owned.handler.actor.actor_name,
                    args=(entry.payload,),
                    kwargs={},
                    options={
                        OPTION: {
                            "g": self.settings.group_id,
                            "t": owned.topic,
                            "p": owned.partition,
                            "o": entry.offset,
                            "e": owned.state.epoch,
                        }
                    },
                )
                owned.handler.actor.broker.enqueue(message)
                entry.payload = None
                room -= 1
                self.stats.dispatched += 1

    def _apply_backpressure(self) -> None:
        total = sum(o.state.open for o in self.owned.values())
        over_total = total >= self.settings.max_in_flight
        for owned in self.owned.values():
            want = over_total or owned.state.open >= owned.window
            if want != owned.paused:
                (self._consumer.pause if want else self._consumer.resume)([owned.tp])
                owned.paused = want

    # -- ledger -----------------------------------------------------------------------------

    def _read_ledger(self, only: list[Owned] | None = None) -> None:
        spans: dict[PartitionKeys, tuple[int, int]] = {}
        by_keys: dict[PartitionKeys, Owned] = {}
        for owned in only if only is not None else self.owned.values():
            if not owned.state.dispatched_open:
                continue
            span = owned.state.unfinished_span()
            if span is not None:
                spans[owned.keys] = span
                by_keys[owned.keys] = owned
        if not spans:
            return
        for keys, progress in self.ledger.progress(spans).items():
            self._apply_progress(by_keys[keys], progress)

    def _apply_progress(self, owned: Owned, progress: Progress) -> None:
        self.stats.done += owned.state.mark_done(progress.done)
        if progress.failed:
            for offset, detail in sorted(progress.failed.items()):
                error = detail.get("error") or {}
                logger.error(
                    "%s@%d: final failure in %s after %s attempt(s): %s: %s; advancing past it",
                    owned.where,
                    offset,
                    detail.get("actor", owned.handler.name),
                    detail.get("attempts", "?"),
                    error.get("type"),
                    error.get("message"),
                )
            self.ledger.settle(owned.keys, progress.failed)
            new = owned.state.mark_done(progress.failed)
            self.stats.done += new
            self.stats.failed += new

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
        if not offsets:
            self._prune()
            return
        try:
            result = self._consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except KafkaException as e:
            for owned in partitions:
                owned.requested = owned.confirmed
            logger.warning("commit failed, will retry: %s", e)
            return
        if not asynchronous and result:
            self._confirm(result)
        self._prune()

    def _commit_target(self, owned: Owned) -> int | None:
        target = owned.state.committable()
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
        if error is not None:
            logger.warning("commit failed, will retry: %s", error.str())
            for tp in partitions:
                owned = self.owned.get((tp.topic, tp.partition))
                if owned is not None:
                    owned.requested = owned.confirmed
            return
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
                self.stats.commits += 1

    def _prune(self) -> None:
        due = {o.keys: o.confirmed for o in self.owned.values() if o.confirmed > o.pruned}
        if not due:
            return
        self.ledger.prune(due)
        for owned in self.owned.values():
            if owned.keys in due:
                owned.pruned = due[owned.keys]

    # -- rebalances -------------------------------------------------------------------------

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if not partitions:
            if self._cooperative:
                consumer.incremental_assign([])
            else:
                consumer.assign([])
            return
        committed = consumer.committed(partitions, timeout=30)
        keys = [PartitionKeys(self.settings.group_id, tp.topic, tp.partition) for tp in committed]
        epochs = self.ledger.bump_epochs(keys)
        lanes = {lane_name(self.settings.group_id, tp.topic, tp.partition): tp.topic for tp in committed}
        self.ledger.open_lanes(lanes)
        start_list: list[TopicPartition] = []
        now = time.monotonic()
        for tp, pkeys, epoch in zip(committed, keys, epochs, strict=True):
            handler = self.handlers[tp.topic]
            if tp.offset >= 0:
                start = tp.offset
                start_list.append(TopicPartition(tp.topic, tp.partition, tp.offset))
            else:
                start = -1
                reset = OFFSET_BEGINNING if handler.offset_reset == "earliest" else OFFSET_END
                start_list.append(TopicPartition(tp.topic, tp.partition, reset))
            lane = lane_name(self.settings.group_id, tp.topic, tp.partition)
            handler.actor.broker.declare_queue(lane)
            owned = Owned(
                topic=tp.topic,
                partition=tp.partition,
                handler=handler,
                keys=pkeys,
                lane=lane,
                state=PartitionState(
                    ordering=handler.ordering, epoch=epoch, start_offset=start if start >= 0 else None
                ),
                window=handler.window or self.settings.window,
                start_offset=start,
                confirmed=start,
                requested=start,
                pruned=-1,
            )
            owned.handing_over = True
            owned.handover_deadline = now + self.settings.handover_timeout
            self.owned[(tp.topic, tp.partition)] = owned
            logger.info(
                "assigned %s: epoch %d, starting at %s",
                owned.where,
                epoch,
                start if start >= 0 else f"{handler.offset_reset} (no committed offset)",
            )
        if self._cooperative:
            consumer.incremental_assign(start_list)
        else:
            consumer.assign(start_list)
        self.stats.rebalances += 1
        self._check_handovers(now)
        for tp in committed:
            run_hooks("assigned", tp.topic, tp.partition, self.settings.group_id)

    def _check_handovers(self, now: float) -> None:
        """Activate newly owned partitions once records of older assignments stopped running."""
        for owned in self.owned.values():
            if not owned.handing_over:
                continue
            if owned.handler.ordering != "none":
                running = self.ledger.running(owned.keys)
                older = {o: r for o, r in running.items() if int(r.get("e", 0)) < owned.state.epoch}
                if older and now < owned.handover_deadline:
                    if not owned.waiting_logged:
                        owned.waiting_logged = True
                        logger.info(
                            "%s: waiting for %d record(s) of an older assignment still running (%s)",
                            owned.where,
                            len(older),
                            ", ".join(map(str, sorted(older))),
                        )
                    continue
                if older:
                    logger.warning(
                        "%s: records %s of an older assignment still running after %.0fs; starting anyway",
                        owned.where,
                        sorted(older),
                        self.settings.handover_timeout,
                    )
            done = self.ledger.done_from(owned.keys, max(owned.start_offset, 0))
            owned.state.known_done.update(done)
            self.stats.done += owned.state.mark_done(done)
            owned.handing_over = False

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        revoked = [o for tp in partitions if (o := self.owned.get((tp.topic, tp.partition))) is not None]
        if revoked:
            deadline = time.monotonic() + self.settings.drain_timeout
            while any(o.state.dispatched_open for o in revoked) and time.monotonic() < deadline:
                self._read_ledger(revoked)
                time.sleep(0.01)
            left = sum(o.state.dispatched_open for o in revoked)
            if left:
                logger.warning(
                    "revoke: %d dispatched records unfinished after %.0fs", left, self.settings.drain_timeout
                )
            self._commit(revoked, asynchronous=False)
        for owned in revoked:
            del self.owned[(owned.topic, owned.partition)]
            logger.info("revoked %s: committed %d", owned.where, owned.confirmed)
        self.stats.rebalances += 1
        for tp in partitions:
            run_hooks("revoked", tp.topic, tp.partition, self.settings.group_id)

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            if self.owned.pop((tp.topic, tp.partition), None) is not None:
                logger.warning("lost %s[%d]: dropped without commit", tp.topic, tp.partition)
            run_hooks("revoked", tp.topic, tp.partition, self.settings.group_id)
        self.stats.rebalances += 1

    # -- reporting --------------------------------------------------------------------------

    def _lag(self, owned: Owned) -> int | None:
        try:
            _, high = self._consumer.get_watermark_offsets(owned.tp, cached=True)
        except KafkaException:
            return None
        if high < 0:
            return None
        return max(int(high) - max(owned.confirmed, 0), 0)

    def _report(self, now: float) -> None:
        lags = [self._lag(o) for o in self.owned.values()]
        lag = sum(v for v in lags if v is not None)
        in_flight = sum(o.state.open for o in self.owned.values())
        paused = sum(1 for o in self.owned.values() if o.paused)
        logger.info(self.stats.summary(now, in_flight=in_flight, lag=lag, partitions=len(self.owned), paused=paused))
        wall = int(time.time() * 1000)
        entries: dict[str, str] = {}
        for owned, lag_value in zip(self.owned.values(), lags, strict=True):
            oldest = owned.state.oldest_unfinished_dispatch()
            entries[f"{owned.topic}|{owned.partition}"] = json.dumps(
                {
                    "owner": self.instance,
                    "epoch": owned.state.epoch,
                    "committed": owned.confirmed,
                    "in_flight": owned.state.open,
                    "dispatched": owned.state.dispatched_open,
                    "oldest_age_s": round(now - oldest, 3) if oldest else None,
                    "lag": lag_value,
                    "paused": owned.paused,
                    "updated_ms": wall,
                }
            )
        self.ledger.publish_status(status_key(self.settings.group_id), entries)
