"""Which dramatiq queue carries a partition's records: one queue per topic, or one per partition.

The ordering unit is always the partition (or the key), enforced by the ledger; the queue is only
how records reach the workers. Every queue a worker process consumes costs it a polling consumer
thread and a Redis connection (two with the delay queue), so one queue per partition makes idle
workers pay for every partition. With dramatiq's Redis broker an ordered lane holds only records
that may run now (the others are staged in the ledger), so a topic's partitions can share a
queue. With other brokers records waiting for their predecessor are held by the worker that
received them, each holding one of the queue's prefetch slots: sharing one queue between many
partitions could fill every slot with waiters, so ordered handlers there keep a queue per
partition.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from .enqueue import pipelined
from .errors import ConfigurationError
from .keys import lane_name, topic_lane_name
from .registry import Handler
from .settings import LaneSetting

Layout = Literal["topic", "partition"]


def _shareable(handler: Handler) -> bool:
    return handler.ordering == "none" or pipelined(handler.actor.broker)


def layout(setting: LaneSetting, handler: Handler) -> Layout:
    """The layout ``handler``'s topics get under ``BRIDGE_LANES=setting``."""
    if setting != "auto":
        return setting  # check() refused a topic layout an ordered handler cannot share
    return "topic" if _shareable(handler) else "partition"


def check(setting: LaneSetting, handlers: Iterable[Handler]) -> None:
    """Refuse ``BRIDGE_LANES=topic`` for ordered handlers whose broker cannot share a queue safely.

    Raises:
      ConfigurationError: naming the handler and its broker.
    """
    if setting != "topic":
        return
    for handler in handlers:
        if not _shareable(handler):
            raise ConfigurationError(
                f"BRIDGE_LANES=topic: handler {handler.name} ({handler.ordering} ordering) runs on "
                f"{type(handler.actor.broker).__name__}, where records waiting for their predecessor hold "
                "prefetch slots of their queue; one queue per topic needs dramatiq's RedisBroker for ordered "
                "handlers. Use BRIDGE_LANES=auto or partition."
            )


def lane_of(group: str, setting: LaneSetting, handler: Handler, topic: str, partition: int) -> str:
    """The dramatiq queue of ``topic``'s ``partition`` for ``group``."""
    if layout(setting, handler) == "topic":
        return topic_lane_name(group, topic)
    return lane_name(group, topic, partition)
