"""Batch handlers in the bridge: how a partition's delivered records become batch messages.

A batch handler's partition keeps its records in a :class:`BatchState`. A batch is taken when it
is full (``batch_size`` records, or as many as fit under ``BRIDGE_MAX_MESSAGE_BYTES``), when its
oldest record has waited ``batch_timeout``, or at once while the partition is flushed (revoke,
shutdown). In ``partition`` and ``key`` order a partition (with ``batch_by="key"``: a key) has at
most one batch dispatched and unfinished, so batch n+1 starts only after batch n reached a final
state; in ``none`` order batches of a partition run side by side, up to its window. Records stay
individual entries, so done facts, dead letters and the commit work per record; a batch is the
run of entries that share a ``lead`` (the batch's first offset, under which its copies are
registered in the ledger).

With ``batch_by="topic"`` each partition still cuts its own batches (its *parts*) under those
rules, but the size and the timeout count over the topic: :func:`take` joins the parts of the
topic's partitions into one message once they hold ``batch_size`` records together, or the
oldest of them waited ``batch_timeout``. A part is settled in the ledger as one batch of its
partition, so ordering and the commit stay per partition.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError
from .partition import _WHOLE_PARTITION, Entry, PartitionState, _settled
from .registry import BatchOptions, Handler, Ordering
from .settings import Settings

if TYPE_CHECKING:
    from .owned import Owned

#: Bytes a batch message takes besides its records (metadata, dramatiq's fields), with room.
MESSAGE_OVERHEAD = 1024
#: Bytes a record envelope takes besides its base64 strings (field names, numbers, topic).
RECORD_OVERHEAD = 96


def encoded_size(payload: Mapping[str, Any]) -> int:
    """Bytes of a record envelope in a batch message, from its (base64) strings."""
    size = RECORD_OVERHEAD + len(payload["t"]) + len(payload.get("k") or "") + len(payload.get("v") or "")
    for name, value in payload.get("h") or ():
        size += 8 + 2 * len(name) + len(value or "")  # header names may need JSON escapes
    return size


class BatchState(PartitionState):
    """The delivery window of a batch handler's partition (see the module docstring)."""

    def __init__(
        self,
        *,
        options: BatchOptions,
        ordering: Ordering,
        epoch: int,
        max_bytes: int,
        start_offset: int | None = None,
        known_done: Sequence[int] = (),
    ) -> None:
        super().__init__(ordering=ordering, epoch=epoch, start_offset=start_offset, known_done=known_done, depth=1)
        self.options = options
        self.max_bytes = max_bytes
        #: Send partial batches at once (revoke, shutdown).
        self.flushing = False
        #: Batches dispatched, by lead; entries leave as they reach a final state.
        self._batches: dict[int, list[Entry]] = {}

    def group_of(self, key: bytes | None) -> Hashable:
        return key if self.options.by == "key" else _WHOLE_PARTITION

    # -- taking batches ---------------------------------------------------------------------

    def _waits(self, first: Entry, available: int, now: float) -> bool:
        """A partial batch waits for more records until its oldest one waited the timeout."""
        return self.waits((available, first.delivered_at), now)

    def _cut(self, source: deque[Entry], limit: int, used: int = MESSAGE_OVERHEAD) -> tuple[list[Entry], int]:
        """Take the next batch from the front of ``source``: at most ``limit`` records, within the
        size limit of a message that holds ``used`` bytes already. A record too large for any
        message goes alone (the dispatcher fails it), and stops a batch before it. Returns the
        batch and the bytes the message holds with it."""
        batch: list[Entry] = []
        size = used
        while source and len(batch) < limit:
            entry = source[0]
            if entry.done or entry.released:
                source.popleft()
                continue
            grown = size + encoded_size(entry.payload)
            if (batch or used > MESSAGE_OVERHEAD) and (entry.size > self.max_bytes or grown > self.max_bytes):
                break
            batch.append(source.popleft())
            size = grown
            if entry.size > self.max_bytes:
                break
        for entry in batch:
            entry.prev, entry.lead, entry.joint = -1, batch[0].offset, -1
        if batch:
            self._batches[batch[0].offset] = list(batch)
        return batch, size

    def _mark(self, taken: list[Entry], now: float) -> None:
        if taken:
            self.last_dispatched = max(self.last_dispatched, max(e.offset for e in taken))
        for entry in taken:
            entry.dispatched = True
            entry.dispatched_at = entry.checked_at = now
            entry.attempts += 1
            self.dispatched_open += 1

    # -- topic batches: parts -----------------------------------------------------------------

    @property
    def joins(self) -> bool:
        """``batch_by="topic"``: the parts of this partition join other partitions' in a message."""
        return self.options.by == "topic"

    def _source(self) -> deque[Entry] | None:
        """Where the next part comes from; None while the previous part runs (ordered modes)."""
        if self.ordering == "none":
            source = self._fifo
        else:
            queue = self._queues.get(_WHOLE_PARTITION)
            if queue is None or queue.running:
                return None
            source = queue.entries
        while source and (source[0].done or source[0].released):
            source.popleft()
        return source or None

    def ready_part(self) -> tuple[int, float] | None:
        """How many records the next part could hold (at most ``batch_size``) and when its first
        one was delivered; None when there is none to take now."""
        source = self._source()
        if source is None:
            return None
        return min(len(source), self.options.size), source[0].delivered_at

    def take_part(self, limit: int, used: int, now: float) -> tuple[list[Entry], int]:
        """Take the next part: at most ``limit`` records, for a message that holds ``used``
        bytes already. Returns the part (maybe empty) and the bytes the message holds with it."""
        source = self._source()
        if source is None:
            return [], used
        part, used = self._cut(source, limit, used)
        if part and self.ordering != "none":
            queue = self._queues[_WHOLE_PARTITION]
            queue.running += len(part)
            queue.last = part[-1].offset
        self._mark(part, now)
        return part, used

    def _push_ready(self, entry: Entry) -> None:
        if not self.joins:  # parts are taken through _source, never from the heap
            super()._push_ready(entry)

    def has_ready(self) -> bool:
        return self._source() is not None if self.joins else super().has_ready()

    def take_ready(self, limit: int, now: float = 0.0) -> list[Entry]:
        """Take whole batches, up to ``limit`` records; each batch's entries share a ``lead``."""
        taken: list[Entry] = []
        size = self.options.size
        if self.joins:
            # On its own (the dispatcher joins parts with :func:`take`): a part is a batch.
            while len(taken) < limit and (ready := self.ready_part()) is not None:
                if self.waits(ready, now):
                    break
                taken += self.take_part(min(size, limit - len(taken)), MESSAGE_OVERHEAD, now)[0]
            return taken
        if self.ordering == "none":
            while self._fifo and len(taken) < limit:
                if self._waits(self._fifo[0], len(self._fifo), now):
                    break
                taken += self._cut(self._fifo, min(size, limit - len(taken)))[0]
        else:
            held: list[Entry] = []
            while self._ready and len(taken) < limit:
                _, _, group = heapq.heappop(self._ready)
                queue = self._queues.get(group)
                if queue is None or queue.running:
                    continue
                while queue.entries and _settled(queue.entries[0]):
                    queue.entries.popleft()
                if not queue.entries:
                    self._drop_if_idle(group, queue)
                    continue
                if self._waits(queue.entries[0], len(queue.entries), now):
                    held.append(queue.entries[0])
                    continue
                batch = self._cut(queue.entries, min(size, limit - len(taken)))[0]
                if not batch:
                    continue
                queue.running += len(batch)
                queue.last = batch[-1].offset
                taken += batch
            for entry in held:
                self._push_ready(entry)
        self._mark(taken, now)
        return taken

    def waits(self, ready: tuple[int, float], now: float) -> bool:
        """``ready``: records available and when the first of them was delivered."""
        available, delivered_at = ready
        return available < self.options.size and not self.flushing and now - delivered_at < self.options.timeout

    def held(self) -> int:
        """Records delivered and not dispatched yet (waiting to fill a batch or behind one)."""
        return sum(1 for e in self._entries if not e.dispatched and not e.done and not e.released)

    # -- batches in flight ------------------------------------------------------------------

    def batch_of(self, entry: Entry) -> list[Entry]:
        """The entries of ``entry``'s batch not yet in a final state, in offset order."""
        batch = self._batches.get(entry.lead)
        if batch is None:
            return []
        left = [e for e in batch if e.dispatched and not e.done and not e.released]
        if not left:
            del self._batches[entry.lead]
        return left

    def is_head(self, entry: Entry) -> bool:
        """The first unfinished record of its batch: the one whose liveness the ledger knows."""
        left = self.batch_of(entry)
        return bool(left) and left[0] is entry

    def rebatch(self, head: Entry) -> list[Entry]:
        """The unfinished records of ``head``'s batch, as a batch led by ``head`` (to dispatch
        again: its copy is lost, or it was partly settled under another lead)."""
        left = self.batch_of(head)
        if head.lead in self._batches:
            del self._batches[head.lead]
        for entry in left:
            entry.lead, entry.joint = head.offset, -1  # goes alone, as a batch of its partition
        if left:
            self._batches[head.offset] = list(left)
        return left

    def in_flight_batches(self) -> int:
        """Batches dispatched and not wholly in a final state."""
        return sum(1 for batch in list(self._batches.values()) if self.batch_of(batch[0]))

    def undispatch(self, entry: Entry) -> None:
        self._batches.pop(entry.lead, None)
        entry.joint = -1
        super().undispatch(entry)

    def restart(self, epoch: int) -> int:
        self._batches.clear()
        return super().restart(epoch)

    def committable(self) -> int | None:
        target = super().committable()
        if target is not None:
            for lead in [lead for lead, batch in self._batches.items() if batch[-1].offset < target]:
                del self._batches[lead]
        return target


