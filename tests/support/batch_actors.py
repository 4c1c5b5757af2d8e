"""A batch handler for the integration tests, configured through the environment.

Each call appends a start event and an end event for each partition's records in it (one
partition, or several with ``batch_by="topic"``) to one Redis list:
``S|topic|partition|offsets|pid|token|ms`` and ``E|topic|partition|offsets|pid|token|ms|outcome``
(``offsets`` comma-separated; ``token`` is ``<call>-<partition>``), so a test can check order
across batches, overlap, completeness and batch sizes from one totally ordered history. The
encoded size of each message goes to ``kdb-test:sizes``.

  KDB_TEST_TOPICS         comma-separated topics (required)
  KDB_TEST_BATCH_SIZE     batch_size (default 100)
  KDB_TEST_BATCH_TIMEOUT  batch_timeout in seconds (default 0.2)
  KDB_TEST_BATCH_BY       batch_by (default partition)
  KDB_TEST_ORDERING       partition | key | none (default partition)
  KDB_TEST_SLEEP_MS       milliseconds per call (default 0)
  KDB_TEST_FAIL_KEYS      record keys named in BatchFailed on every attempt
  KDB_TEST_RAISE_KEYS     record keys whose presence makes the whole call raise on every attempt
  KDB_TEST_MAX_RETRIES    dramatiq max_retries (default 0)
  KDB_TEST_EVENTS         Redis list of events (default kdb-test:events)
"""

from __future__ import annotations

import os
import time
import uuid

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage

from bridge import BatchFailed, Record, kafka_handler

URL = os.environ["BRIDGE_REDIS_URL"]
broker = RedisBroker(url=URL)
broker.add_middleware(CurrentMessage())
dramatiq.set_broker(broker)

_events = redis.Redis.from_url(URL)
EVENTS = os.environ.get("KDB_TEST_EVENTS", "kdb-test:events")
SLEEP = float(os.environ.get("KDB_TEST_SLEEP_MS", "0")) / 1000
FAIL_KEYS = {k.encode() for k in os.environ.get("KDB_TEST_FAIL_KEYS", "").split(",") if k}
RAISE_KEYS = {k.encode() for k in os.environ.get("KDB_TEST_RAISE_KEYS", "").split(",") if k}


class Planned(Exception):
    """The failure a test asked for."""


@kafka_handler(
    [t for t in os.environ["KDB_TEST_TOPICS"].split(",") if t],
    ordering=os.environ.get("KDB_TEST_ORDERING", "partition"),  # type: ignore[arg-type]
    batch_size=int(os.environ.get("KDB_TEST_BATCH_SIZE", "100")),
    batch_timeout=float(os.environ.get("KDB_TEST_BATCH_TIMEOUT", "0.2")),
    batch_by=os.environ.get("KDB_TEST_BATCH_BY", "partition"),  # type: ignore[arg-type]
)
@dramatiq.actor(max_retries=int(os.environ.get("KDB_TEST_MAX_RETRIES", "0")), min_backoff=20, max_backoff=100)
def record_batch(records: list[Record]) -> None:
    parts: dict[tuple[str, int], list[Record]] = {}
    for r in records:
        parts.setdefault((r.topic, r.partition), []).append(r)
    call = uuid.uuid4().hex[:12]
    coords = {
        tp: f"{tp[0]}|{tp[1]}|{','.join(str(r.offset) for r in found)}|{os.getpid()}|{call}-{tp[1]}"
        for tp, found in parts.items()
    }
    started = int(time.time() * 1000)
    _events.rpush(EVENTS, *[f"S|{c}|{started}" for c in coords.values()])
    message = CurrentMessage.get_current_message()
    if message is not None:
        _events.rpush(EVENTS.replace("events", "sizes"), len(message.encode()))
    first = records[0]
    outcomes = dict.fromkeys(parts, "ok")
    try:
        if SLEEP:
            time.sleep(SLEEP)
        if any(r.key in RAISE_KEYS for r in records):
            outcomes = dict.fromkeys(parts, "raise")
            raise Planned(f"planned failure of the batch at {first.topic}[{first.partition}]@{first.offset}")
        failed = {r: Planned(f"planned failure of {r.offset}") for r in records if r.key in FAIL_KEYS}
        if failed:
            for tp in parts:
                named = [str(r.offset) for r in failed if (r.topic, r.partition) == tp]
                if named:
                    outcomes[tp] = "partial:" + ",".join(named)
            raise BatchFailed(failed)
    finally:
        ended = int(time.time() * 1000)
        _events.rpush(EVENTS, *[f"E|{c}|{ended}|{outcomes[tp]}" for tp, c in coords.items()])
