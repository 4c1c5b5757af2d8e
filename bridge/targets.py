"""What operator commands name on the command line: ``TOPIC``, ``TOPIC:PARTITION``,
``TOPIC:PARTITION:OFFSET``, and an ISO 8601 instant. Each parser is an ``argparse`` type: a value
it refuses ends the command with code 2 and a message saying what was expected."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from datetime import datetime

#: Kafka's rule for topic names: these characters, at most 249 of them.
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


@dataclass(frozen=True, slots=True)
class Target:
    """A topic, one of its partitions, or one record."""

    topic: str
    partition: int | None = None
    offset: int | None = None

    def __str__(self) -> str:
        """As given on the command line: ``orders``, ``orders:3``, ``orders:3:17``."""
        parts = [self.topic, self.partition, self.offset]
        return ":".join(str(p) for p in parts if p is not None)

    @property
    def where(self) -> str:
        """As the logs name it: ``orders``, ``orders[3]``, ``orders[3]@17``."""
        text = self.topic if self.partition is None else f"{self.topic}[{self.partition}]"
        return text if self.offset is None else f"{text}@{self.offset}"


def _parse(text: str, sizes: tuple[int, ...], expected: str) -> Target:
    pieces = text.split(":")
    if len(pieces) not in sizes:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
    topic, numbers = pieces[0], pieces[1:]
    if not _TOPIC.fullmatch(topic):
        raise argparse.ArgumentTypeError(
            f"{text!r}: {topic!r} is not a Kafka topic name (letters, digits, '.', '_', '-'; at most 249)"
        )
    if not all(n.isdigit() for n in numbers):
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}, with whole numbers from 0")
    values = [int(n) for n in numbers] + [None, None]
    return Target(topic, values[0], values[1])


def topic_or_partition(text: str) -> Target:
    """``TOPIC`` or ``TOPIC:PARTITION``."""
    return _parse(text, (1, 2), "TOPIC or TOPIC:PARTITION")


def record(text: str) -> Target:
    """``TOPIC:PARTITION:OFFSET``."""
    return _parse(text, (3,), "TOPIC:PARTITION:OFFSET")


def instant(text: str) -> int:
    """An ISO 8601 time with its offset from UTC (``2026-03-01T10:00:00Z``, ``…+01:00``), as
    milliseconds since the epoch (the unit of Kafka record timestamps)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an ISO 8601 time such as 2026-03-01T10:00:00Z") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give the offset from UTC (2026-03-01T10:00:00Z or 2026-03-01T11:00:00+01:00); a time "
            "without one means something else on each machine"
        )
    return int(moment.timestamp() * 1000)


def offset(text: str) -> int:
    """A Kafka offset: a whole number from 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected an offset, a whole number from 0")
    return int(text)
