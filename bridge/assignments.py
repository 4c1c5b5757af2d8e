"""Assignments: which partitions this bridge owns, under which epoch, and the handovers between
owners.

The consumer calls :meth:`Assignments.on_assign`, :meth:`~Assignments.on_revoke` and
:meth:`~Assignments.on_lost` from inside ``consume`` on the loop's thread. A new owner bumps each
partition's epoch in the ledger (older messages are fenced), and in ordered modes waits for
records of older epochs still running before it dispatches; a revoked partition drains, commits
and retires its ledger keys. Upkeep re-registers lanes and notices a ledger that lost a partition
(a new epoch in place) or shows a newer owner (fenced until Kafka revokes it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaException, TopicPartition

from .batching import BatchState
from .commit import Committer
from .completions import reason_of
from .deadletter import DeadLetterRouter
from .enqueue import hands_over
from .errors import FatalError, KafkaUnavailable, LedgerUnavailable
from .flow import Flow
from .keys import PartitionKeys
from .lanes import lane_of
from .ledger import Ledger, LedgerError
from .ledger.connection import home
from .logs import coordinates
from .owned import TP, Assignment, Marks, Owned, Partitions
from .partition import PartitionState
from .probe import Probe
from .registry import Handler, Registry
from .settings import Settings
from .stats import Stats

logger = logging.getLogger("bridge")

#: Seconds the ledger keeps the keys of a partition nobody owns (a deleted topic or partition);
#: a new owner's epoch bump keeps them for good.
RETIRED_PARTITION_TTL = 7 * 86400

#: Drains the given partitions until the deadline the loop chooses for a revoke.
Drain = Callable[[list[Owned]], None]


class Assignments:
    """Owns the set of partitions. Called from the loop's thread only."""

    def __init__(
        self,
        settings: Settings,
        handlers: dict[str, Handler],
        ledger: Ledger,
        partitions: Partitions,
        flow: Flow,
        committer: Committer,
        router: DeadLetterRouter,
        stats: Stats,
        probe: Probe | None,
        hooks: Registry,
        halt: Callable[[FatalError], None],
        now: Callable[[], float],
    ) -> None:
        self._settings = settings
        self._handlers = handlers
        self._ledger = ledger
        self._partitions = partitions
        self._flow = flow
        self._committer = committer
        self._router = router
        self._stats = stats
        self._probe = probe
        self._hooks = hooks
        self._halt = halt
        self._now = now
        self.cooperative = True
        #: Set by the loop: how a revoke drains before its final commit.
        self.drain: Drain = lambda partitions: None
        #: The bridge received its first assignment (possibly empty).
        self.joined = False
        #: Since when the bridge has been outside the group after losing its assignment (session
        #: timeout, fenced), until its next assignment; None otherwise.
        self.outside_since: float | None = None
        #: The last epoch this bridge knew for each partition, so a new one is always higher.
        self._epochs: dict[TP, int] = {}
        #: The Redis Cluster primary that held each partition's ledger keys at the last look.
        self._homes: dict[TP, str] = {}

    @property
    def _live(self) -> float:
        return 3 * self._settings.heartbeat_interval

    def _lane(self, topic: str, partition: int) -> str:
        settings = self._settings
        return lane_of(settings.group_id, settings.lanes, self._handlers[topic], topic, partition)

    # -- rebalance callbacks ----------------------------------------------------------------

    def on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.joined, self.outside_since = True, None
        assign = consumer.incremental_assign if self.cooperative else consumer.assign
        if not partitions:
            assign([])
            return
        committed = _committed(consumer, partitions)
        group = self._settings.group_id
        keys = [PartitionKeys(group, tp.topic, tp.partition) for tp in committed]
        epochs: list[int] | None
        try:
            known = [self._epochs.get((tp.topic, tp.partition), 0) for tp in committed]
            epochs = self._ledger.bump_epochs(
                {k: (max(tp.offset, -1), e) for k, tp, e in zip(keys, committed, known, strict=True)}
            )
            self._ledger.open_lanes({self._lane(tp.topic, tp.partition): tp.topic for tp in committed})
        except LedgerError as e:
            logger.error("%s; newly assigned partitions stay paused until the ledger answers", e)
            if isinstance(e, FatalError):
                self._halt(e)
            epochs = None
        now = self._now()
        starts: list[TopicPartition] = []
        for i, (tp, pkeys) in enumerate(zip(committed, keys, strict=True)):
            handler = self._handlers[tp.topic]
            start = tp.offset if tp.offset >= 0 else -1
            reset = OFFSET_BEGINNING if handler.offset_reset == "earliest" else OFFSET_END
            starts.append(TopicPartition(tp.topic, tp.partition, start if start >= 0 else reset))
            owned = Owned(
                topic=tp.topic,
                partition=tp.partition,
                handler=handler,
                keys=pkeys,
                lane=self._lane(tp.topic, tp.partition),
                window=handler.window or self._settings.window,
                dead_letter_topic=handler.dead_letter_for(tp.topic),
                stages=handler.ordering != "none" and hands_over(handler.actor.broker) and handler.batch is None,
                state=self._state(handler, epochs[i] if epochs else 0, start if start >= 0 else None),
                start_offset=start,
                assignment=Assignment(
                    needs_setup=epochs is None, handover_deadline=now + self._settings.handover_timeout
                ),
                marks=Marks(confirmed=start, requested=start),
            )
            if epochs is not None:
                handler.actor.broker.declare_queue(owned.lane)
                self._epochs[owned.key] = owned.state.epoch
                self._moved([owned])  # where its keys live now
            self._partitions.add(owned)
            if self._probe:
                self._probe.event("assigned", t=tp.topic, p=tp.partition, e=owned.state.epoch, start=start)
            logger.info(
                "assigned %s: epoch %s, starting at %s",
                owned.where,
                owned.state.epoch if epochs else "pending",
                start if start >= 0 else f"{handler.offset_reset} (no committed offset)",
                extra=coordinates(tp.topic, tp.partition),
            )
        assign(starts)
        if epochs is None:
            for tp in committed:
                owned_now = self._partitions.get(tp.topic, tp.partition)
                assert owned_now is not None
                self._flow.pause(owned_now)
            if self._flow.outage_since is None:
                self._flow.outage(LedgerUnavailable("ledger unavailable during assignment"), now)
        self._stats.rebalance("assigned")
        for tp in committed:
            self._hooks.run_hooks("assigned", tp.topic, tp.partition, group)

    def _state(self, handler: Handler, epoch: int, start: int | None) -> PartitionState:
        if handler.batch is not None:
            return BatchState(options=handler.batch, ordering=handler.ordering, epoch=epoch, start_offset=start,
                              max_bytes=self._settings.max_message_bytes)
        return PartitionState(ordering=handler.ordering, epoch=epoch, start_offset=start,
                              depth=self._settings.lane_depth)

    def on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        revoked = [o for tp in partitions if (o := self._partitions.get(tp.topic, tp.partition)) is not None]
        if self._probe:
            self._probe.point("in-revoke")
        if revoked:
            self.drain(revoked)
            self._committer.commit(revoked, asynchronous=False, in_rebalance=True)
            with contextlib.suppress(*LedgerError):
                self._ledger.retire([o.keys for o in revoked], RETIRED_PARTITION_TTL)
        for owned in revoked:
            self._partitions.remove(owned.key)
            self._homes.pop(owned.key, None)
            logger.info("revoked %s: committed %d", owned.where, owned.marks.confirmed,
                        extra=coordinates(owned.topic, owned.partition))
            if self._probe:
                self._probe.event("revoked", t=owned.topic, p=owned.partition, committed=owned.marks.confirmed)
        self._stats.rebalance("revoked")
        for tp in partitions:
            self._hooks.run_hooks("revoked", tp.topic, tp.partition, self._settings.group_id)

    def on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.outside_since = self._now()  # librdkafka joins again by itself; bridge.rejoin watches that it does
        for tp in partitions:
            if self._partitions.remove((tp.topic, tp.partition)) is not None:
                logger.warning("lost %s[%d]: dropped without commit", tp.topic, tp.partition,
                               extra=coordinates(tp.topic, tp.partition))
                if self._probe:
                    self._probe.event("lost", t=tp.topic, p=tp.partition)
            self._hooks.run_hooks("revoked", tp.topic, tp.partition, self._settings.group_id)
        self._stats.rebalance("lost")

    # -- rounds of the loop -----------------------------------------------------------------

    def setup_pending(self, now: float) -> None:
        """Finish assignments made while the ledger was unavailable."""
        pending = [o for o in self._partitions if o.assignment.needs_setup]
        if not pending:
            return
        epochs = self._ledger.bump_epochs({o.keys: (o.start_offset, self._epochs.get(o.key, 0)) for o in pending})
        self._ledger.open_lanes({o.lane: o.topic for o in pending})
        for owned, epoch in zip(pending, epochs, strict=True):
            owned.state.epoch = self._epochs[owned.key] = epoch
            owned.assignment.needs_setup = False
            owned.assignment.handover_deadline = now + self._settings.handover_timeout
            owned.handler.actor.broker.declare_queue(owned.lane)
            logger.info("%s: epoch %d", owned.where, epoch)

    def check_handovers(self, now: float) -> None:
        """Activate newly owned partitions once records of older assignments stopped running
        (ordered modes), with what the ledger knows of their final states."""
        waiting = [
            o for o in self._partitions
            if o.assignment.handing_over and not o.assignment.needs_setup and now >= o.assignment.handover_after
        ]
        if not waiting:
            return
        found = self._ledger.handover({o.keys: (o.state.epoch, o.start_offset) for o in waiting}, self._live)
        for owned in waiting:
            ledger, assignment = found[owned.keys], owned.assignment
            if owned.handler.ordering != "none" and ledger.running:
                if now < assignment.handover_deadline:
                    if not assignment.waiting_logged:
                        assignment.waiting_logged = True
                        logger.info(
                            "%s: waiting for %d record(s) of an older assignment still running (%s)",
                            owned.where, len(ledger.running), ", ".join(map(str, ledger.running)),
                        )
                    continue
                logger.warning(
                    "%s: records %s of an older assignment still running after %.0fs; starting anyway (a copy of "
                    "them dispatched now waits for them in its worker)",
                    owned.where, ledger.running, self._settings.handover_timeout,
                )
            owned.state.known_done.update(ledger.done)
            self._stats.add("done", owned.topic, owned.state.mark_done(ledger.done))
            # Final failures the older owner recorded but did not dead-letter: settled here, once.
            for offset, detail in sorted(ledger.failed.items()):
                entry = owned.state.entry(offset)
                if entry is None:
                    owned.letters.adopted[offset] = detail
                elif not entry.done and entry.failure is None and not entry.dispatched:
                    owned.state.withdraw(entry)
                    self._router.fail(owned, entry, now, reason_of(detail), detail)
            assignment.handing_over = False

    def upkeep(self) -> None:
        """Keep the ledger's shared state whole: register the lanes again (workers started after a
        ledger loss must still find them), notice partitions whose epoch the ledger lost or moved
        on, and drop lanes nobody registered for a long time."""
        ready = [o for o in self._partitions if not o.assignment.needs_setup]
        if not ready:
            return
        self._ledger.open_lanes({o.lane: o.topic for o in ready})
        lost: list[Owned] = []
        for owned, epoch in zip(ready, self._ledger.epochs([o.keys for o in ready]), strict=True):
            # Lower than ours: a failover lost the last writes before they reached a replica.
            if epoch is None or epoch < owned.state.epoch:
                lost.append(owned)
            elif epoch > owned.state.epoch and not owned.assignment.fenced:
                # A newer owner bumped it: Kafka revokes it from this bridge soon; until then it
                # neither dispatches nor commits it.
                owned.assignment.fenced = True
                logger.warning("%s: the ledger shows a newer owner (epoch %d); not dispatching or committing it",
                               owned.where, epoch)
        moved = {o: where for o, where in self._moved(ready).items() if o not in lost}
        if lost:
            self._restart(lost, "the ledger lost this partition's state")
        for owned, where in moved.items():
            self._restart([owned], f"its ledger keys moved to another Redis primary ({where}: a failover, which "
                                   "may have lost the last writes)")
        self._ledger.forget_lanes(RETIRED_PARTITION_TTL * 1000)

    def _moved(self, owned: list[Owned]) -> dict[Owned, str]:
        """Partitions whose ledger keys another Redis Cluster primary holds since the last look
        ("old -> new"). Replication is asynchronous, so a failover may have lost facts workers
        acted on: the partition restarts like a wiped one, and what runs again runs under a new epoch."""
        moved = {}
        for o in owned:
            now_at = home(self._ledger.client, o.keys.epoch)
            if now_at is None:
                continue
            before, self._homes[o.key] = self._homes.get(o.key), now_at
            if before is not None and before != now_at:
                moved[o] = f"{before} -> {now_at}"
        return moved

    def _restart(self, lost: list[Owned], why: str) -> None:
        """The ledger lost these partitions' state (flushed, restarted without persistence,
        evicted, failed over): start a new epoch and dispatch every unfinished record again, after
        the records still running in workers registered themselves again and finished."""
        epochs = self._ledger.bump_epochs({o.keys: (o.marks.confirmed, self._epochs.get(o.key, 0)) for o in lost})
        now = self._now()
        for owned, epoch in zip(lost, epochs, strict=True):
            again = owned.state.restart(epoch)
            self._epochs[owned.key] = epoch
            owned.start_offset = owned.marks.confirmed
            # Workers register their running records again within a heartbeat; wait that long.
            owned.assignment = Assignment(
                handover_deadline=now + max(self._settings.handover_timeout, self._live),
                handover_after=now + self._live,
            )
            logger.error(
                "%s: %s; new epoch %d, dispatching %d unfinished record(s) again from offset %d",
                owned.where, why, epoch, again, owned.marks.confirmed,
            )


def _committed(consumer: Any, partitions: list[TopicPartition]) -> list[TopicPartition]:
    for attempt in range(3):
        try:
            return list(consumer.committed(partitions, timeout=10))
        except KafkaException as e:
            logger.warning("reading committed offsets failed (attempt %d): %s", attempt + 1, e)
    raise KafkaUnavailable("cannot read the group's committed offsets for newly assigned partitions")
