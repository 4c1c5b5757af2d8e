"""Batch handlers as a team would write them, for the testing kit's tests: its own Redis broker (on a
port nothing listens on: the kit must never reach it).

``clicks``: batches of up to 3 records of one partition; a record ``{"fail": true}`` is named in
:class:`~bridge.BatchFailed` on every attempt. ``pings``: up to 4 records of any of the topic's
partitions in one call (``batch_by="topic"``).
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import default_middleware

from bridge import BatchFailed, Record, kafka_handler

broker = RedisBroker(url="redis://127.0.0.1:9/0",
                     middleware=[m() for m in default_middleware if m.__name__ != "Prometheus"])
dramatiq.set_broker(broker)

#: The offsets each call got, as the handlers saw them.
calls: list[list[tuple[int, int]]] = []


def reset() -> None:
    calls.clear()


@kafka_handler("clicks", value_codec="json", batch_size=3, batch_timeout=0.05)
@dramatiq.actor(max_retries=1, min_backoff=60_000)
def count_clicks(records: list[Record]) -> None:
    calls.append([(r.partition, r.offset) for r in records])
    failed = {r: ValueError(f"click {r.offset} is malformed") for r in records if r.value.get("fail")}
    if failed:
        raise BatchFailed(failed)


@kafka_handler("pings", batch_size=4, batch_timeout=0.05, batch_by="topic")
@dramatiq.actor
def store_pings(records: list[Record]) -> None:
    calls.append([(r.partition, r.offset) for r in records])
