"""Records that hold their partition: the view of them, the warning about them, and giving up
records whose workers keep dying.

A partition's commit waits for its oldest unfinished record. While later records wait behind it
(ordered modes) or are done already (the commit cannot pass it), that record *holds* the
partition: its offset and age go to the metrics and ``status``, and one WARNING names it once its
age crosses ``BRIDGE_STUCK_AFTER``. A record whose worker died while running it more often than its
handler's ``max_redispatches`` allows is given up by the ledger (``stale.lua``) as a final failure
with reason ``stuck``; :func:`give_up` routes it to the dead-letter topic here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from .batching import BatchState
from .deadletter import DeadLetterRouter
from .ledger import Stuck
from .logs import coordinates
from .metrics import PartitionView
from .owned import TP, Owned
from .partition import Entry
from .protocol import Reason

logger = logging.getLogger("bridge")


@dataclass(frozen=True, slots=True)
class Holding:
    """The record that holds its partition: its offset, and for how many seconds it has (since it
    was dispatched, or since it became the oldest unfinished record if that came later)."""

    offset: int
    age: float


class Holders:
    """The record holding each partition. Called from the loop's thread only."""

    def __init__(self) -> None:
        #: Per partition: its oldest unfinished record, and since when it has been that.
        self._heads: dict[TP, tuple[int, float]] = {}

    def see(self, owned: Owned, now: float) -> Holding | None:
        """The record holding ``owned`` now, or None: its oldest unfinished record, dispatched, with
        a later record delivered behind it (waiting, or done but not committable past it)."""
        state = owned.state
        head, last = state.head(), state.last_delivered
        if head is None:
            self._heads.pop(owned.key, None)
            return None
        known = self._heads.get(owned.key)
        if known is None or known[0] != head.offset:
            known = self._heads[owned.key] = (head.offset, now)
        if not head.dispatched or last is None or last <= head.offset:
            return None
        return Holding(head.offset, max(now - max(known[1], head.dispatched_at), 0.0))

    def forget(self, keep: Iterable[TP]) -> None:
        """Drop partitions no longer owned."""
        kept = set(keep)
        for key in [k for k in self._heads if k not in kept]:
            del self._heads[key]


def give_up(router: DeadLetterRouter, owned: Owned, entry: Entry, stuck: Stuck, now: float) -> list[Entry]:
    """Route a record the ledger gave up as stuck to the dead-letter topic (with a batch handler,
    every record of its batch: they died together); the records staged behind it, to put on their
    lane now (their predecessor will not hand them over any more)."""
    if entry.done or entry.failure is not None:
        return []
    state = owned.state
    for member in (state.batch_of(entry) if isinstance(state, BatchState) else None) or [entry]:
        router.fail(owned, member, now, Reason.STUCK.value, stuck.detail)
    successor = state.entry(stuck.successor) if stuck.successor is not None else None
    if successor is None or successor.done or successor.released or not successor.dispatched:
        return []
    return (state.batch_of(successor) if isinstance(state, BatchState) else None) or [successor]


class StuckWarnings:
    """One WARNING per record whose hold on its partition lasted ``after`` seconds (0: none).
    Called from the loop's thread only."""

    def __init__(self, after: float) -> None:
        self._after = after
        self._warned: dict[TP, int] = {}

    def check(self, views: Iterable[PartitionView]) -> None:
        if self._after <= 0:
            return
        warned: dict[TP, int] = {}
        for view in views:
            key = (view.topic, view.partition)
            offset, age, before = view.holding_offset, view.holding_age, self._warned.get(key)
            if offset is None or offset == before:
                if before is not None:
                    warned[key] = before  # the same record may hold the partition again
                continue
            if age is None or age < self._after:
                continue
            warned[key] = offset
            logger.warning(
                "%s[%d]@%d has held its partition for %.0fs (BRIDGE_STUCK_AFTER=%gs): %d record(s) of it unfinished "
                "and nothing committed past it; `kafka-dramatiq-bridge status` shows it, the worker log shows why",
                view.topic, view.partition, offset, age, self._after, view.in_flight,
                extra=coordinates(view.topic, view.partition, offset),
            )
        self._warned = warned
