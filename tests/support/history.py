"""Checks over the event history that tests/support/bridge_actors.py writes."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import redis

from tests.support.checker import HandlerEvent


def read_events(client: redis.Redis, key: str = "kdb-test:events") -> list[HandlerEvent]:
    """The history tests/support/bridge_actors.py appended, in the order it happened."""
    parsed = [raw.decode().split("|") for raw in client.lrange(key, 0, -1)]
    void = {fields[8] for fields in parsed if fields[0] == "X"}
    events = []
    for kind, topic, partition, offset, key_, pid, epoch, ms, token, *rest in parsed:
        if kind == "X" or token in void:
            continue  # a start whose write failed: the handler did not run
        events.append(HandlerEvent(kind, topic, int(partition), int(offset), key_, int(pid), int(epoch), int(ms),
                                   rest[0] if rest else "", token))
    return events


@dataclass
class Report:
    """What a history shows, per invariant."""

    processed: dict[tuple[str, int], set[int]] = field(default_factory=dict)
    successes: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    order_violations: list[str] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.successes.values() if n > 1)


def check(events: list[HandlerEvent], *, scope: str) -> Report:
    """Order and overlap per ``scope`` ("partition" or "key"), duplicates, and completeness.

    Within one scope, starts must be in non-decreasing offset order (a retry repeats an
    offset) and every start must be followed by its end before the next start.
    """
    report = Report()
    running: dict[tuple[str, ...], HandlerEvent | None] = defaultdict(lambda: None)
    last_start: dict[tuple[str, ...], int] = {}
    for event in events:
        unit: tuple[str, ...] = (event.topic, str(event.partition))
        if scope == "key":
            unit += (event.key,)
        if event.kind == "S":
            current = running[unit]
            if current is not None:
                report.overlaps.append(f"{unit}: {event.offset} started while {current.offset} ran")
            previous = last_start.get(unit)
            if previous is not None and event.offset < previous:
                report.order_violations.append(f"{unit}: {event.offset} started after {previous}")
            last_start[unit] = event.offset
            running[unit] = event
        else:
            if running[unit] is not None and running[unit].offset == event.offset:  # type: ignore[union-attr]
                running[unit] = None
            if event.outcome == "ok":
                report.successes[(event.topic, event.partition, event.offset)] += 1
            report.processed.setdefault((event.topic, event.partition), set()).add(event.offset)
    return report
