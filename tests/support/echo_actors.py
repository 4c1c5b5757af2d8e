"""Actors for worker tests, loaded by the stock ``dramatiq`` CLI in a subprocess.

Needs ``ECHO_ACTORS_REDIS_URL`` at import. Tests do not import this module: they
enqueue ``dramatiq.Message(queue_name="echo", actor_name="echo", args=(n,), ...)``
through their own broker, so no global dramatiq broker changes in the test process.
"""

from __future__ import annotations

import os

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

REDIS_URL = os.environ["ECHO_ACTORS_REDIS_URL"]
RESULTS_KEY = "echo:results"

broker = RedisBroker(url=REDIS_URL)  # type: ignore[no-untyped-call]
dramatiq.set_broker(broker)
_results = redis.Redis.from_url(REDIS_URL)


@dramatiq.actor(queue_name="echo", max_retries=0)
def echo(n: int) -> None:
    """Record that message ``n`` was processed, and by which worker process."""
    _results.hset(RESULTS_KEY, str(n), os.getpid())
