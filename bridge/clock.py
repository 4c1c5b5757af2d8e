"""Time as the bridge's loop sees it: one injected clock, and interval timers on top of it.

Every duration the loop measures comes from :meth:`Clock.monotonic`; liveness across machines is
judged on the ledger's clock instead (Redis ``TIME``, inside its scripts). Tests drive a
:class:`ManualClock`, so none of them sleeps for time to pass.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Who calls it: the loop's thread only."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block the calling thread (the loop's waits while it drains)."""
        ...


class SystemClock:
    """The process's monotonic clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class ManualClock:
    """A clock that moves only when told: :meth:`advance`, or :meth:`sleep` (which advances)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


class Every:
    """An interval timer: :meth:`due` answers True once per ``interval`` (at once the first time,
    unless ``first`` is given); an interval of 0 never fires."""

    def __init__(self, interval: float, *, first: float = 0.0) -> None:
        self.interval = interval
        self._next = first

    def due(self, now: float) -> bool:
        if self.interval <= 0 or now < self._next:
            return False
        self._next = now + self.interval
        return True

    def reset(self, now: float) -> None:
        """Count the next interval from ``now``."""
        self._next = now + self.interval
