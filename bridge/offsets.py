"""``reset-offsets``: move a stopped group's committed offsets, and leave the ledger consistent
with the new positions.

Kafka is read and written through a consumer of the group that never joins it (``committed``,
the log's bounds, ``offsets_for_times``, a synchronous ``commit``); Kafka accepts such a commit
only while the group has no member, which makes it the last word on "no bridge runs". The
ledger then forgets the partitions' facts (lua/reset.lua), so the next bridge neither skips
records from the new offset on nor treats them as done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from .consumer import consumer_config
from .errors import BridgeError, CommandRefused, KafkaUnavailable
from .keys import PartitionKeys
from .ledger.control import ControlStore
from .settings import Settings
from .targets import Target

T = TypeVar("T")

#: Errors that can clear while the command waits (a broker starting, a coordinator moving).
_TRANSIENT = frozenset({
    KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR,
})

#: How Kafka refuses a commit from outside the group while it has members.
_GROUP_HAS_MEMBERS = frozenset(
    code for code in (
        KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS,
        getattr(KafkaError, "STALE_MEMBER_EPOCH", None), getattr(KafkaError, "FENCED_MEMBER_EPOCH", None),
    ) if code is not None
)

Position = Literal["earliest", "latest", "offset", "datetime"]


@dataclass(frozen=True, slots=True)
class Move:
    """One partition's committed offset, now and after the reset."""

    topic: str
    partition: int
    current: int | None
    new: int

    def __str__(self) -> str:
        now = "none" if self.current is None else str(self.current)
        return f"{self.topic}[{self.partition}]: {now} -> {self.new}"


class GroupOffsets:
    """A consumer of the group that never joins it. Use as a context manager."""

    def __init__(self, settings: Settings, timeout: float = 10.0) -> None:
        self.settings = settings
        self.timeout = timeout
        # Classic: it never joins, and this client's commits then carry no member (generation -1).
        self.consumer = Consumer({**consumer_config(settings), "group.protocol": "classic"})

    def __enter__(self) -> GroupOffsets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.consumer.close()

    def _ask(self, call: Callable[[float], T], what: str) -> T:
        """``call(seconds)`` until it answers or the timeout passes; serves the client's queue
        between tries, so its log lines come out as they happen."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return call(min(max(deadline - time.monotonic(), 0.1), 1.0))
            except KafkaException as e:
                error = e.args[0]
                if isinstance(error, KafkaError) and error.code() in _TRANSIENT and time.monotonic() < deadline:
                    self.consumer.poll(0.1)
                    continue
                raise KafkaUnavailable(f"cannot reach Kafka at {self.settings.bootstrap_servers} ({what}): {e}") from e
            finally:
                self.consumer.poll(0)

    def partitions(self, target: Target) -> list[int]:
        """The partitions ``target`` names, checked against the topic's metadata.

        Raises:
          CommandRefused: the topic or the partition does not exist.
        """
        metadata = self._ask(lambda t: self.consumer.list_topics(target.topic, timeout=t), "metadata")
        info = metadata.topics.get(target.topic)
        if info is None or info.error is not None or not info.partitions:
            raise CommandRefused(f"topic {target.topic} does not exist", topic=target.topic)
        found = sorted(info.partitions)
        if target.partition is None:
            return found
        if target.partition not in found:
            raise CommandRefused(
                f"{target.topic} has partitions 0-{found[-1]}; there is no partition {target.partition}",
                topic=target.topic, partition=target.partition,
            )
        return [target.partition]

    def committed(self, topic: str, partitions: list[int]) -> dict[int, int | None]:
        """The group's committed offset of each partition; None where it has none."""
        asked = [TopicPartition(topic, p) for p in partitions]
        found = self._ask(lambda t: self.consumer.committed(asked, timeout=t), "committed offsets")
        return {tp.partition: tp.offset if tp.offset >= 0 else None for tp in found}

    def bounds(self, topic: str, partition: int) -> tuple[int, int]:
        """The partition's earliest offset and its end offset."""
        tp = TopicPartition(topic, partition)
        low, high = self._ask(lambda t: self.consumer.get_watermark_offsets(tp, timeout=t),
                              f"offsets of {topic}[{partition}]")
        return int(low), int(high)

    def at_time(self, topic: str, partitions: list[int], ms: int) -> dict[int, int | None]:
        """The first offset of each partition whose timestamp is at or after ``ms``; None where no
        record is that recent."""
        asked = [TopicPartition(topic, p, ms) for p in partitions]
        found = self._ask(lambda t: self.consumer.offsets_for_times(asked, timeout=t), "offsets by time")
        return {tp.partition: tp.offset if tp.offset >= 0 else None for tp in found}

    def commit(self, moves: list[Move]) -> None:
        """Commit the new offsets for the group.

        Raises:
          CommandRefused: the group has members; KafkaUnavailable.
        """
        offsets = [TopicPartition(m.topic, m.partition, m.new) for m in moves]
        try:
            result = self.consumer.commit(offsets=offsets, asynchronous=False) or []
        except KafkaException as e:
            self._refused(e.args[0])
            raise KafkaUnavailable(f"committing the new offsets of group {self.settings.group_id} failed: {e}") from e
        for tp in result:
            if tp.error is not None:
                self._refused(tp.error)
                raise KafkaUnavailable(f"committing {tp.topic}[{tp.partition}] failed: {tp.error}")

    def _refused(self, error: Any) -> None:
        if isinstance(error, KafkaError) and error.code() in _GROUP_HAS_MEMBERS:
            raise CommandRefused(
                f"Kafka refuses to move the offsets of group {self.settings.group_id}: the group has members "
                f"({error.name()}). A consumer of the group is running: a bridge the ledger does not show (another "
                "BRIDGE_REDIS_URL), a bridge stopped without leaving the group (it stays a member until its session "
                "times out, session.timeout.ms: 45 s by default), or another client with this group id. Stop it, or "
                "wait for its session to time out, and run the command again"
            )


