"""Handlers for the bridge's integration tests, configured through the environment.

Each handler invocation appends a start event and an end event to one Redis list, so a test can
check order, overlap, duplicates and completeness from a single totally ordered history.

  KDB_TEST_TOPICS       comma-separated topics (required)
  KDB_TEST_ORDERING     partition | key | none (default partition)
  KDB_TEST_SLEEP_MS     "N" or "LOW-HIGH" (random) milliseconds per record (default 0)
  KDB_TEST_FAIL_KEYS    comma-separated record keys whose every attempt raises
  KDB_TEST_MAX_RETRIES  dramatiq max_retries (default 0)
  KDB_TEST_BACKOFF_MS   dramatiq min_backoff and max_backoff as "MIN-MAX" (default 20-100)
  KDB_TEST_SLOW_KEYS    comma-separated KEY=MS: records with that key take that long (over KDB_TEST_SLEEP_MS)
  KDB_TEST_EVENTS       Redis list of events (default kdb-test:events)
  KDB_TEST_VALUE_CODEC  the handler's value codec (default bytes)
  KDB_TEST_DLQ          dead-letter topic: a name, "off", or unset for the default
  KDB_TEST_FAIL_SET     Redis set of record keys whose attempts raise, read on every call
  KDB_TEST_RABBITMQ_URL the task broker is RabbitMQ at this URL (default: Redis at BRIDGE_REDIS_URL)
  KDB_TEST_BROKER_URL   Redis of the task broker and the history (default BRIDGE_REDIS_URL, the ledger)
  KDB_TEST_HISTORY_URL  Redis of the history (default the task broker's)
  KDB_TEST_PROTOCOL_VERSION  the protocol version a bridge writes (a later release's, for upgrade tests)
  KDB_TEST_KILL_KEYS    comma-separated record keys whose handler SIGKILLs its own worker process (each
                        kill first counts itself in the Redis counter KDB_TEST_EVENTS + ":kills")
  KDB_TEST_MAX_REDISPATCHES  the handler's max_redispatches ("none": no limit; default: the handler's)
  KDB_TEST_BROKER_HEARTBEAT_MS  the Redis broker's heartbeat_timeout, with maintenance on every call: a
                        dead worker's unacknowledged messages come back that soon (dramatiq: 60 s, by chance)
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker
from dramatiq.middleware import CurrentMessage

from bridge import Record, kafka_handler, protocol

if os.environ.get("KDB_TEST_PROTOCOL_VERSION"):
    # A bridge of a later release: its messages carry a protocol version today's workers refuse.
    protocol.VERSION = int(os.environ["KDB_TEST_PROTOCOL_VERSION"])

URL = os.environ["BRIDGE_REDIS_URL"]
#: The Redis of the task broker and of the test's history when the ledger is another one.
TASKS_URL = os.environ.get("KDB_TEST_BROKER_URL") or URL
#: KDB_TEST_RABBITMQ_URL puts the lanes on RabbitMQ (the ledger and the test's history stay in Redis).
RABBITMQ_URL = os.environ.get("KDB_TEST_RABBITMQ_URL")
broker: dramatiq.Broker
if RABBITMQ_URL:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=RABBITMQ_URL)
else:
    _heartbeat = os.environ.get("KDB_TEST_BROKER_HEARTBEAT_MS")
    _timing = {"heartbeat_timeout": int(_heartbeat), "maintenance_chance": MAINTENANCE_SCALE} if _heartbeat else {}
    broker = RedisBroker(url=TASKS_URL, **_timing)
broker.add_middleware(CurrentMessage())
dramatiq.set_broker(broker)

#: KDB_TEST_HISTORY_URL keeps the history apart from a Redis the test wipes (default TASKS_URL).
_events = redis.Redis.from_url(os.environ.get("KDB_TEST_HISTORY_URL") or TASKS_URL)
EVENTS = os.environ.get("KDB_TEST_EVENTS", "kdb-test:events")
_sleep = os.environ.get("KDB_TEST_SLEEP_MS", "0")
_low, _, _high = _sleep.partition("-")
SLEEP = (float(_low) / 1000, float(_high or _low) / 1000)
FAIL_KEYS = {k.encode() for k in os.environ.get("KDB_TEST_FAIL_KEYS", "").split(",") if k}
FAIL_SET = os.environ.get("KDB_TEST_FAIL_SET")
KILL_KEYS = {k.encode() for k in os.environ.get("KDB_TEST_KILL_KEYS", "").split(",") if k}
SLOW_KEYS = {
    key.encode(): float(ms) / 1000
    for key, _, ms in (item.partition("=") for item in os.environ.get("KDB_TEST_SLOW_KEYS", "").split(",") if item)
}
_min_backoff, _, _max_backoff = os.environ.get("KDB_TEST_BACKOFF_MS", "20-100").partition("-")


class Planned(Exception):
    """The failure a test asked for."""


_dlq = os.environ.get("KDB_TEST_DLQ")
_options: dict[str, Any] = {}
if os.environ.get("KDB_TEST_MAX_REDISPATCHES"):
    _limit = os.environ["KDB_TEST_MAX_REDISPATCHES"]
    _options["max_redispatches"] = None if _limit == "none" else int(_limit)


@kafka_handler(
    [t for t in os.environ["KDB_TEST_TOPICS"].split(",") if t],
    ordering=os.environ.get("KDB_TEST_ORDERING", "partition"),  # type: ignore[arg-type]
    value_codec=os.environ.get("KDB_TEST_VALUE_CODEC", "bytes"),  # type: ignore[arg-type]
    dead_letter_topic=True if _dlq is None else False if _dlq == "off" else _dlq,
    **_options,
)
@dramatiq.actor(
    max_retries=int(os.environ.get("KDB_TEST_MAX_RETRIES", "0")),
    min_backoff=int(_min_backoff),
    max_backoff=int(_max_backoff or _min_backoff),
)
def record_event(record: Record) -> None:
    if record.key in KILL_KEYS:
        _events.incr(EVENTS + ":kills")
        os.kill(os.getpid(), signal.SIGKILL)
    key = (record.key or b"").decode("utf-8", "backslashreplace")
    message = CurrentMessage.get_current_message()
    epoch = message.options.get("kdb", {}).get("e", 0) if message else 0
    coords = f"{record.topic}|{record.partition}|{record.offset}|{key}|{os.getpid()}|{epoch}"
    token = uuid.uuid4().hex[:12]
    try:
        _events.rpush(EVENTS, f"S|{coords}|{int(time.time() * 1000)}|{token}")
    except redis.RedisError:
        # The start may have landed although the client gave up waiting: mark it void.
        _record_end(f"X|{coords}|{int(time.time() * 1000)}|{token}")
        raise
    outcome = "ok"
    try:
        if SLEEP[1] > 0:
            time.sleep(random.uniform(*SLEEP))
        if record.key in SLOW_KEYS:
            time.sleep(SLOW_KEYS[record.key])
        if record.key in FAIL_KEYS or (FAIL_SET and record.key and _events.sismember(FAIL_SET, record.key)):
            outcome = "fail"
            raise Planned(f"planned failure of {record.topic}[{record.partition}]@{record.offset}")
        if record.headers:
            _events.rpush(EVENTS + ":records", repr(record))
    finally:
        _record_end(f"E|{coords}|{int(time.time() * 1000)}|{token}|{outcome}")


def _record_end(event: str) -> None:
    """Append an end event even across a Redis outage, so that the history stays complete."""
    deadline = time.monotonic() + 120
    while True:
        try:
            _events.rpush(EVENTS, event)
            return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
