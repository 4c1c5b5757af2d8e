"""Starts of records no predecessor holds, and ends of records no successor waits for (``none``
mode), written in batches: one round trip per batch for all partitions instead of one per record.

The worker threads of a process combine their writes: a thread that needs a start verdict while
no write is in flight writes itself, taking along every start and end that waits; threads that
ask meanwhile wait, and the first of them writes the next batch. A lone start costs what a
direct call costs; under load the batches grow by themselves, without a thread hop. Ends do not
wait: they go with the next start's batch, or after a few milliseconds with a flusher thread's.

Losing an end costs no record: an end that never reached the ledger leaves the record unfinished
for the bridge, which dispatches it again after its re-dispatch timeout, and the new copy finds
it done or running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from ..errors import LedgerAccessDenied, LedgerUnavailable
from ..keys import PartitionKeys
from ..ledger import End, Ledger, LedgerError, StartResult, Try

logger = logging.getLogger("bridge.worker")

#: Ends held while the ledger does not answer; beyond it the oldest go (their records run again).
_MAX_HELD = 100_000
#: How long a start waits for another thread's batch, past the Redis client's own timeouts.
_START_WAIT = 120.0
#: How long ends wait for a start to take them along before the flusher writes them.
_LINGER = 0.02


class _Start:
    __slots__ = ("answer", "copy", "error", "keys", "lead", "ready", "worker")

    def __init__(self, keys: PartitionKeys, copy: Try, worker: str, ready: threading.Event | None) -> None:
        self.keys, self.copy, self.worker = keys, copy, worker
        self.answer: tuple[StartResult, int] | None = None
        self.error: LedgerUnavailable | LedgerAccessDenied | None = None
        #: Woken to write the next batch rather than with an answer.
        self.lead = False
        #: Set when answered or asked to lead; None for the writer's own start, which never waits.
        self.ready = ready

    def settle(self) -> None:
        if self.ready is not None:
            self.ready.set()


class Batcher:
    """Per process. Thread-safe: worker threads call :meth:`start` and :meth:`finish`."""

    def __init__(self, ledger: Ledger, worker: str, live: float, failed: Callable[[str], None]) -> None:
        self._ledger = ledger
        self._worker = worker
        self._live = live
        self._failed = failed
        self._lock = threading.Condition()
        self._starts: list[_Start] = []
        self._ends: deque[tuple[PartitionKeys, End]] = deque()
        self._writing = False
        self._stopping = False
        self._flusher: threading.Thread | None = None
        # The flusher waits for a first end: only then is it woken. While it lingers it wakes at its
        # deadline; waking it for each end that follows a write would cost a thread switch each.
        self._idle = False
        self._backoff = 0.0
        # One event per thread, reused: a thread waits for one start at a time.
        self._events = threading.local()

    def start(self, keys: PartitionKeys, copy: Try, worker: str) -> tuple[StartResult, int]:
        """Ask whether ``copy`` may start (see :meth:`Ledger.start`); blocks for the answer.

        Raises:
          LedgerError: the ledger did not answer.
        """
        with self._lock:
            if self._writing:
                ready = getattr(self._events, "ready", None)
                if ready is None:
                    ready = self._events.ready = threading.Event()
                ready.clear()
                asked = _Start(keys, copy, worker, ready)
                self._starts.append(asked)
            else:
                # Nobody writes: this thread writes at once, without waiting on anything.
                self._writing = True
                asked = _Start(keys, copy, worker, None)
        if asked.ready is None:
            self._write_batch(asked)
        while asked.answer is None and asked.error is None:
            assert asked.ready is not None
            if not asked.ready.wait(_START_WAIT):
                self._give_up(asked)
            asked.ready.clear()
            if asked.lead:
                # Handed the writer's role: this start is among the ones waiting, written with them.
                asked.lead = False
                self._write_batch()
        if asked.error is not None:
            raise asked.error
        assert asked.answer is not None
        return asked.answer

    def _give_up(self, asked: _Start) -> None:
        """A start waited too long: it leaves the queue, so that no write hands the writer's role
        to a thread that no longer waits. Returns if it was answered or handed the role meanwhile."""
        with self._lock:
            if asked.lead or asked.answer is not None or asked.error is not None:
                return
            if asked in self._starts:
                self._starts.remove(asked)
        keys, offset = asked.keys, asked.copy.offset
        raise LedgerUnavailable(f"ledger start of {keys.topic}[{keys.partition}]@{offset}: no answer")

    def finish(self, keys: PartitionKeys, end: End) -> None:
        """Write ``end`` with the next batch; returns at once."""
        with self._lock:
            if self._flusher is None or not self._flusher.is_alive():
                # Started with the first end, and again after a worker restart in this process.
                self._stopping = False
                self._flusher = threading.Thread(target=self._flush, name="kdb-batcher", daemon=True)
                self._flusher.start()
            if len(self._ends) >= _MAX_HELD:
                dropped, _ = self._ends.popleft()
                logger.error("dropping an end of %s[%d] the ledger never took; it runs again", dropped.topic,
                             dropped.partition)
            self._ends.append((keys, end))
            if self._idle:
                self._lock.notify()

    def pending(self) -> tuple[int, int]:
        """Starts and ends waiting for a write."""
        with self._lock:
            return len(self._starts), len(self._ends)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending and stop."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
            flusher = self._flusher
        if flusher is not None:
            flusher.join(timeout)

    def _flush(self) -> None:
        """Write ends that no start took along within the linger time (or the backoff)."""
        while True:
            with self._lock:
                while not self._ends and not self._stopping:
                    self._idle = True
                    self._lock.wait()
                self._idle = False
                deadline = time.monotonic() + max(_LINGER, self._backoff)
                while self._ends and not self._stopping and (left := deadline - time.monotonic()) > 0:
                    self._lock.wait(left)
                if not self._ends:
                    if self._stopping:
                        return
                    continue  # a start took them along
                if self._writing:
                    self._lock.wait(_LINGER)  # the writer hands over or notifies when done
                    continue
                self._writing = True
                stopping = self._stopping
            if not self._write_batch() and stopping:
                return  # the bridge dispatches them again after its re-dispatch timeout

    def _write_batch(self, own: _Start | None = None) -> bool:
        """Write everything pending (and ``own``, the writer's start), as the one writer; then hand
        the role to a waiting start. Returns whether the write succeeded."""
        with self._lock:
            starts, self._starts = self._starts, []
            if own is not None:
                starts.append(own)
            ends = list(self._ends)
            self._ends.clear()
        ok = True
        try:
            self._write(starts, ends)
        except LedgerError as e:
            ok = False
            for asked in starts:  # each start fails in its own thread, as a direct call would
                asked.error = e
                asked.settle()
            if ends:
                self._failed("finish")
                self._backoff = min(self._backoff * 2 or 0.1, 5.0)
                logger.error("writing %d finished records failed, retrying in %.1fs: %s", len(ends), self._backoff, e)
                with self._lock:
                    self._ends.extendleft(reversed(ends))
        except BaseException as e:  # a bug here must not leave worker threads waiting
            for asked in starts:
                asked.error = LedgerUnavailable(f"ledger start failed: {e!r}")
                asked.settle()
            raise
        finally:
            with self._lock:
                if self._starts:
                    successor = self._starts[0]
                    successor.lead = True
                    successor.settle()
                else:
                    self._writing = False
                    if self._ends and self._idle:
                        self._lock.notify()
        if ok:
            self._backoff = 0.0
        return ok

    def _write(self, starts: list[_Start], ends: list[tuple[PartitionKeys, End]]) -> None:
        by_keys: dict[PartitionKeys, list[_Start]] = {}
        for asked in starts:
            by_keys.setdefault(asked.keys, []).append(asked)
        grouped: dict[PartitionKeys, list[End]] = {}
        for keys, end in ends:
            grouped.setdefault(keys, []).append(end)
        verdicts = self._ledger.start_and_finish_many(
            {keys: [(a.copy, a.worker) for a in found] for keys, found in by_keys.items()},
            grouped, self._worker, self._live,
        )
        for keys, found in by_keys.items():
            for asked, answer in zip(found, verdicts[keys], strict=True):
                asked.answer = answer
                asked.settle()
