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
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import dramatiq

from . import protocol
from .batch import batch_envelope
from .errors import ConfigurationError
from .partition import _WHOLE_PARTITION, Entry, PartitionState, _settled
from .protocol import OPTION, Meta
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
        return available < self.options.size and not self.flushing and now - first.delivered_at < self.options.timeout

    def _cut(self, source: Any, limit: int) -> list[Entry]:
        """Take the next batch from the front of ``source`` (a deque of entries): at most ``limit``
        records, within the size limit. A record too large for any message goes alone (the
        dispatcher fails it), and stops a batch before it."""
        batch: list[Entry] = []
        size = MESSAGE_OVERHEAD
        while source and len(batch) < limit:
            entry = source[0]
            if entry.done or entry.released:
                source.popleft()
                continue
            grown = size + encoded_size(entry.payload)
            if batch and (entry.size > self.max_bytes or grown > self.max_bytes):
                break
            batch.append(source.popleft())
            size = grown
            if entry.size > self.max_bytes:
                break
        for entry in batch:
            entry.prev, entry.lead = -1, batch[0].offset
        if batch:
            self._batches[batch[0].offset] = list(batch)
        return batch

    def take_ready(self, limit: int, now: float = 0.0) -> list[Entry]:
        """Take whole batches, up to ``limit`` records; each batch's entries share a ``lead``."""
        taken: list[Entry] = []
        size = self.options.size
        if self.ordering == "none":
            while self._fifo and len(taken) < limit:
                if self._waits(self._fifo[0], len(self._fifo), now):
                    break
                taken += self._cut(self._fifo, min(size, limit - len(taken)))
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
                batch = self._cut(queue.entries, min(size, limit - len(taken)))
                if not batch:
                    continue
                queue.running += len(batch)
                queue.last = batch[-1].offset
                taken += batch
            for entry in held:
                self._push_ready(entry)
        if taken:
            self.last_dispatched = max(self.last_dispatched, max(e.offset for e in taken))
        for entry in taken:
            entry.dispatched = True
            entry.dispatched_at = entry.checked_at = now
            entry.attempts += 1
            self.dispatched_open += 1
        return taken

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
            entry.lead = head.offset
        if left:
            self._batches[head.offset] = list(left)
        return left

    def in_flight_batches(self) -> int:
        """Batches dispatched and not wholly in a final state."""
        return sum(1 for batch in list(self._batches.values()) if self.batch_of(batch[0]))

    def undispatch(self, entry: Entry) -> None:
        self._batches.pop(entry.lead, None)
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


# -- messages ---------------------------------------------------------------------------------


def batch_message(
    group: str, owned: Owned, entries: Sequence[Entry], attempt: int
) -> dramatiq.Message[Any]:
    """The dramatiq message of one copy of a batch."""
    meta = Meta(
        group=group,
        topic=owned.topic,
        partition=owned.partition,
        offset=entries[0].offset,
        epoch=owned.state.epoch,
        attempt=attempt,
        version=protocol.BATCH_VERSION,
        batch=tuple(e.offset for e in entries),
    )
    return dramatiq.Message(
        queue_name=owned.lane,
        actor_name=owned.handler.actor.actor_name,
        args=(batch_envelope([e.payload for e in entries]),),
        kwargs={},
        options={OPTION: meta.to_option()},
    )


def runs(sends: Sequence[tuple[Owned, Entry, int]]) -> Iterator[tuple[int, int]]:
    """(start, end) of each message among ``sends``: a record alone, or a run of one batch."""
    start = 0
    while start < len(sends):
        owned, entry, _ = sends[start]
        end = start + 1
        if entry.lead >= 0 and owned.handler.batch is not None:
            while end < len(sends) and sends[end][0] is owned and sends[end][1].lead == entry.lead:
                end += 1
        yield start, end
        start = end


def chunks(sends: Sequence[tuple[Owned, Entry, int]], size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of chunks of about ``size`` sends that never cut a batch in two."""
    start = end = 0
    for _, end in runs(sends):
        if end - start >= size:
            yield start, end
            start = end
    if start < end:
        yield start, end


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
