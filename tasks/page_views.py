"""Page views: a batch handler. One call gets up to 200 records of one partition, in offset order,
and writes their counts in one Redis round trip instead of one per record."""

import logging
import os
from collections import Counter
from functools import cache

import dramatiq
import redis

from bridge import BatchFailed, Record, kafka_handler

logger = logging.getLogger("tasks.page_views")


@cache
def _client() -> "redis.Redis":
    return redis.Redis.from_url(os.environ.get("BRIDGE_REDIS_URL", "redis://localhost:6379/0"))


@kafka_handler("page-views", batch_size=200, batch_timeout=0.5, key_codec="text", value_codec="text")
@dramatiq.actor(max_retries=3, min_backoff=200, max_backoff=2000)
def count_page_views(records: list[Record]) -> None:
    # A view without a page is the one record that cannot be counted: it alone is retried and, in
    # the end, dead-lettered; the rest of the batch counts.
    bad = {r: "a page view without a page" for r in records if not r.value}
    pages = Counter(r.value for r in records if r.value)
    with _client().pipeline() as pipe:
        for page, views in pages.items():
            pipe.hincrby("tasks:page-views", page, views)
        pipe.incrby("tasks:page_views:count", len(records) - len(bad))
        pipe.execute()
    first = records[0]
    logger.debug("%s[%d]@%d..%d: %d views", first.topic, first.partition, first.offset, records[-1].offset,
                 len(records))
    if bad:
        raise BatchFailed(bad)
