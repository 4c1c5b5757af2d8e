"""Idle lane consumers fetch as soon as the bridge puts records on their lane.

dramatiq's Redis consumer polls: after an empty fetch it sleeps, doubling its back-off up to the
worker timeout (1 s by default), so the first record after a quiet spell waits hundreds of
milliseconds for a poll. The bridge publishes on the lane's wake channel (``kdb:wake:<lane>``, in
the round trip that enqueues the records); in a worker process, each lane's consumer waits for
that wake-up instead of sleeping, and otherwise backs off exactly as dramatiq does. If the
wake-ups stop (Redis unreachable), consumers simply poll as stock dramatiq does.

The dramatiq behaviour this relies on, in one place (the same in every supported release):

- a worker's consumer thread creates its consumer with
  ``broker.consume(queue_name=..., prefetch=..., timeout=...)``, so wrapping ``consume`` on the
  broker instance wraps every consumer created after it;
- a Redis consumer's ``__next__`` returns ``None`` after an empty fetch, having slept the back-off
  that ``dramatiq.common.compute_backoff`` gives for its ``timeout``: none with ``timeout=0``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import compute_backoff

from ..keys import WAKE_PATTERN, WAKE_PREFIX
from .acks import Acks

logger = logging.getLogger("bridge.worker")

#: Queues of lanes start so; their delay queues (``.DQ``) keep dramatiq's own polling: a retry's
#: eta, not a wake-up, decides when it is due.
_LANE_PREFIX = "kdb."


def is_lane(queue_name: str) -> bool:
    return queue_name.startswith(_LANE_PREFIX) and not queue_name.endswith((".DQ", ".XQ"))


class WakeableConsumer(dramatiq.Consumer):
    """A Redis lane consumer whose back-off after an empty fetch ends early on a wake-up, and
    whose acknowledgements go in batches (:mod:`bridge.worker.acks`)."""

    def __init__(self, inner: Any, wake: threading.Event, timeout_ms: int, acks: Acks | None = None) -> None:
        self._inner = inner
        self._wake = wake
        self._timeout_ms = timeout_ms
        self._acks = acks
        #: Empty fetches in a row since the last record or wake-up; the back-off grows with it.
        self.misses = 0

    def __next__(self) -> Any:
        message = next(self._inner)  # created with timeout 0: it never sleeps itself
        if message is not None:
            self.misses = 0
            return message
        # Cleared before waiting: a wake-up that came during the fetch above was for records the
        # fetch may have missed, so it must end this wait at once.
        if self._wake.is_set():
            self._wake.clear()
            self.misses = 0
            return None
        self.misses, backoff_ms = compute_backoff(self.misses, max_backoff=self._timeout_ms)
        if self._wake.wait(backoff_ms / 1000):
            self._wake.clear()
            self.misses = 0
        return None

    def ack(self, message: Any) -> None:
        if self._acks is None:
            self._inner.ack(message)
            return
        try:
            message_id = message.options["redis_message_id"]
        finally:
            # Acknowledged as far as the prefetch goes, as dramatiq's own ack does even when it fails.
            self._inner.queued_message_ids.discard(message.message_id)
        self._acks.add(self._inner.queue_name, message_id)

    def nack(self, message: Any) -> None:
        self._inner.nack(message)

    def requeue(self, messages: Any) -> None:
        self._inner.requeue(messages)

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Waker:
    """Wake-up events by lane, and the thread that sets them from the broker's pub/sub."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self._client: redis.Redis | None = None
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()
        self._acks: Acks | None = None

    def install(self, broker: dramatiq.Broker) -> None:
        """Make ``broker``'s lane consumers wakeable, their acknowledgements batched (dramatiq's
        Redis broker only; once)."""
        if not isinstance(broker, RedisBroker) or getattr(broker.consume, "_kdb_waker", False):
            return
        self._client = broker.client
        self._acks = Acks(broker)
        wrapped = functools.partial(self._consume, broker.consume)
        wrapped._kdb_waker = True  # type: ignore[attr-defined]
        broker.consume = wrapped  # type: ignore[method-assign]

    def _consume(self, original: Callable[..., Any], queue_name: str, prefetch: int = 1,
                 timeout: int = 30000) -> Any:
        if not is_lane(queue_name):
            return original(queue_name=queue_name, prefetch=prefetch, timeout=timeout)
        with self._lock:
            event = self._events.setdefault(queue_name, threading.Event())
        self._ensure_listener()
        return WakeableConsumer(original(queue_name=queue_name, prefetch=prefetch, timeout=0), event, timeout,
                                self._acks)

    def wake(self, lane: str) -> None:
        with self._lock:
            event = self._events.get(lane)
        if event is not None:
            event.set()

    def close(self) -> None:
        self._stop.set()

    def flush(self) -> None:
        """Write the acknowledgements still pending: the worker's threads have stopped."""
        if self._acks is not None:
            self._acks.close()

    def _ensure_listener(self) -> None:
        with self._lock:
            if self._listener is not None and (self._listener.is_alive() or not self._stop.is_set()):
                return  # alive, or ended for good (refused); close() lets the next consumer start one
            self._stop.clear()
            self._listener = threading.Thread(target=self._listen, name="kdb-waker", daemon=True)
            self._listener.start()

    def _listen(self) -> None:
        assert self._client is not None
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            subscribed_at = time.monotonic()
            try:
                pubsub.psubscribe(WAKE_PATTERN)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "pmessage":
                        channel = message.get("channel")
                        if isinstance(channel, bytes):
                            channel = channel.decode()
                        if isinstance(channel, str):
                            self.wake(channel[len(WAKE_PREFIX):])
            except redis.RedisError as e:
                if isinstance(e, redis.exceptions.NoPermissionError):
                    # An ACL without the channel: nothing to retry. Consumers poll as stock dramatiq does.
                    logger.warning("the task broker's Redis user may not subscribe to %s, so idle lane consumers "
                                   "poll instead of being woken (grant &%s to that user): %s",
                                   WAKE_PATTERN, WAKE_PATTERN, e)
                    return
                if time.monotonic() - subscribed_at > 10 * backoff:
                    backoff = 0.1
                logger.warning("listening for lane wake-ups failed (consumers poll meanwhile), retrying in %.1fs: %s",
                               backoff, e)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                pubsub.close()
