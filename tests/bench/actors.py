"""Actors of the benchmark, configured through the environment (read at import in every process).

  BRIDGE_REDIS_URL    the bridge's ledger, and the dramatiq broker unless KDB_BENCH_BROKER_URL is set; required
  KDB_BENCH_BROKER_URL  the dramatiq broker's Redis, when it is not the ledger's (C1 keeps them apart to
                      count each one's commands); the tally is written there too
  KDB_BENCH_TOPIC     topic of the Kafka handler; unset: no handler is registered (stock baseline,
                      naive loop), so those processes run plain dramatiq without the bridge
  KDB_BENCH_ORDERING  partition | key | none (default none)
  KDB_BENCH_SLEEP_MS  milliseconds the handler sleeps per record (default 0)
  KDB_BENCH_RABBITMQ_URL  the task broker is RabbitMQ at this URL (the ledger stays in Redis)
  KDB_BENCH_LATENCY   Redis list receiving "<record timestamp ms> <produce->handler start ms>" per
                      record; unset (throughput scenarios): no per-record Redis write at all
  KDB_BENCH_EVENTS    Redis list receiving "<partition> <offset> <start ms> <end ms>" per record,
                      written in batches with the tally (the order check of P7); unset: none
  KDB_BENCH_RPUSH     Redis list the handler appends each record's value to, with one RPUSH per
                      call (B1); unset: none
  KDB_BENCH_BATCH_SIZE     makes the handler a batch handler (``batch_size``), B1; unset: per record
  KDB_BENCH_BATCH_TIMEOUT  its ``batch_timeout`` in seconds (default 1.0)

Completion is counted in memory per worker process (count, first handler start, last handler end)
and written to the Redis hash ``bench:tally`` by a background thread every 20 ms, so the no-op
path of the throughput scenarios costs a lock and three assignments instead of a Redis round trip.
Each value also counts the writes made so far, so that C1 can leave them out of Redis's figures.
The per-record events, when asked for, ride on the same thread.

``plain_timed(sent_ms, key)`` is the stock baseline of the latency scenarios: it appends
"<sent ms> <send->handler start ms>" to the Redis list ``key``. ``plain_rpush(value, key)`` is the
stock baseline of B1: one RPUSH of ``value`` to ``key`` per message.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from bridge import Record, kafka_handler

#: Redis hash: worker pid -> "count first_start_ms last_end_ms".
TALLY_KEY = "bench:tally"
#: Queue of the plain actor used by the stock baseline and the naive loop.
PLAIN_QUEUE = "bench"

URL = os.environ.get("KDB_BENCH_BROKER_URL") or os.environ["BRIDGE_REDIS_URL"]
broker: dramatiq.Broker
if os.environ.get("KDB_BENCH_RABBITMQ_URL"):
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=os.environ["KDB_BENCH_RABBITMQ_URL"])
else:
    broker = RedisBroker(url=URL)  # type: ignore[no-untyped-call]
dramatiq.set_broker(broker)

TOPIC = os.environ.get("KDB_BENCH_TOPIC", "")
ORDERING = os.environ.get("KDB_BENCH_ORDERING", "none")
SLEEP = float(os.environ.get("KDB_BENCH_SLEEP_MS", "0")) / 1000
LATENCY = os.environ.get("KDB_BENCH_LATENCY", "")
EVENTS = os.environ.get("KDB_BENCH_EVENTS", "")
RPUSH = os.environ.get("KDB_BENCH_RPUSH", "")
BATCH_SIZE = int(os.environ.get("KDB_BENCH_BATCH_SIZE") or 0)
BATCH_TIMEOUT = float(os.environ.get("KDB_BENCH_BATCH_TIMEOUT") or 1.0)

_redis = redis.Redis.from_url(URL)


class _Tally:
    """Per-process completion counter, flushed to Redis off the handler's path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.first_start = 0.0
        self.last_end = 0.0
        self.events: list[str] = []
        self._flusher: threading.Thread | None = None

    def add(self, started: float, ended: float, event: str | None = None, count: int = 1) -> None:
        with self._lock:
            self.count += count
            if not self.first_start or started < self.first_start:
                self.first_start = started
            self.last_end = max(self.last_end, ended)
            if event is not None:
                self.events.append(event)
            if self._flusher is None:
                # Started on first use: the dramatiq parent process never runs actors.
                self._flusher = threading.Thread(target=self._flush_loop, name="bench-tally", daemon=True)
                self._flusher.start()

    def _flush_loop(self) -> None:
        field = str(os.getpid())
        written, writes = -1, 0
        while True:
            time.sleep(0.02)
            with self._lock:
                count, first, last = self.count, self.first_start, self.last_end
                events, self.events = self.events, []
            if count == written:
                continue
            try:
                # The events before the tally: a reader that sees the count also sees the events.
                if events:
                    _redis.rpush(EVENTS, *events)
                    events = []
                writes += 1
                _redis.hset(TALLY_KEY, field, f"{count} {first * 1000:.3f} {last * 1000:.3f} {writes}")
                written = count
            except redis.RedisError:
                with self._lock:  # the next round writes the newer value, and these events first
                    self.events[:0] = events


_tally = _Tally()


@dramatiq.actor(queue_name=PLAIN_QUEUE)
def plain_noop(*args: Any) -> None:
    """The stock-dramatiq baseline's no-op (and what the naive loop sends)."""
    now = time.time()
    _tally.add(now, now)


@dramatiq.actor(queue_name=PLAIN_QUEUE)
def plain_timed(sent_ms: float, key: str) -> None:
    """The stock baseline of the latency scenarios: send -> handler start, one Redis write."""
    started = time.time()
    _redis.rpush(key, f"{sent_ms:.3f} {started * 1000 - sent_ms:.3f}")
    _tally.add(started, time.time())


@dramatiq.actor(queue_name=PLAIN_QUEUE)
def plain_rpush(value: str, key: str) -> None:
    """The stock baseline of B1: one record's value, one RPUSH."""
    started = time.time()
    _redis.rpush(key, value)
    _tally.add(started, time.time())


if TOPIC and BATCH_SIZE:

    @kafka_handler(TOPIC, ordering=ORDERING, batch_size=BATCH_SIZE, batch_timeout=BATCH_TIMEOUT)  # type: ignore[arg-type]
    @dramatiq.actor
    def bench_batch_handler(records: list[Record]) -> None:
        """B1's batch mode: one RPUSH of every value of the batch."""
        started = time.time()
        if RPUSH:
            _redis.rpush(RPUSH, *[r.value for r in records])
        if SLEEP:
            time.sleep(SLEEP)
        _tally.add(started, time.time(), count=len(records))

elif TOPIC:

    @kafka_handler(TOPIC, ordering=ORDERING)  # type: ignore[arg-type]
    @dramatiq.actor
    def bench_handler(record: Record) -> None:
        started = time.time()
        if LATENCY and record.timestamp is not None:
            _redis.rpush(LATENCY, f"{record.timestamp} {started * 1000 - record.timestamp:.3f}")
        if RPUSH:
            _redis.rpush(RPUSH, record.value)
        if SLEEP:
            time.sleep(SLEEP)
        ended = time.time()
        event = f"{record.partition} {record.offset} {started * 1000:.3f} {ended * 1000:.3f}" if EVENTS else None
        _tally.add(started, ended, event)
