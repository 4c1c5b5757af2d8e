"""Counters of the bridge process and the one-line progress summary."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Stats:
    delivered: int = 0
    dispatched: int = 0
    done: int = 0
    failed: int = 0
    dead_lettered: int = 0
    redispatched: int = 0
    commits: int = 0
    rebalances: int = 0
    _last: tuple[float, int, int] | None = field(default=None, repr=False)

    def mark(self, now: float) -> None:
        """Start the rate window of the next summary."""
        self._last = (now, self.dispatched, self.done)

    def summary(self, now: float, *, in_flight: int, lag: int, partitions: int, paused: int) -> str:
        """One log line; rates are per second since the previous summary."""
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
            f"lag {lag}, partitions {partitions} ({paused} paused), failed {self.failed}, "
            f"dead-lettered {self.dead_lettered}, re-dispatched {self.redispatched}, total done {self.done}"
        )
