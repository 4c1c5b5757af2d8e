"""Dispatch: records from their partition's window onto their lanes, and again when lost.

Each round takes what the ordering mode allows, fails records too large for the task broker (in
the ledger first, so that their successors start at once), stages the records that wait for an
unfinished predecessor (pipelined ordered lanes on the Redis broker) and enqueues the rest: one
ledger round trip and one pipeline per broker for each chunk of ``BRIDGE_ENQUEUE_BATCH``.
Re-dispatch looks at records that showed no progress for ``BRIDGE_REDISPATCH_TIMEOUT``, for every
partition in one round trip; the ledger gives up the ones whose workers kept dying (:mod:`bridge.stuck`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import dramatiq

from . import protocol
from .batch_messages import batch_message, chunks, runs, take
from .batching import BatchState
from .completions import Completions
from .deadletter import DeadLetterRouter
from .enqueue import enqueue_many
from .errors import LedgerUnavailable, PartialDispatch
from .keys import PartitionKeys
from .ledger import Ledger, LedgerError
from .owned import Owned, Partitions
from .partition import Entry
from .probe import Probe
from .protocol import OPTION, Meta, Reason, staged_value
from .settings import Settings
from .stats import Stats
from .stuck import give_up

logger = logging.getLogger("bridge")

#: A record to put on its lane: its partition, the record, and the copy's attempt number.
Send = tuple[Owned, Entry, int]

#: How many records a re-dispatch summary names.
_NAMED = 10


class Dispatcher:
    """Puts records on their lanes. Called from the loop's thread only."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        partitions: Partitions,
        router: DeadLetterRouter,
        completions: Completions,
        stats: Stats,
        probe: Probe | None,
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._partitions = partitions
        self._router = router
        self._completions = completions
        self._stats = stats
        self._probe = probe

    @property
    def _live(self) -> float:
        """How recent a worker's sign of life must be (three heartbeats, as the workers judge it)."""
        return 3 * self._settings.heartbeat_interval

    def dispatch(self, now: float, only: Iterable[Owned] | None = None) -> None:
        """Dispatch what the windows and ``BRIDGE_MAX_IN_FLIGHT`` allow (of ``only`` when given).

        Raises:
          LedgerUnavailable, TaskBrokerUnavailable: records not surely on their lanes are put back
          in front of their partition, to go out again after the outage.
        """
        room = self._settings.max_in_flight - self._partitions.dispatched_open()
        limit = self._settings.max_message_bytes
        batch: list[Send] = []
        refused: list[tuple[Owned, Entry, dict[str, Any]]] = []
        taken_all: list[tuple[Owned, Entry]] = []
        for owned, taken in take(only if only is not None else self._partitions, room, now):
            for entry in taken:
                taken_all.append((owned, entry))
                if entry.size > limit:
                    message = f"{entry.size} bytes exceed BRIDGE_MAX_MESSAGE_BYTES ({limit})"
                    detail = {"error": {"type": "RecordTooLarge", "message": message}, "attempts": 0,
                              "reason": Reason.TOO_LARGE.value}
                    refused.append((owned, entry, detail))
                else:
                    batch.append((owned, entry, 1))
        if refused:
            try:
                self._ledger.fail(_by_keys((o.keys, (e.offset, o.state.epoch, d)) for o, e, d in refused))
            except LedgerError:
                for owned, entry in reversed(taken_all):
                    owned.state.undispatch(entry)
                raise
            for owned, entry, detail in refused:
                self._router.fail(owned, entry, now, Reason.TOO_LARGE.value, detail)
        try:
            self.enqueue(batch)
        except PartialDispatch as e:
            self._count(batch[: e.sent])
            for owned, entry, _ in reversed(batch[e.sent :]):
                owned.state.undispatch(entry)
            raise e.cause from None
        self._count(batch)

    def redispatch(self, now: float) -> None:
        """Dispatch again records that show no sign of life for the re-dispatch timeout.

        Raises:
          LedgerUnavailable, TaskBrokerUnavailable.
        """
        timeout = self._settings.redispatch_timeout
        candidates: dict[PartitionKeys, tuple[Owned, list[Entry]]] = {}
        for owned in self._partitions:
            if not owned.active:
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
        limits = {k: (o.handler.max_redispatches, o.state.epoch) for k, (o, _) in candidates.items()}
        answers = self._ledger.stale({k: [e.offset for e in found] for k, (_, found) in candidates.items()}, timeout,
                                     limits, self._live)
        again: list[Send] = []
        successors: list[Send] = []
        for keys, answer in answers.items():
            owned, found = candidates[keys]
            for entry in found:
                entry.checked_at = now
            self._completions.apply(owned, answer.progress, now)
            for entry in found:
                if entry.offset in answer.stuck:
                    successors += [(owned, s, 1) for s in give_up(self._router, owned, entry,
                                                                  answer.stuck[entry.offset], now)]
                    continue
                attempt = answer.again.get(entry.offset)
                if attempt is not None and not entry.done and entry.failure is None:
                    if isinstance(owned.state, BatchState):
                        # The whole batch goes again, its copies registered under this record.
                        again.extend((owned, e, attempt) for e in owned.state.rebatch(entry))
                    else:
                        again.append((owned, entry, attempt))
        if successors:
            try:
                self.enqueue(successors)
            except PartialDispatch as e:
                raise e.cause from None
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
            self.enqueue(again)
        except PartialDispatch as e:
            raise e.cause from None
        for owned, _, _ in again:
            self._stats.add("redispatched", owned.topic)

    def restart_clocks(self, now: float) -> None:
        """Time spent in an outage is no sign of a lost message."""
        for owned in self._partitions:
            for entry in owned.state.dispatched_unfinished():
                entry.checked_at = now

    def enqueue(self, batch: list[Send]) -> None:
        """Put ``batch`` on its lanes (or stage records behind their predecessors) in order.

        Raises:
          PartialDispatch: with how many records are surely out.
        """
        for start, end in chunks(batch, self._settings.enqueue_batch):
            part = batch[start:end]
            try:
                lane = self._stage(part)
            except LedgerUnavailable as e:
                raise PartialDispatch(start, e) from e
            by_broker: dict[int, list[int]] = {}
            for i in lane:
                by_broker.setdefault(id(part[i][0].handler.actor.broker), []).append(i)
            for indexes in by_broker.values():
                broker = part[indexes[0]][0].handler.actor.broker
                sends = [part[i] for i in indexes]
                try:
                    enqueue_many(broker, [self._message(sends[a:b]) for a, b in runs(sends)])
                except PartialDispatch as e:
                    raise PartialDispatch(start, e.cause) from e
            if self._probe:
                for owned, entry, attempt in part:
                    self._probe.event(
                        "dispatched", t=owned.topic, p=owned.partition, o=entry.offset, e=owned.state.epoch, a=attempt
                    )
                    self._probe.point("after-enqueue")

    def message(self, owned: Owned, entry: Entry, attempt: int) -> dramatiq.Message[Any]:
        """The dramatiq message of one copy of a record."""
        meta = Meta(
            group=self._settings.group_id,
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

    def _message(self, sends: list[Send]) -> dramatiq.Message[Any]:
        owned, entry, attempt = sends[0]
        if owned.handler.batch is None:
            return self.message(owned, entry, attempt)
        return batch_message(self._settings.group_id, sends)

    def _count(self, batch: list[Send]) -> None:
        for owned, _, _ in batch:
            self._stats.add("dispatched", owned.topic)
        for start, end in runs(batch):
            owned = batch[start][0]
            if owned.handler.batch is not None:
                self._stats.batch(owned.topic, end - start)

    def _stage(self, part: list[Send]) -> list[int]:
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
        epochs: dict[PartitionKeys, int] = {}
        for keys, indexes in staged.items():
            pairs[keys] = []
            for i in indexes:
                owned, entry, attempt = part[i]
                message = self.message(owned, entry, attempt)
                body = message.copy(options={"redis_message_id": message.message_id}).encode()
                pairs[keys].append((entry.prev, staged_value(entry.offset, owned.state.epoch, attempt, body)))
                epochs[keys] = owned.state.epoch
        late = self._ledger.stage(epochs, pairs, self._live)
        for keys, indexes in late.items():
            lane.extend(staged[keys][j] for j in indexes)
        return sorted(lane)


Failure = tuple[int, int, dict[str, Any]]


def _by_keys(items: Iterable[tuple[PartitionKeys, Failure]]) -> dict[PartitionKeys, list[Failure]]:
    grouped: dict[PartitionKeys, list[Failure]] = {}
    for keys, item in items:
        grouped.setdefault(keys, []).append(item)
    return grouped
