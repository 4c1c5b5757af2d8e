"""Worker side of pipelined ordered lanes: records parked until their predecessor finishes.

In ``partition`` and ``key`` mode the bridge puts several records of one partition (key) on the
lane at once, each naming its predecessor. A worker thread that gets a record whose predecessor
has not finished does not wait for it: the record is parked in the worker process and the thread
takes other work. (A waiting thread would hold one of the process's few threads, and enough
waiters would starve the partitions whose next record is runnable.) A parked record goes back on
the worker's own work queue when its predecessor finishes: at once when it finished in this
process, through the ledger's pub/sub announcement when it finished in another one, and after
``recheck`` seconds should an announcement be missed (pub/sub does not queue), for another look
at the ledger.

A parked record's message is acknowledged in the task broker, so it lives only in this process
until it runs; its heartbeat keeps the bridge from dispatching it again meanwhile. If the
process dies, the heartbeat stops and the bridge dispatches it again after its re-dispatch
timeout. A graceful shutdown puts parked records back on their lanes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from ..keys import FINISHED_PATTERN

logger = logging.getLogger("bridge.worker")


@dataclass(slots=True, eq=False)
class _Slot:
    """Records waiting for one (channel, offset) to reach a final state."""

    announced: bool = False
    expecting: int = 0
    parked: list[tuple[Any, float]] = field(default_factory=list)


class Parking:
    """Parked records by the (channel, offset) they wait for, and the listener that frees them."""

    def __init__(
        self, client: redis.Redis | redis.RedisCluster, release: Callable[[Any], object], recheck: float = 1.0
    ) -> None:
        self._client = client
        self._release = release
        self._recheck = recheck
        self._lock = threading.Lock()
        self._slots: dict[tuple[str, int], _Slot] = {}
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()

    def expect(self, channel: str, offset: int) -> None:
        """Note interest in ``offset`` before asking the ledger, so that an announcement between
        the answer and :meth:`park` is not missed."""
        self._ensure_listener()
        with self._lock:
            slot = self._slots.setdefault((channel, offset), _Slot())
            slot.expecting += 1

    def forget(self, channel: str, offset: int) -> None:
        """Undo :meth:`expect` for a record that did not need to park."""
        with self._lock:
            slot = self._slots.get((channel, offset))
            if slot is not None:
                slot.expecting -= 1
                if not slot.expecting and not slot.parked:
                    del self._slots[(channel, offset)]

    def park(self, channel: str, offset: int, message: Any) -> None:
        """Hold ``message`` until ``offset`` is announced (after :meth:`expect`, or else found by
        the recheck)."""
        self._ensure_listener()
        with self._lock:
            slot = self._slots.setdefault((channel, offset), _Slot())
            slot.expecting = max(slot.expecting - 1, 0)
            if not slot.announced:
                slot.parked.append((message, time.monotonic() + self._recheck))
                return
            if not slot.expecting and not slot.parked:
                del self._slots[(channel, offset)]
        self._release(message)

    def announce(self, channel: str, offset: int) -> None:
        """``offset`` reached a final state: release what waits for it."""
        with self._lock:
            slot = self._slots.get((channel, offset))
            if slot is None:
                return
            ready = [message for message, _ in slot.parked]
            slot.parked.clear()
            if slot.expecting:
                slot.announced = True
            else:
                del self._slots[(channel, offset)]
        for message in ready:
            self._release(message)

    def claim(self, channel: str, offset: int) -> list[Any]:
        """Take the records parked for ``offset`` (whose finish is about to be written)."""
        with self._lock:
            slot = self._slots.get((channel, offset))
            if slot is None or not slot.parked:
                return []
            claimed = [message for message, _ in slot.parked]
            slot.parked.clear()
            if not slot.expecting:
                del self._slots[(channel, offset)]
        return claimed

    def take_all(self) -> list[Any]:
        """Every parked message, removed (for a shutdown to put them back on their lanes)."""
        with self._lock:
            messages = [message for slot in self._slots.values() for message, _ in slot.parked]
            self._slots.clear()
        return messages

    @property
    def parked(self) -> int:
        with self._lock:
            return sum(len(slot.parked) for slot in self._slots.values())

    def close(self) -> None:
        self._stop.set()

    def _due(self) -> list[Any]:
        now = time.monotonic()
        due: list[Any] = []
        with self._lock:
            for key, slot in list(self._slots.items()):
                keep = [(m, at) for m, at in slot.parked if at > now]
                due.extend(m for m, at in slot.parked if at <= now)
                slot.parked = keep
                if not keep and not slot.expecting:
                    del self._slots[key]
        return due

    def _ensure_listener(self) -> None:
        if self._listener is not None and self._listener.is_alive():
            return
        with self._lock:
            if self._listener is not None and self._listener.is_alive():
                return
            self._stop.clear()
            self._listener = threading.Thread(target=self._listen, name="kdb-parking", daemon=True)
            self._listener.start()

    def _listen(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            subscribed_at = time.monotonic()
            try:
                # The subscription's answer (or refusal) arrives with the first get_message.
                pubsub.psubscribe(FINISHED_PATTERN)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.05)
                    if message is not None and message.get("type") == "pmessage":
                        self._on_message(message)
                    for parked in self._due():
                        self._release(parked)
            except redis.RedisError as e:
                if time.monotonic() - subscribed_at > 10 * backoff:
                    backoff = 0.1  # it had been listening: a fresh failure
                # Parked records are still released by their recheck meanwhile.
                logger.warning("listening for finished records failed, retrying in %.1fs: %s", backoff, e)
                for parked in self._due():
                    self._release(parked)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                pubsub.close()

    def _on_message(self, message: dict[str, Any]) -> None:
        channel, data = message.get("channel"), message.get("data")
        if isinstance(channel, bytes):
            channel = channel.decode()
        if isinstance(data, bytes):
            data = data.decode()
        if isinstance(channel, str) and isinstance(data, str) and data.lstrip("-").isdigit():
            self.announce(channel, int(data))
