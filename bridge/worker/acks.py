"""Acknowledgements of lane messages on dramatiq's Redis broker, written in batches.

dramatiq's Redis consumer acknowledges each message with a round trip of its own, in the worker
thread that ran it, before that thread takes its next message. On a lane that round trip costs the
workers more CPU than the record's own hooks: the thread blocks on the socket and is woken for the
answer. A lane message's acknowledgement decides nothing, since the ledger says whether its record
is done, so here a process's acknowledgements go in batches: one round trip per batch, written by
one thread a few milliseconds after the first of them.

If the process dies before a batch is written, dramatiq puts those messages back on their lanes
once the process's broker heartbeat is stale, as it does with any message a dead worker fetched;
the worker that fetches one finds the record done in the ledger and skips it without running it.

The dramatiq behaviour this relies on, in one place (the same in 1.17 and 2.x):

- the Redis broker keeps a fetched message's id in the set ``<namespace>:__acks__.<broker_id>.<queue>``
  and its body in the hash ``<namespace>:<queue>.msgs`` until it is acknowledged; its ``ack``
  removes the id, and the body if the id was there;
- its consumer counts the messages it fetched and has not acknowledged against its prefetch, in
  ``queued_message_ids``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from dramatiq.brokers.redis import RedisBroker

logger = logging.getLogger("bridge.worker")

#: How long the first acknowledgement of a batch waits for others.
LINGER = 0.01

# KEYS: pairs of (ack set, message hash) per queue; ARGV: per queue its count of ids, then the ids.
_ACK = """
local at = 1
for k = 1, #KEYS, 2 do
  local n = tonumber(ARGV[at])
  for i = at + 1, at + n do
    if redis.call("srem", KEYS[k], ARGV[i]) > 0 then
      redis.call("hdel", KEYS[k + 1], ARGV[i])
    end
  end
  at = at + n + 1
end
return at
"""


class Acks:
    """One per worker process and broker. Thread-safe: worker threads call :meth:`add`."""

    def __init__(self, broker: RedisBroker, linger: float = LINGER) -> None:
        self._client = broker.client
        self._namespace: str = broker.namespace
        self._broker_id: str = broker.broker_id
        self._script = self._client.register_script(_ACK)
        self._linger = linger
        self._lock = threading.Condition()
        self._pending: dict[str, list[str]] = {}
        self._idle = False
        self._stopping = False
        self._flusher: threading.Thread | None = None

    def add(self, queue: str, message_id: str) -> None:
        """Acknowledge the message ``message_id`` (its ``redis_message_id``) of ``queue`` with the
        next batch; returns at once."""
        with self._lock:
            if self._flusher is None or not self._flusher.is_alive():
                # Started with the first acknowledgement, and again after a worker restart in this process.
                self._stopping = False
                self._flusher = threading.Thread(target=self._flush, name="kdb-acks", daemon=True)
                self._flusher.start()
            self._pending.setdefault(queue, []).append(message_id)
            if self._idle:
                self._idle = False
                self._lock.notify()

    def pending(self) -> int:
        with self._lock:
            return sum(map(len, self._pending.values()))

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending and stop."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
            flusher = self._flusher
        if flusher is not None:
            flusher.join(timeout)

    def _flush(self) -> None:
        backoff = 0.0
        while True:
            with self._lock:
                while not self._pending and not self._stopping:
                    self._idle = True
                    self._lock.wait()
                self._idle = False
                if not self._stopping:
                    # Woken once per batch: the acknowledgements that come meanwhile go with it.
                    self._lock.wait(max(self._linger, backoff))
                taken, self._pending = self._pending, {}
                stopping = self._stopping
            if taken:
                try:
                    self._write(taken)
                    backoff = 0.0
                except redis.RedisError as e:
                    backoff = min(backoff * 2 or 0.1, 5.0)
                    count = sum(map(len, taken.values()))
                    if stopping:
                        # Left in the broker's ack sets: dramatiq puts them back on their lanes once this
                        # process's heartbeat is stale, and the records are found done and skipped.
                        logger.warning("acknowledging %d lane messages failed at shutdown: %s", count, e)
                        return
                    logger.error("acknowledging %d lane messages failed, retrying in %.1fs: %s", count, backoff, e)
                    with self._lock:
                        for queue, ids in taken.items():
                            self._pending.setdefault(queue, [])[:0] = ids
            elif stopping:
                return

    def _write(self, taken: dict[str, list[str]]) -> None:
        keys: list[str] = []
        args: list[Any] = []
        acks = f"{self._namespace}:__acks__.{self._broker_id}."
        for queue, ids in taken.items():
            keys += (acks + queue, f"{self._namespace}:{queue}.msgs")
            args.append(len(ids))
            args += ids
        self._script(keys=keys, args=args)
