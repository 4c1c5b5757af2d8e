"""The one place where the Kafka consumer's configuration is built.

The safety-critical properties are forced here and cannot be overridden (``Settings`` rejects
them in the pass-through, and they are applied last).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from .settings import Settings

#: Forced on every consumer: offsets move only when the bridge commits them, and an
#: out-of-range committed offset is an error instead of a silent reset.
FORCED: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "error",
    "enable.partition.eof": False,
}


def consumer_config(settings: Settings, **callbacks: Any) -> dict[str, Any]:
    """librdkafka configuration of the bridge's consumer."""
    config: dict[str, Any] = {
        "client.id": f"kafka-dramatiq-bridge-{socket.gethostname()}",
        # Fetch no further ahead than the bridge holds anyway, to bound memory.
        "queued.max.messages.kbytes": 16384,
        # Notice partitions added to a topic within half a minute (librdkafka's default is 5).
        "topic.metadata.refresh.interval.ms": 30000,
        # The bridge polls every few milliseconds (handlers run in workers), so a short poll
        # interval costs nothing and bounds how long a join lost in a broker restart can hang.
        "max.poll.interval.ms": 60000,
        # A fetch parked on the broker for librdkafka's default 500 ms measurably delayed other
        # clients' appends on a small broker (a paced producer's append latency: 671 ms -> 1 ms).
        "fetch.wait.max.ms": 100,
        # librdkafka's own log lines go through the bridge's format and secret masking.
        "logger": logging.getLogger("bridge.kafka"),
    }
    if settings.group_protocol == "classic":
        config["partition.assignment.strategy"] = "cooperative-sticky"
    config.update(settings.kafka)
    config.update(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": settings.group_id,
            "group.protocol": settings.group_protocol,
            "isolation.level": settings.isolation_level,
        }
    )
    config.update(FORCED)
    config.update(callbacks)
    return config


def is_cooperative(config: dict[str, Any]) -> bool:
    """Whether assignments change incrementally (cooperative assignor or the KIP-848 protocol)."""
    if config.get("group.protocol") == "consumer":
        return True
    return "cooperative" in str(config.get("partition.assignment.strategy", ""))