def flush(partitions: Sequence[Owned]) -> list[Owned]:
    """Let the batch handlers' partitions among ``partitions`` send partial batches at once;
    returns them."""
    flushed = []
    for owned in partitions:
        if isinstance(owned.state, BatchState):
            owned.state.flushing = True
            flushed.append(owned)
    return flushed


def holding(owned: Owned) -> bool:
    """A flushed partition still holds records not dispatched (and will dispatch them: a partition
    an operator paused dispatches nothing)."""
    state = owned.state
    return isinstance(state, BatchState) and state.flushing and state.held() > 0 and not owned.held


def check_batch_handlers(settings: Settings, handlers: Mapping[str, Handler]) -> None:
    """Refuse batch sizes no partition could ever fill.

    Raises:
      ConfigurationError: naming the topic and the setting at fault.
    """
    for topic, handler in handlers.items():
        if handler.batch is None:
            continue
        window = handler.window or settings.window
        if handler.batch.size > window:
            raise ConfigurationError(
                f"topic {topic!r}: batch_size={handler.batch.size} of actor {handler.name!r} exceeds its window "
                f"({window}, BRIDGE_WINDOW or the handler's window option); a batch could never fill"
            )
        if handler.batch.size > settings.max_in_flight:
            raise ConfigurationError(
                f"topic {topic!r}: batch_size={handler.batch.size} of actor {handler.name!r} exceeds "
                f"BRIDGE_MAX_IN_FLIGHT ({settings.max_in_flight})"
            )
