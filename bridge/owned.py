"""The partitions a bridge owns, and what each room of the loop keeps about each of them.

A partition's state is split by who writes it: the delivery window (:class:`PartitionState`,
intake, dispatch and completions), its assignment (:class:`Assignment`, only
:mod:`bridge.assignments`), its commit marks (:class:`Marks`, only :mod:`bridge.commit`), its
final failures on their way to a dead-letter topic (:class:`Letters`, only
:mod:`bridge.deadletter`), whether it is paused (only :mod:`bridge.flow`) and whether an operator
holds it (only :mod:`bridge.control`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TopicPartition

from .keys import PartitionKeys
from .partition import Entry, PartitionState
from .registry import Handler

TP = tuple[str, int]


@dataclass(slots=True)
class Assignment:
    """Where the partition's ownership stands (written by the assignments room)."""

    #: Its epoch could not be recorded yet (the ledger did not answer at assignment).
    needs_setup: bool = False
    #: Waiting for records of an older assignment before dispatching.
    handing_over: bool = True
    handover_deadline: float = 0.0
    #: No handover before this time (after a ledger loss, workers need a heartbeat to register
    #: the records they are running again).
    handover_after: float = 0.0
    waiting_logged: bool = False
    #: The ledger shows a newer owner: neither dispatch nor commit until Kafka revokes it.
    fenced: bool = False


@dataclass(slots=True)
class Marks:
    """Commit bookkeeping (written by the commit room): the offset Kafka confirmed, the one last
    asked for, and the one the ledger was pruned below."""

    confirmed: int = -1
    requested: int = -1
    pruned: int = -1


@dataclass(slots=True)
class Letters:
    """Final failures (written by the dead-letter room)."""

    #: On their way to the dead-letter topic, by offset.
    failing: dict[int, Entry] = field(default_factory=dict)
    #: Recorded under an older assignment for records not delivered yet: dead-lettered as they
    #: arrive, never run again.
    adopted: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class Owned:
    """A partition this bridge owns."""

    topic: str
    partition: int
    handler: Handler
    keys: PartitionKeys
    lane: str
    window: int
    dead_letter_topic: str | None
    #: Ordered mode on dramatiq's Redis or RabbitMQ broker: records behind an unfinished one are
    #: staged in the ledger, and the worker that finishes a record starts the next itself.
    stages: bool
    state: PartitionState
    #: The offset the assignment started at (-1: none committed, the handler's offset reset).
    start_offset: int
    assignment: Assignment = field(default_factory=Assignment)
    marks: Marks = field(default_factory=Marks)
    letters: Letters = field(default_factory=Letters)
    paused: bool = False
    #: Paused by an operator (``kafka-dramatiq-bridge pause``): nothing of it is dispatched.
    held: bool = False

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def key(self) -> TP:
        return (self.topic, self.partition)

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]"

    @property
    def active(self) -> bool:
        """It may dispatch: set up, handed over, not fenced, not held by an operator."""
        a = self.assignment
        return not (a.needs_setup or a.handing_over or a.fenced or self.held)


class Partitions:
    """The partitions owned now, by (topic, partition). Only the assignments room adds and
    removes; every room reads."""

    def __init__(self) -> None:
        self._owned: dict[TP, Owned] = {}

    def __iter__(self) -> Iterator[Owned]:
        return iter(list(self._owned.values()))

    def __len__(self) -> int:
        return len(self._owned)

    def __contains__(self, key: object) -> bool:
        return key in self._owned

    def get(self, topic: str | None, partition: int | None) -> Owned | None:
        return self._owned.get((topic, partition)) if topic is not None and partition is not None else None

    def add(self, owned: Owned) -> None:
        self._owned[owned.key] = owned

    def remove(self, key: TP) -> Owned | None:
        return self._owned.pop(key, None)

    def dispatched_open(self) -> int:
        """Records dispatched and not yet in a final state, over all partitions."""
        return sum(o.state.dispatched_open for o in self._owned.values())

    def open(self) -> int:
        """Records held and not yet done, over all partitions."""
        return sum(o.state.open for o in self._owned.values())

    def failing(self) -> int:
        return sum(len(o.letters.failing) for o in self._owned.values())
