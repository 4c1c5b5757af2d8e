"""Flow control: the only code that pauses and resumes the consumption of partitions.

A partition is paused while its window is full, while all partitions together hold
``BRIDGE_MAX_IN_FLIGHT`` records, before its epoch could be recorded, while an operator holds it
(``kafka-dramatiq-bridge pause``), and during a ledger or task-broker outage. Pausing is not
idling: the loop keeps polling, so the group keeps the bridge.
"""

from __future__ import annotations

import logging

from .consumer import KafkaConsumer
from .errors import FatalError
from .owned import Owned, Partitions
from .settings import Settings

logger = logging.getLogger("bridge")


class Flow:
    """Pauses, resumes and gates on outages. Called from the loop's thread only."""

    def __init__(self, consumer: KafkaConsumer, settings: Settings, partitions: Partitions) -> None:
        self._consumer = consumer
        self._settings = settings
        self._partitions = partitions
        self._outage_since: float | None = None
        self._retry_at = 0.0
        self._backoff = 0.0

    @property
    def outage_since(self) -> float | None:
        """When the current ledger or task-broker outage began (loop clock), or None."""
        return self._outage_since

    def pause(self, owned: Owned) -> None:
        if not owned.paused:
            self._consumer.pause([owned.tp])
            owned.paused = True

    def pause_all(self) -> None:
        for owned in self._partitions:
            self.pause(owned)

    def apply_backpressure(self) -> None:
        """Pause a partition at its window, every partition at the global cap, a partition an
        operator holds; resume the others."""
        over_total = self._partitions.open() >= self._settings.max_in_flight
        for owned in self._partitions:
            want = over_total or owned.state.open >= owned.window or owned.assignment.needs_setup or owned.held
            if want != owned.paused:
                (self._consumer.pause if want else self._consumer.resume)([owned.tp])
                owned.paused = want

    def may_work(self, now: float) -> bool:
        """Whether this round may call the ledger and the task broker (not waiting out a backoff)."""
        return self._outage_since is None or now >= self._retry_at

    def outage(self, error: Exception, now: float) -> None:
        """The ledger or the task broker failed a call: pause everything and back off."""
        first = self._outage_since is None
        if first:
            self._outage_since = now
            self._backoff = 0.5
        else:
            self._backoff = min(self._backoff * 2, 10.0)
        self._retry_at = now + self._backoff
        self.pause_all()
        if isinstance(error, FatalError):
            return  # the loop stops for good; nothing to retry
        log = logger.error if first or self._backoff >= 10.0 else logger.warning
        log("%s; partitions paused, not dispatching or committing, retrying in %.1fs", error, self._backoff)

    def recovered(self, now: float) -> float:
        """The outage is over; returns how long it lasted."""
        assert self._outage_since is not None
        lasted = now - self._outage_since
        logger.info("ledger answers again after %.1fs; resuming", lasted)
        self._outage_since = None
        return lasted
