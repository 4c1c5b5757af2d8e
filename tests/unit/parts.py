"""Building blocks for testing one room of the loop at a time: an owned partition, settings, a
fakeredis ledger, and recording stand-ins for the neighbouring rooms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dramatiq
import fakeredis
from dramatiq.brokers.stub import StubBroker

from bridge.keys import PartitionKeys, lane_name
from bridge.ledger import Ledger
from bridge.owned import Owned
from bridge.partition import Entry, PartitionState
from bridge.registry import Handler, Ordering
from bridge.settings import Settings, load_settings

GROUP = "g"
T = "orders"


def settings(**overrides: Any) -> Settings:
    return load_settings(**{"group_id": GROUP, "http_port": 0, **overrides})


def ledger() -> Ledger:
    return Ledger(fakeredis.FakeRedis(decode_responses=True))


def handler(broker: dramatiq.Broker | None = None, ordering: Ordering = "none", **options: Any) -> Handler:
    """A handler of topic T over an actor on ``broker`` (a StubBroker of its own by default)."""
    actor: dramatiq.Actor[Any, Any] = dramatiq.Actor(
        lambda record: None, broker=broker or StubBroker(), actor_name=f"handle_{ordering}", queue_name="default",
        priority=0, options={},
    )
    defaults: dict[str, Any] = {
        "message_format": "record", "key_codec": "bytes", "value_codec": "bytes", "offset_reset": "earliest",
        "window": None,
    }
    return Handler(actor, (T,), ordering, **{**defaults, **options})


def owned(
    partition: int = 0, *, ordering: Ordering = "none", epoch: int = 1, window: int = 100, stages: bool = False,
    broker: dramatiq.Broker | None = None, dead_letter_topic: str | None = f"{T}.dlq", active: bool = True,
) -> Owned:
    """A partition owned since offset 0, handed over (it may dispatch) unless ``active`` is False."""
    result = Owned(
        topic=T,
        partition=partition,
        handler=handler(broker, ordering),
        keys=PartitionKeys(GROUP, T, partition),
        lane=lane_name(GROUP, T, partition),
        window=window,
        dead_letter_topic=dead_letter_topic,
        stages=stages,
        state=PartitionState(ordering=ordering, epoch=epoch, start_offset=0, depth=32),
        start_offset=0,
    )
    result.assignment.handing_over = not active
    return result


def deliver(partition: Owned, *offsets: int, size: int = 10, key: bytes | None = b"k") -> list[Entry]:
    return [
        partition.state.deliver(o, key, {"kdb": 1, "t": T, "p": partition.partition, "o": o}, size) for o in offsets
    ]


@dataclass
class RecordingRouter:
    """Stands in for the dead-letter room: records the final failures routed to it."""

    failed: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)

    def fail(self, partition: Owned, entry: Entry, now: float, reason: str, detail: dict[str, Any]) -> None:
        self.failed.append((entry.offset, reason, detail))
        entry.failure = {**detail, "reason": reason}
        partition.letters.failing[entry.offset] = entry
        partition.state.release(entry)