def plan(kafka: GroupOffsets, target: Target, position: Position, value: int | None) -> list[Move]:
    """Where each partition of ``target`` moves.

    Raises:
      CommandRefused: an offset outside a partition's log.
    """
    partitions = kafka.partitions(target)
    current = kafka.committed(target.topic, partitions)
    at_time = kafka.at_time(target.topic, partitions, value) if position == "datetime" and value is not None else {}
    moves = []
    for partition in partitions:
        low, high = kafka.bounds(target.topic, partition)
        if position == "earliest":
            new = low
        elif position == "latest":
            new = high
        elif position == "offset":
            assert value is not None
            if not low <= value <= high:
                raise CommandRefused(
                    f"{target.topic}[{partition}]: offset {value} lies outside the log, which holds offsets {low} up "
                    f"to its end offset {high}", topic=target.topic, partition=partition, offset=value,
                )
            new = value
        else:
            found = at_time.get(partition)
            new = high if found is None else found
        moves.append(Move(target.topic, partition, current.get(partition), new))
    return moves


def reset_offsets(
    settings: Settings, store: ControlStore, target: Target, position: Position, value: int | None, *, dry_run: bool
) -> str:
    """Reset the committed offsets of ``target`` for the group (or only show the plan); what was
    done, for the operator.

    Raises:
      CommandRefused: a bridge of the group runs, Kafka refuses, records still run in workers, an
      offset outside the log, a missing topic or partition.
      KafkaUnavailable, LedgerUnavailable.
    """
    group = settings.group_id
    running = store.bridges()
    if running:
        names = ", ".join(f"{b.instance} (seen {b.age_ms / 1000:.1f}s ago)" for b in running)
        raise CommandRefused(
            f"bridges of group {group} are running: {names}; stop every bridge of the group (SIGTERM: it "
            "drains and commits), then reset its offsets"
        )
    live_ms = int(3 * settings.heartbeat_interval * 1000)
    with GroupOffsets(settings) as kafka:
        moves = plan(kafka, target, position, value)
        lines = [f"group {group}:", *(f"  {m}" for m in moves)]
        if dry_run:
            return "\n".join([*lines, "dry run: nothing changed"])
        now = store.now_ms()
        busy = [f"{m.topic}[{m.partition}]@{o}" for m in moves
                for o in store.running(PartitionKeys(group, m.topic, m.partition), now, live_ms)]
        if busy:
            raise CommandRefused(f"{_still_running(busy)}; wait until they finished (`status` shows them as "
                                 "`running`) and run the command again")
        kafka.commit(moves)
    for move in moves:
        done, offsets = store.reset(PartitionKeys(group, move.topic, move.partition), move.new, live_ms)
        if not done:
            # Kafka has the new offsets; the ledger must follow before a bridge starts.
            busy = [f"{move.topic}[{move.partition}]@{o}" for o in offsets]
            raise BridgeError(
                f"committed the new offsets, but {_still_running(busy)}, so the ledger still holds the old run's "
                "facts: once they finished, run the same command again, before starting a bridge"
            )
    store.forget_status((m.topic, m.partition) for m in moves)
    return "\n".join([*lines, f"reset {len(moves)} partition(s): the next bridge of group {group} starts there"])


def _still_running(busy: list[str]) -> str:
    return f"records still run in workers ({', '.join(busy)}) and their end would count for the new run"
