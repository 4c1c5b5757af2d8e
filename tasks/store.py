"""Where the example handlers put their results: a capped Redis list per handler, and a log line."""

import logging
import os
from functools import cache

import redis

from bridge import Record

logger = logging.getLogger("tasks")


@cache
def _client() -> "redis.Redis":
    return redis.Redis.from_url(os.environ.get("BRIDGE_REDIS_URL", "redis://localhost:6379/0"))


def remember(kind: str, record: Record | None, summary: str) -> None:
    where = f"{record.topic}[{record.partition}]@{record.offset}" if record is not None else "direct"
    line = f"{where} {summary}"
    with _client().pipeline() as pipe:
        pipe.lpush(f"tasks:{kind}", line)
        pipe.ltrim(f"tasks:{kind}", 0, 999)
        pipe.incr(f"tasks:{kind}:count")
        pipe.execute()
    logger.debug(line)
