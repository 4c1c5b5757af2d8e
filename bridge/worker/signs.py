"""Signs of life of one worker process: the copies running in it and the records parked in it,
sent to the ledger as heartbeats, and the background thread that sends them and declares lanes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import dramatiq

from ..keys import PartitionKeys
from ..ledger import Beats, Ledger, LedgerError
from ..protocol import registration_json
from ..registry import Registry

logger = logging.getLogger("bridge.worker")

Slot = tuple[PartitionKeys, int]
#: A running copy: epoch, attempt, retries, token, worker.
Copy = tuple[int, int, int, str, str]


class Signs:
    """What runs and what waits in this process. Thread-safe: worker threads write, the
    heartbeat thread reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (keys, offset) -> token -> (epoch, attempt, retries, token, worker) of each copy running;
        # turned into a registration only when a heartbeat goes out (most records end before one).
        self._running: dict[Slot, dict[str, Copy]] = {}
        # (keys, offset) -> how many copies are parked waiting for their predecessor.
        self._parked: dict[Slot, int] = {}

    def running(self, slot: Slot, token: str, registration: Copy) -> None:
        with self._lock:
            self._running.setdefault(slot, {})[token] = registration

    def finished(self, slot: Slot, token: str) -> None:
        with self._lock:
            copies = self._running.get(slot)
            if copies is not None:
                copies.pop(token, None)
                if not copies:
                    del self._running[slot]

    def parked(self, slot: Slot) -> None:
        with self._lock:
            self._parked[slot] = self._parked.get(slot, 0) + 1

    def unparked(self, slot: Slot) -> None:
        with self._lock:
            count = self._parked.pop(slot, 0)
            if count > 1:
                self._parked[slot] = count - 1

    def beats(self) -> dict[PartitionKeys, Beats]:
        """The heartbeat to send now, per partition."""
        beats: dict[PartitionKeys, Beats] = {}
        with self._lock:
            for (keys, offset), copies in self._running.items():
                found = beats.setdefault(keys, Beats())
                found.running.extend((offset, token, registration_json(*entry)) for token, entry in copies.items())
            for keys, offset in self._parked:
                beats.setdefault(keys, Beats()).parked.append(offset)
        return beats


class Background:
    """A daemon thread that declares the lanes bridges opened for this worker's topics every
    ``lanes_every`` seconds (a declared queue gets a dramatiq consumer at once), and sends the
    heartbeat every ``beats_every`` seconds, until :meth:`stop`. A failed ledger call is logged
    and counted through ``failed``, then tried again next time."""

    def __init__(
        self,
        ledger: Ledger,
        handlers: Registry,
        signs: Signs,
        broker: dramatiq.Broker,
        failed: Callable[[str], None],
        lanes_every: float,
        beats_every: float,
    ) -> None:
        self._ledger = ledger
        self._handlers = handlers
        self._signs = signs
        self._broker = broker
        self._failed = failed
        self._lanes_every = lanes_every
        self._beats_every = beats_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdb-worker", daemon=True)

    def start(self) -> None:
        self.declare_lanes()
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait for the thread (a heartbeat or a lane refresh in progress finishes)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(10)

    def declare_lanes(self) -> None:
        try:
            lanes = self._ledger.lanes()
        except LedgerError as e:
            logger.warning("cannot read lanes, retrying: %s", e)
            return
        topics = self._handlers.by_topic()
        declared = self._broker.get_declared_queues()
        for lane, topic in sorted(lanes.items()):
            if topic in topics and lane not in declared:
                logger.info("consuming lane %s (topic %s)", lane, topic)
                self._broker.declare_queue(lane)

    def beat(self) -> None:
        beats = self._signs.beats()
        if not beats:
            return
        try:
            self._ledger.beat(beats)
        except LedgerError as e:
            self._failed("heartbeat")
            logger.warning("heartbeat failed: %s", e)

    def _run(self) -> None:
        next_lanes = next_beat = time.monotonic()
        while not self._stop.wait(min(self._lanes_every, self._beats_every, 0.5)):
            now = time.monotonic()
            if now >= next_lanes:
                self.declare_lanes()
                next_lanes = now + self._lanes_every
            if now >= next_beat:
                self.beat()
                next_beat = now + self._beats_every
