"""The bridge process's loop: poll Kafka, then let each room do its part, then commit.

Everything runs on one thread, the one that calls :meth:`Bridge.run`; the consumer calls the
rebalance and commit callbacks from inside ``consume()`` on that same thread, so partition state
needs no locks. The only cross-thread input is :meth:`Bridge.stop`, a flag; the HTTP server
reads the immutable view the loop publishes.

One round: intake (:mod:`bridge.intake`), operator commands (:mod:`bridge.control`), assignments
and handovers (:mod:`bridge.assignments`), completions (:mod:`bridge.completions`), dead letters
(:mod:`bridge.deadletter`), dispatch (:mod:`bridge.dispatch`), flow control (:mod:`bridge.flow`),
commits (:mod:`bridge.commit`) and reporting (:mod:`bridge.reporting`). When the ledger or the task
broker stops answering, the bridge pauses every partition and keeps polling, so it stays in the
consumer group.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException

from . import lanes
from .assignments import Assignments
from .batching import check_batch_handlers, flush, holding
from .clock import Clock, Every, SystemClock
from .commit import Committer
from .completions import Completions
from .consumer import KafkaConsumer, await_topics, client_error, consumer_config, is_cooperative, take
from .control import Control
from .deadletter import DeadLetterRouter, DeadLetters
from .dispatch import Dispatcher
from .errors import ConfigurationError, FatalError, TaskBrokerUnavailable
from .finishes import Announcements
from .flow import Flow
from .intake import Intake
from .ledger import Ledger, LedgerError, connect
from .metrics import Metrics
from .owned import Owned, Partitions
from .probe import Probe
from .registry import Handler, Registry, registry
from .rejoin import Rejoin, ReplaceableConsumer
from .reporting import Reporting
from .settings import Settings
from .stats import Stats
from .timelag import TimestampReader

logger = logging.getLogger("bridge")

#: Errors after which the bridge pauses, keeps its group membership, and retries with backoff.
_OUTAGES = (*LedgerError, TaskBrokerUnavailable)


class Bridge:
    """Moves records of the handlers' topics from Kafka onto dramatiq lanes, and commits only the
    contiguous prefix of records the ledger shows done."""

    def __init__(
        self,
        settings: Settings,
        handlers: Mapping[str, Handler],
        *,
        ledger: Ledger | None = None,
        consumer_factory: Any = Consumer,
        dead_letters: DeadLetters | None = None,
        clock: Clock | None = None,
        hooks: Registry | None = None,
    ) -> None:
        if not handlers:
            raise ConfigurationError("no Kafka handlers registered")
        check_batch_handlers(settings, handlers)
        self.settings, self.handlers = settings, dict(handlers)
        lanes.check(settings.lanes, self.handlers.values())
        self.clock = clock or SystemClock()
        self.ledger = ledger or Ledger(connect(settings.redis_url))
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self.partitions = Partitions()
        self.stats = Stats()
        self.metrics = Metrics(self.stats)
        self.probe = Probe.from_settings(settings.event_log, settings.crash_at)
        self._stop = threading.Event()
        self._fatal: FatalError | None = None
        self._stop_deadline: float | None = None
        self._last_poll: float | None = None
        self._subscribed = False
        now = self.clock.monotonic
        self.committer = Committer(settings, self.ledger, self.partitions, self.clock, self.stats, self.metrics,
                                   self.probe, self.halt)
        config = consumer_config(settings, on_commit=self.committer.on_commit, error_cb=self._on_error)
        # Secret values are masked by the log output (bridge.logs).
        logger.debug("settings: %s", settings.model_dump(exclude={"kafka"}))
        logger.debug("consumer configuration: %s", {k: v for k, v in config.items() if isinstance(v, str | int)})
        try:
            replaceable = ReplaceableConsumer(consumer_factory, config)
        except KafkaException as e:
            raise ConfigurationError(f"invalid Kafka configuration (BRIDGE_KAFKA / -X): {e.args[0].str()}") from None
        self.consumer: KafkaConsumer = cast(KafkaConsumer, replaceable)
        self.rejoin = Rejoin(replaceable, settings.rejoin_timeout, settings.group_id, self._subscribe)
        self.committer.consumer = self.consumer
        self.flow = Flow(self.consumer, settings, self.partitions)
        self.router = DeadLetterRouter(settings, self.ledger, self.partitions, self.stats, dead_letters)
        self.completions = Completions(self.ledger, self.partitions, self.router, self.stats, self.probe,
                                       Announcements(self.ledger.client))
        self.intake = Intake(settings, self.partitions, self.router, self.stats)
        self.dispatcher = Dispatcher(settings, self.ledger, self.partitions, self.router, self.completions,
                                     self.stats, self.probe)
        self.assignments = Assignments(settings, self.handlers, self.ledger, self.partitions, self.flow,
                                       self.committer, self.router, self.stats, self.probe, hooks or registry,
                                       self.halt, now)
        self.assignments.cooperative = is_cooperative(config)
        self.assignments.drain = self._drain_revoked
        timestamps = TimestampReader(settings, consumer_factory=consumer_factory)
        self.reporting = Reporting(settings, self.ledger, self.consumer, self.partitions, self.stats, self.metrics,
                                   self.instance, timestamps=timestamps)
        self.control = Control(settings, self.ledger, self.partitions, self.router, self.instance)
        self._due = {
            "ping": Every(1.0), "upkeep": Every(settings.lane_refresh_interval), "handover": Every(0.05),
            "redispatch": Every(1.0), "commit": Every(settings.commit_interval),
        }

    # -- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to stop polling, drain, commit and return. Safe from any thread."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def halt(self, error: FatalError) -> None:
        """Stop for good: :meth:`run` raises ``error`` (the first one) once it committed what is
        done, without waiting for records still running."""
        if self._fatal is None:
            self._fatal = error
        self.stop()

    def run(self) -> None:
        """Run until :meth:`stop`; raises a :class:`FatalError` the bridge cannot recover from."""
        try:
            started = False
            try:
                started = self.start()
                while started and not self.stopping:
                    self.poll_once()
            except FatalError as e:
                self.halt(e)
            if started:
                self._shutdown()
        finally:
            self.close()
        if self._fatal is not None:
            raise self._fatal

    def start(self) -> bool:
        """Wait for Kafka, check the topics and join the group (once); False when stopped before
        Kafka answered."""
        if self._subscribed:
            return True
        topics = sorted(self.handlers)
        if not await_topics(self.consumer, topics, self.settings, self._stop.is_set, self._stop.wait):
            return False
        if self.router.producer is None:
            self.router.producer = DeadLetters(self.settings)
        if self.settings.create_dead_letter_topics:
            dead_letter_topics = (t for topic, h in self.handlers.items() if (t := h.dead_letter_for(topic)))
            self.router.producer.ensure_topics(dead_letter_topics)
        logger.info("bridge %s joining group %r on %s for topics %s", self.instance, self.settings.group_id,
                    self.settings.bootstrap_servers, ", ".join(topics))
        self._subscribe()
        self._subscribed = True
        return True

    def _subscribe(self) -> None:
        self.committer.new_client()  # a replaced consumer's commits in flight are never answered
        a = self.assignments
        self.consumer.subscribe(sorted(self.handlers), on_assign=a.on_assign, on_revoke=a.on_revoke, on_lost=a.on_lost)

    def close(self) -> None:
        """Leave the group (revoking what is owned: one more commit) and release the consumer."""
        if self._stop_deadline is None:
            self._stop_deadline = self.clock.monotonic()  # no draining any more
        self.consumer.close()
        self.completions.close()
        self.reporting.close()

    # -- the loop ---------------------------------------------------------------------------

    def poll_once(self) -> None:
        """One round of the loop: poll, then everything the ledger and the task broker allow."""
        busy = self.partitions.dispatched_open() > 0
        for message in take(self.consumer, self.settings.poll_batch, 0.005 if busy else 0.05):
            self.intake.accept(message, self.clock.monotonic())
        now = self._last_poll = self.clock.monotonic()
        self.router.collect()
        self.reporting.publish_view(now, joined=self.assignments.joined, outage_since=self.flow.outage_since,
                                    last_poll=now)
        if (outside_since := self.assignments.outside_since) is not None:
            self.rejoin.check(now, outside_since)
        if not self.flow.may_work(now):
            return
        try:
            if self.flow.outage_since is not None:
                self.ledger.ping()
                self.flow.recovered(now)
                self.committer.ledger_away = False
                self.dispatcher.restart_clocks(now)
            self._work(now)
        except _OUTAGES as e:
            if isinstance(e, FatalError):
                self.halt(e)  # a refused permission: waiting cannot help
            self.flow.outage(e, now)
            self.committer.ledger_away = True

    def _work(self, now: float) -> None:
        """One round of everything that needs the ledger or the task broker."""
        due = self._due
        if not len(self.partitions) and due["ping"].due(now):
            self.ledger.ping()  # nothing owned makes no ledger calls; readiness must still notice an outage
        self.assignments.setup_pending(now)
        self.control.tick(now)
        if due["upkeep"].due(now):
            self.assignments.upkeep()
        if due["handover"].due(now):
            self.assignments.check_handovers(now)
        self.router.settle(now)
        self.completions.read(now)
        if not self.stopping:
            self.dispatcher.dispatch(now)
            if due["redispatch"].due(now):
                self.dispatcher.redispatch(now)
        self.router.send_due(now)
        self.flow.apply_backpressure()
        if due["commit"].due(now):
            self.committer.commit(self.partitions, asynchronous=True)
        self.reporting.tick(now)

    # -- stopping and draining --------------------------------------------------------------

    def drain(self, partitions: list[Owned], deadline: float, *, poll: bool) -> None:
        """Let the dispatched records of ``partitions`` finish and their dead letters be written,
        until ``deadline``, dispatching nothing new; at least one round reads what is done. ``poll``:
        keep polling Kafka meanwhile (a consumer that stops polling is evicted); not from inside a
        rebalance callback. Batch handlers' partitions send their partial batches at once, and those
        are drained too."""
        flushed = flush(partitions)
        try:
            while True:
                now = self.clock.monotonic()
                self.router.collect()
                self.router.settle(now)
                self.completions.read(now, partitions)
                if flushed:
                    self.dispatcher.dispatch(now, flushed)
                self.router.send_due(now)
                if now >= deadline or not any(
                    o.state.dispatched_open or o.letters.failing or holding(o) for o in partitions
                ):
                    return
                if poll:
                    for message in self.consumer.consume(num_messages=self.settings.poll_batch, timeout=0):
                        self.intake.accept(message, now)
                self.clock.sleep(0.01)
        except _OUTAGES as e:
            logger.error("cannot drain without the ledger (%s); committing what is known done", e)

    def _drain_revoked(self, revoked: list[Owned]) -> None:
        now = self.clock.monotonic()
        deadline = self._stop_deadline if self._stop_deadline is not None else now + self.settings.drain_timeout
        self.drain(revoked, deadline, poll=False)
        left = sum(o.state.dispatched_open for o in revoked)
        if left and deadline > now:
            logger.warning("revoke: %d dispatched records unfinished after %.0fs", left, deadline - now)

    def _shutdown(self) -> None:
        """Stop taking records, let dispatched ones finish until the one deadline of a graceful stop
        (``BRIDGE_SHUTDOWN_TIMEOUT``, none after a fatal error), commit what is done."""
        now = self.clock.monotonic()
        self._stop_deadline = now if self._fatal is not None else now + self.settings.shutdown_timeout
        if self._fatal is None:
            logger.info("stopping: draining %d dispatched records", self.partitions.dispatched_open())
        self.flow.pause_all()
        self.drain(list(self.partitions), self._stop_deadline, poll=True)
        left = self.partitions.dispatched_open()
        if left:
            logger.warning("stopping with %d dispatched records unfinished; they will run again", left)
        self.committer.commit(self.partitions, asynchronous=False)
        try:
            self.reporting.progress(self.clock.monotonic())
            self.reporting.publish_status(self.clock.monotonic())
            self.control.leave()
        except _OUTAGES as e:
            logger.warning("could not publish the final status: %s", e)

    def _on_error(self, error: KafkaError) -> None:
        fatal = client_error(error, self.settings)
        if fatal is not None:
            self.halt(fatal)
