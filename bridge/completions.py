"""Completions: the ledger's facts about dispatched records, applied to the partitions' state.

Workers push every offset that reached a final state onto the partition's ``fresh`` list and
announce it; the loop takes them in one round trip per round (for the partitions announced since
the last round, and once a second for every partition with work in flight: :mod:`bridge.finishes`)
and marks records done, or routes final failures to the dead-letter room.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .deadletter import DeadLetterRouter
from .finishes import Announcements
from .ledger import Ledger, Progress
from .owned import Owned, Partitions
from .probe import Probe
from .protocol import Reason, failure_epoch
from .stats import Stats

logger = logging.getLogger("bridge")


def reason_of(detail: dict[str, object]) -> str:
    """The dead-letter reason of a recorded final failure."""
    reason = detail.get("reason")
    if isinstance(reason, str):
        return reason
    error = detail.get("error")
    error_type = error.get("type") if isinstance(error, dict) else None
    return Reason.UNDECODABLE.value if error_type == "DecodeError" else Reason.FINAL_FAILURE.value


class Completions:
    """Reads final states from the ledger. Called from the loop's thread only."""

    def __init__(
        self, ledger: Ledger, partitions: Partitions, router: DeadLetterRouter, stats: Stats, probe: Probe | None,
        announcements: Announcements | None = None,
    ) -> None:
        self._ledger = ledger
        self._announcements = announcements
        self._partitions = partitions
        self._router = router
        self._stats = stats
        self._probe = probe

    def read(self, now: float, only: Iterable[Owned] | None = None) -> None:
        """Take the final states recorded since the last call, for partitions with work in flight
        (``only``: all of these; otherwise those announced, or all when a sweep is due).

        Raises:
          LedgerUnavailable, LedgerAccessDenied.
        """
        announced = None
        if only is None and self._announcements is not None:
            announced = self._announcements.take(now)
        by_keys = {
            owned.keys: owned
            for owned in (only if only is not None else self._partitions)
            if owned.state.dispatched_open and not owned.assignment.needs_setup
            and (announced is None or owned.keys.finished_channel in announced)
        }
        if not by_keys:
            return
        for keys, progress in self._ledger.completions(list(by_keys)).items():
            self.apply(by_keys[keys], progress, now)

    def close(self) -> None:
        if self._announcements is not None:
            self._announcements.close()

    def apply(self, owned: Owned, progress: Progress, now: float) -> None:
        """Mark done facts; route final failures that belong to this owner's records."""
        new = owned.state.mark_done(progress.done)
        self._stats.add("done", owned.topic, new)
        if self._probe and new:
            self._probe.event("done", t=owned.topic, p=owned.partition, offsets=progress.done)
            self._probe.point("after-done")
        if owned.letters.failing:
            for offset in progress.done:
                owned.letters.failing.pop(offset, None)  # a later copy succeeded: no dead letter needed
        for offset, detail in sorted(progress.failed.items()):
            entry = owned.state.entry(offset)
            if entry is None or entry.done or entry.failure is not None:
                continue
            epoch = failure_epoch(detail)
            if epoch is not None and epoch < owned.state.epoch and entry.dispatched:
                # The older owner's copy failed; this owner dispatched the record again, and its
                # own copy decides (it runs once the older one stopped).
                logger.debug("%s@%d: ignoring a failure of epoch %d", owned.where, offset, epoch)
                continue
            self._router.fail(owned, entry, now, reason_of(detail), detail)
