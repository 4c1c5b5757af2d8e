"""Which partitions have new final states to read, from the ledger's pub/sub announcements.

Every ledger script that records a final state also announces it on the partition's
``finished_channel``. Reading each partition's list of new final states every loop round costs one
Redis command per partition with work in flight, some 200 rounds a second, whether anything
finished or not. Instead the loop reads the partitions announced since its last round, and every
partition with work in flight once per ``sweep`` seconds: pub/sub does not queue, so an
announcement missed while the subscription was down (or one a script did not make) is still read
within the sweep. Until the subscription is confirmed, and after it fails, every round reads every
partition, as without announcements.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from .keys import FINISHED_PATTERN

logger = logging.getLogger("bridge")

#: Seconds between reads of every partition with work in flight, announced or not.
SWEEP_INTERVAL = 1.0


class Announcements:
    """Finished channels announced since the last :meth:`take`. Thread-safe."""

    def __init__(self, client: Any, sweep: float = SWEEP_INTERVAL) -> None:
        self._client = client
        self._sweep = sweep
        self._lock = threading.Lock()
        self._announced: set[str] = set()
        self._listening = False
        self._last_sweep = float("-inf")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def take(self, now: float) -> set[str] | None:
        """The channels announced since the last call, or ``None`` when every partition must be read
        (the subscription is not up, or a sweep is due)."""
        self._ensure_listener()
        with self._lock:
            announced, self._announced = self._announced, set()
            listening = self._listening
        if not listening or now - self._last_sweep >= self._sweep:
            self._last_sweep = now
            return None
        return announced

    def close(self) -> None:
        self._stop.set()

    def _ensure_listener(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._listen, name="kdb-finishes", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = None
            began = time.monotonic()
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=False)
                pubsub.psubscribe(FINISHED_PATTERN)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    kind = message.get("type")
                    if kind == "psubscribe":
                        with self._lock:
                            self._listening = True
                    elif kind == "pmessage":
                        channel = message.get("channel")
                        if isinstance(channel, bytes):
                            channel = channel.decode()
                        with self._lock:
                            self._announced.add(channel)
            except Exception as e:  # any failure: read every partition meanwhile, retry later
                with self._lock:
                    self._listening = False
                if time.monotonic() - began > 10 * backoff:
                    backoff = 0.1
                log = logger.debug if isinstance(e, redis.RedisError) else logger.warning
                log("listening for finished records failed, reading every partition meanwhile: %r", e)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with self._lock:
                    self._listening = False
                if pubsub is not None:
                    pubsub.close()
