"""Per-partition delivery state: what was delivered, what may be dispatched, what may be committed.

Pure data structure, driven by the bridge's main loop; no I/O and no threads. Offsets are the
Kafka offsets of delivered records, which may have gaps (compaction, transaction markers), so
the committable offset is derived from the delivered offsets only, never from ``offset + 1``
arithmetic over the log.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .registry import Ordering

#: Group key used in ``partition`` mode: every record of the partition shares it.
_WHOLE_PARTITION = b"\x00partition"


@dataclass(slots=True, eq=False)
class Entry:
    """One delivered record of the partition."""

    offset: int
    group: Hashable
    payload: Any
    dispatched: bool = False
    done: bool = False
    dispatched_at: float = 0.0
    checked_at: float = 0.0
    attempts: int = 0
    size: int = 0
    #: The record's Kafka timestamp (ms), kept once it is done: the time lag reads it.
    timestamp: int | None = None
    #: A final failure awaiting its dead letter: the failure detail.
    failure: dict[str, Any] | None = None
    #: Dead letter state: 0 none, -1 being written, > 0 monotonic time of the next try.
    dead_letter_at: float = 0.0
    dead_letter_tries: int = 0
    #: Reached a final state in the task broker: no longer blocks its partition (key), though
    #: it is not done until its dead letter is acknowledged.
    released: bool = False
    #: Ordered modes: the record of the same partition (key) dispatched before this one in this
    #: epoch, which must reach a final state before this one starts; -1 for none.
    prev: int = -1
    #: Batch handlers: the first offset of the batch it was dispatched in; -1 for none.
    lead: int = -1
    #: Batch handlers with ``batch_by="topic"``: the message its batch shares with other
    #: partitions' batches (an id of this process); -1 for none.
    joint: int = -1
    #: When it was delivered (loop clock): a partial batch waits for more until its timeout.
    delivered_at: float = 0.0


def _settled(entry: Entry) -> bool:
    """Nothing to dispatch: done, or released without a dispatch (withdrawn)."""
    return entry.done or (entry.released and not entry.dispatched)


@dataclass(slots=True)
class _KeyQueue:
    entries: deque[Entry] = field(default_factory=deque)
    #: Records of the group dispatched and not yet in a final state.
    running: int = 0
    #: Offset of the group's last dispatched record (the next one's predecessor).
    last: int = -1


class PartitionState:
    """Delivery window of one partition.

    ``deliver`` appends records in offset order; ``take_ready`` hands out the records that the
    ordering mode allows to put on the lane now (up to ``depth`` unfinished per partition or per
    key, each naming its predecessor, or any in ``none`` mode); ``mark_done`` applies done facts
    from the ledger; ``committable`` returns the next offset to commit: one past the contiguous
    prefix of done delivered records.
    """

    def __init__(
        self,
        *,
        ordering: Ordering,
        epoch: int,
        start_offset: int | None = None,
        known_done: Iterable[int] = (),
        depth: int = 1,
    ) -> None:
        self.ordering: Ordering = ordering
        self.depth = depth
        self.epoch = epoch
        self.known_done: set[int] = set(known_done)
        self._entries: deque[Entry] = deque()
        self._by_offset: dict[int, Entry] = {}
        self._next_commit: int | None = start_offset
        self.last_committed: int | None = None
        self.open = 0
        self.dispatched_open = 0
        self.last_dispatched = -1
        # none mode: FIFO of undispatched entries; ordered modes: per-group queues plus a heap
        # of (head offset, group) for groups whose head may be dispatched now.
        self._fifo: deque[Entry] = deque()
        self._queues: dict[Hashable, _KeyQueue] = {}
        self._ready: list[tuple[int, int, Hashable]] = []
        self._seq = 0

    # -- intake -----------------------------------------------------------------------------

    def group_of(self, key: bytes | None) -> Hashable:
        if self.ordering == "partition":
            return _WHOLE_PARTITION
        return key

    def deliver(
        self, offset: int, key: bytes | None, payload: Any, size: int = 0, now: float = 0.0,
        timestamp: int | None = None,
    ) -> Entry:
        """Accept a polled record. Offsets must increase; a record the ledger already shows
        done is accepted as done and never dispatched."""
        if self._entries and offset <= self._entries[-1].offset:
            raise ValueError(f"offset {offset} delivered out of order after {self._entries[-1].offset}")
        entry = Entry(offset, self.group_of(key), payload, size=size, delivered_at=now, timestamp=timestamp)
        self._entries.append(entry)
        self._by_offset[offset] = entry
        if self._next_commit is None:
            self._next_commit = offset
        if offset in self.known_done:
            self.known_done.discard(offset)
            entry.done = True
            entry.payload = None
            return entry
        self.open += 1
        self._enqueue(entry)
        return entry

    def _enqueue(self, entry: Entry) -> None:
        if self.ordering == "none":
            self._fifo.append(entry)
            return
        queue = self._queues.get(entry.group)
        if queue is None:
            queue = self._queues[entry.group] = _KeyQueue()
        queue.entries.append(entry)
        if queue.running < self.depth and len(queue.entries) == 1:
            self._push_ready(entry)

    def _push_ready(self, entry: Entry) -> None:
        self._seq += 1
        heapq.heappush(self._ready, (entry.offset, self._seq, entry.group))

    # -- dispatch ---------------------------------------------------------------------------

    def take_ready(self, limit: int, now: float = 0.0) -> list[Entry]:
        """Mark up to ``limit`` records as dispatched and return them in offset order."""
        taken: list[Entry] = []
        if self.ordering == "none":
            while self._fifo and len(taken) < limit:
                entry = self._fifo.popleft()
                if not entry.done and not entry.released:
                    taken.append(entry)
        else:
            while self._ready and len(taken) < limit:
                _, _, group = heapq.heappop(self._ready)
                queue = self._queues.get(group)
                if queue is None or queue.running >= self.depth:
                    continue
                while queue.entries and _settled(queue.entries[0]):
                    queue.entries.popleft()
                if not queue.entries:
                    self._drop_if_idle(group, queue)
                    continue
                entry = queue.entries.popleft()
                entry.prev = queue.last
                queue.last = entry.offset
                queue.running += 1
                taken.append(entry)
                if queue.entries and queue.running < self.depth:
                    self._push_ready(queue.entries[0])
        if taken:
            self.last_dispatched = max(self.last_dispatched, taken[-1].offset)
        for entry in taken:
            entry.dispatched = True
            entry.dispatched_at = entry.checked_at = now
            entry.attempts += 1
            self.dispatched_open += 1
        return taken

    def undispatch(self, entry: Entry) -> None:
        """Put back a record whose dispatch failed, ahead of everything not yet dispatched."""
        if not entry.dispatched or entry.done:
            return
        entry.dispatched = False
        entry.attempts -= 1
        self.dispatched_open -= 1
        if self.ordering == "none":
            self._fifo.appendleft(entry)
            return
        queue = self._queues.get(entry.group)
        if queue is None:
            queue = self._queues[entry.group] = _KeyQueue()
        queue.entries.appendleft(entry)
        queue.running -= 1
        queue.last = entry.prev
        self._push_ready(entry)

    def entry(self, offset: int) -> Entry | None:
        """The delivered, not yet committed record at ``offset``."""
        return self._by_offset.get(offset)

    def has_ready(self) -> bool:
        return bool(self._fifo or self._ready)

    def is_head(self, entry: Entry) -> bool:
        """Whether ``entry`` may run now: its predecessor (if any) reached a final state."""
        if entry.prev < 0:
            return True
        prev = self._by_offset.get(entry.prev)
        return prev is None or prev.done or prev.released

    def dispatched_unfinished(self) -> list[Entry]:
        """Records dispatched whose message has not reached a final state yet."""
        return [e for e in self._entries if e.dispatched and not e.done and not e.released]

    # -- completion -------------------------------------------------------------------------

    def mark_done(self, offsets: Iterable[int]) -> int:
        """Apply done facts; unknown or repeated offsets are ignored. Returns how many were new."""
        new = 0
        for offset in offsets:
            entry = self._by_offset.get(offset)
            if entry is None or entry.done:
                continue
            self.release(entry)
            entry.done = True
            entry.payload = None
            self.open -= 1
            new += 1
        return new

    def withdraw(self, entry: Entry) -> None:
        """Never dispatch ``entry``: its final state is known already (a failure recorded under an
        older assignment). It stays unfinished until :meth:`mark_done`."""
        if entry.dispatched:
            self.release(entry)
        entry.released = True

    def restart(self, epoch: int) -> int:
        """Start a new epoch in place (the ledger lost this partition's state): every record
        dispatched and not yet in a final state is dispatched again, in order, under ``epoch``.
        Returns how many."""
        self.epoch = epoch
        again = [e for e in self._entries if e.dispatched and not e.done and not e.released]
        pending = [e for e in self._entries if not e.done and not e.released]
        for entry in again:
            entry.dispatched = False
            entry.attempts = 0
        self.dispatched_open = 0
        self._fifo.clear()
        self._queues.clear()
        self._ready.clear()
        for entry in pending:
            entry.prev = -1
            self._enqueue(entry)
        return len(again)

    def release(self, entry: Entry) -> None:
        """Let the next record of the entry's partition (key) run; the entry stays undone."""
        if not entry.dispatched or entry.released or entry.done:
            return
        entry.released = True
        self.dispatched_open -= 1
        if self.ordering != "none":
            self._release(entry.group)

    def _release(self, group: Hashable) -> None:
        queue = self._queues.get(group)
        if queue is None:
            return
        queue.running -= 1
        while queue.entries and _settled(queue.entries[0]):
            queue.entries.popleft()
        if queue.entries:
            if queue.running == self.depth - 1:
                self._push_ready(queue.entries[0])
        else:
            self._drop_if_idle(group, queue)

    def _drop_if_idle(self, group: Hashable, queue: _KeyQueue) -> None:
        # A group with records on the lane keeps its chain: the next record names the last.
        if not queue.running and not queue.entries:
            del self._queues[group]

    def committable(self) -> int | None:
        """Next offset to commit (one past the done prefix), or None before the first delivery."""
        entries = self._entries
        while entries and entries[0].done:
            entry = entries.popleft()
            del self._by_offset[entry.offset]
            self._next_commit = entry.offset + 1
        if entries:
            self._next_commit = entries[0].offset
        return self._next_commit

    @property
    def idle(self) -> bool:
        """Every delivered record is done."""
        return self.open == 0

    @property
    def last_delivered(self) -> int | None:
        return self._entries[-1].offset if self._entries else None

    def head(self) -> Entry | None:
        """The oldest record not done: the one the commit waits for."""
        return next((e for e in self._entries if not e.done), None)

    def oldest_uncommitted(self) -> tuple[int | None, int | None]:
        """The offset and Kafka timestamp of the oldest record held and not yet committed (done
        records stay until the commit passes them); when none is held, the next offset to commit
        and no timestamp (that record was not fetched yet)."""
        if self._entries:
            first = self._entries[0]
            return first.offset, first.timestamp
        return self._next_commit, None

    def oldest_unfinished_dispatch(self) -> float | None:
        times = [e.dispatched_at for e in self._entries if e.dispatched and not e.done]  # failing ones too
        return min(times) if times else None
