"""A batch handler that writes the history of tests/support/bridge_actors.py, for the reliability
scenarios: a start and an end event per record of a call, every record of one call sharing the
call's token (the checker treats one call as one run).

  KDB_TEST_TOPICS         comma-separated topics (required)
  KDB_TEST_ORDERING       partition | key | none (default partition)
  KDB_TEST_SLEEP_MS       "N" or "LOW-HIGH" (random) milliseconds per call (default 0)
  KDB_TEST_BATCH_SIZE     batch_size (default 50)
  KDB_TEST_BATCH_TIMEOUT  batch_timeout in seconds (default 0.2)
  KDB_TEST_BATCH_BY       batch_by (default partition)
  KDB_TEST_EVENTS         Redis list of events (default kdb-test:events)
"""

from __future__ import annotations

import os
import random
import time
import uuid

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage

from bridge import Record, kafka_handler

URL = os.environ["BRIDGE_REDIS_URL"]
broker = RedisBroker(url=URL)
broker.add_middleware(CurrentMessage())
dramatiq.set_broker(broker)

_events = redis.Redis.from_url(URL)
EVENTS = os.environ.get("KDB_TEST_EVENTS", "kdb-test:events")
_low, _, _high = os.environ.get("KDB_TEST_SLEEP_MS", "0").partition("-")
SLEEP = (float(_low) / 1000, float(_high or _low) / 1000)


def _epochs(message: dramatiq.Message[object] | None) -> dict[int, int]:
    """Partition -> the assignment epoch its records came under (each part's own in a topic batch)."""
    meta = message.options.get("kdb", {}) if message is not None else {}
    if meta.get("ps"):
        return {int(p): int(e) for p, e, _, _ in meta["ps"]}
    return {int(meta.get("p", -1)): int(meta.get("e", 0))}


@kafka_handler(
    [t for t in os.environ["KDB_TEST_TOPICS"].split(",") if t],
    ordering=os.environ.get("KDB_TEST_ORDERING", "partition"),  # type: ignore[arg-type]
    batch_size=int(os.environ.get("KDB_TEST_BATCH_SIZE", "50")),
    batch_timeout=float(os.environ.get("KDB_TEST_BATCH_TIMEOUT", "0.2")),
    batch_by=os.environ.get("KDB_TEST_BATCH_BY", "partition"),  # type: ignore[arg-type]
)
@dramatiq.actor(max_retries=0)
def record_batch_events(records: list[Record]) -> None:
    epochs = _epochs(CurrentMessage.get_current_message())
    token, pid = uuid.uuid4().hex[:12], os.getpid()
    coords = [
        f"{r.topic}|{r.partition}|{r.offset}|{(r.key or b'').decode('utf-8', 'backslashreplace')}|{pid}|"
        f"{epochs.get(r.partition, 0)}"
        for r in records
    ]
    started = int(time.time() * 1000)
    _events.rpush(EVENTS, *[f"S|{c}|{started}|{token}" for c in coords])
    if SLEEP[1] > 0:
        time.sleep(random.uniform(*SLEEP))
    ended = int(time.time() * 1000)
    _events.rpush(EVENTS, *[f"E|{c}|{ended}|{token}|ok" for c in coords])
