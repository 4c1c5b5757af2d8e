"""Counters of the bridge process and the one-line progress summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

#: Record counters kept per topic as well as in total (the metrics export them per topic).
Counted = Literal["dispatched", "done", "failed", "dead_lettered", "redispatched", "batches"]

#: Upper bounds of the batch size histogram's buckets (records per batch message).
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000)


@dataclass(slots=True)
class Stats:
    delivered: int = 0
    dispatched: int = 0
    done: int = 0
    failed: int = 0
    dead_lettered: int = 0
    redispatched: int = 0
    batches: int = 0
    commits: int = 0
    commit_failures: int = 0
    rebalances: int = 0
    #: (counter, topic) -> count. Only the main loop writes; readers take ``.copy()``.
    by_topic: dict[tuple[str, str], int] = field(default_factory=dict)
    #: "assigned" | "revoked" | "lost" -> count.
    rebalance_events: dict[str, int] = field(default_factory=dict)
    #: topic -> (count per bucket of BATCH_SIZE_BUCKETS plus one for larger, sum of sizes).
    batch_sizes: dict[str, tuple[list[int], int]] = field(default_factory=dict)
    _last: tuple[float, int, int] | None = field(default=None, repr=False)

    def add(self, counter: Counted, topic: str, n: int = 1) -> None:
        if n:
            setattr(self, counter, getattr(self, counter) + n)
            key = (counter, topic)
            self.by_topic[key] = self.by_topic.get(key, 0) + n

    def batch(self, topic: str, size: int) -> None:
        """A batch message of ``size`` records went out for the first time."""
        self.add("batches", topic)
        counts, total = self.batch_sizes.get(topic) or ([0] * (len(BATCH_SIZE_BUCKETS) + 1), 0)
        counts[next((i for i, bound in enumerate(BATCH_SIZE_BUCKETS) if size <= bound), len(BATCH_SIZE_BUCKETS))] += 1
        self.batch_sizes[topic] = (counts, total + size)

    def rebalance(self, event: Literal["assigned", "revoked", "lost"]) -> None:
        self.rebalances += 1
        self.rebalance_events[event] = self.rebalance_events.get(event, 0) + 1

    def mark(self, now: float) -> None:
        """Start the rate window of the next summary."""
        self._last = (now, self.dispatched, self.done)

    def summary(
        self, now: float, *, in_flight: int, lag: int, partitions: int, paused: int, lag_seconds: float | None = None
    ) -> str:
        """One log line; rates are per second since the previous summary; ``lag_seconds`` is the
        largest time lag of a partition."""
        if self._last is None:
            dispatch_rate = done_rate = 0.0
        else:
            then, dispatched, done = self._last
            elapsed = max(now - then, 1e-9)
            dispatch_rate = (self.dispatched - dispatched) / elapsed
            done_rate = (self.done - done) / elapsed
        self._last = (now, self.dispatched, self.done)
        return (
            f"progress: dispatched {dispatch_rate:.0f}/s, done {done_rate:.0f}/s, in-flight {in_flight}, "
            f"lag {lag}{'' if lag_seconds is None else f' ({lag_seconds:.0f}s)'}, partitions {partitions} "
            f"({paused} paused), failed {self.failed}, "
            f"dead-lettered {self.dead_lettered}, re-dispatched {self.redispatched}, total done {self.done}"
        )
