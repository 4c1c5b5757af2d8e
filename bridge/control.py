"""Operator commands in the running bridge: pauses and skips, and the bridge's presence.

Twice a second the loop reads the group's pauses and requests from the ledger and shows itself
present there (one round trip); every round, before dispatch, it holds or releases the
partitions it owns accordingly, so a pause recorded by ``kafka-dramatiq-bridge pause`` stops
dispatch within half a second, and a bridge that starts or takes over a partition honours it
before its first dispatch. A held partition dispatches nothing: records running or on their
lanes finish, records staged behind a running one are taken back (dispatched again on resume),
and flow control pauses its consumption. A skip is applied by the bridge that owns the partition;
the others leave the request alone.
"""

from __future__ import annotations

import logging
from typing import Any

from .batching import BatchState
from .clock import Every
from .deadletter import DeadLetterRouter
from .ledger import Ledger
from .ledger.control import REQUEST_TTL_MS, ControlStore, Pause, iso, pause_field
from .logs import coordinates
from .owned import Owned, Partitions
from .protocol import Reason
from .settings import Settings

logger = logging.getLogger("bridge")

#: Seconds between looks at the ledger for commands.
LOOK_INTERVAL = 0.5

#: Why the ledger did not give a record up (lua/skip.lua's codes).
_CHANGED = {
    0: "{where} finished meanwhile",
    2: "{where} failed for good meanwhile; its dead letter is on its way",
    3: "{where}: {owner} has a newer owner; run the command again",
}


class Control:
    """Applies operator commands. Called from the loop's thread only."""

    def __init__(
        self, settings: Settings, ledger: Ledger, partitions: Partitions, router: DeadLetterRouter, instance: str
    ) -> None:
        self.store = ControlStore(ledger.client, settings.group_id)
        self._partitions = partitions
        self._router = router
        self._instance = instance
        self._pauses: dict[str, Pause] = {}
        #: Some partition is held (so a round without pauses still has one to release).
        self._holding = False
        self._version: int | None = None
        self._due = Every(LOOK_INTERVAL)

    def tick(self, now: float) -> None:
        """Look for commands when due; hold or release partitions. Call before dispatch.

        Raises:
          LedgerUnavailable, LedgerAccessDenied.
        """
        if self._due.due(now):
            self._look(now)
        self._hold()

    def leave(self) -> None:
        """The bridge stops: it no longer counts as running (``reset-offsets`` may go ahead)."""
        self.store.leave(self._instance)

    def _look(self, now: float) -> None:
        sync = self.store.sync(self._instance, len(self._partitions))
        if sync.version != self._version:
            if self._version is not None and sync.last is not None:
                skipped = sync.version - self._version - 1
                more = f" (and {skipped} command(s) before it, see the audit log)" if skipped > 0 else ""
                logger.info("operator command `%s` by %s at %s%s", sync.last.text, sync.last.by, iso(sync.last.at_ms),
                            more)
            self._version = sync.version
        self._pauses = sync.pauses
        for request_id, request in sorted(sync.requests.items(), key=lambda item: item[1].get("at", 0)):
            self._answer(request_id, request, sync.now_ms, now)

    def _answer(self, request_id: str, request: dict[str, Any], clock_ms: int, now: float) -> None:
        """Apply a request if this bridge owns its partition, and answer it."""
        at, by = int(request.get("at", 0)), str(request.get("by"))
        command = f"operator command `{request.get('text')}` by {by} at {iso(at)}"
        if clock_ms - at > REQUEST_TTL_MS:
            if self.store.claim(request_id):
                logger.warning("dropping %s: no bridge took it in time", command)
            return
        owned = self._partitions.get(request.get("topic"), request.get("partition"))
        if owned is None or request.get("command") != "skip" or not self.store.claim(request_id):
            return
        offset = int(request["offset"])
        ok, message = self.skip(owned, offset, f"{by} at {iso(at)}", now)
        (logger.info if ok else logger.warning)("%s: %s", command, message,
                                                extra=coordinates(owned.topic, owned.partition, offset))
        self.store.reply(request_id, {"ok": ok, "message": message, "bridge": self._instance})

    def pause_of(self, owned: Owned) -> Pause | None:
        """The operator's pause that covers ``owned``, if any (its own before its topic's)."""
        return self._pauses.get(pause_field(owned.topic, owned.partition)) or self._pauses.get(owned.topic)

    def _hold(self) -> None:
        if not self._pauses and not self._holding:
            return  # the common case costs nothing per round
        self._holding = bool(self._pauses)
        for owned in self._partitions:
            pause = self.pause_of(owned)
            if (pause is not None) == owned.held:
                continue
            if pause is None:
                owned.held = False
                logger.info("%s: resumed by an operator; dispatching again", owned.where,
                            extra=coordinates(owned.topic, owned.partition))
                continue
            taken = self._take_back(owned)
            owned.held = True
            scope = owned.topic if pause.partition is None else owned.where
            logger.info(
                "%s: paused by %s at %s (pause of %s); dispatching nothing of it: %d dispatched record(s) "
                "finish, %d staged record(s) taken back",
                owned.where, pause.by, iso(pause.since_ms), scope, owned.state.dispatched_open, taken,
                extra=coordinates(owned.topic, owned.partition),
            )

    def _take_back(self, owned: Owned) -> int:
        """Take back the records staged behind unfinished ones: the bridge dispatches them again."""
        state = owned.state
        if not owned.stages or owned.assignment.needs_setup or not state.dispatched_open:
            return 0
        offsets = self.store.unstage(owned.keys, state.epoch)
        # Newest first: each goes back in front of the ones not dispatched, behind its predecessor.
        for offset in sorted(offsets, reverse=True):
            entry = state.entry(offset)
            if entry is not None:
                state.undispatch(entry)
        return len(offsets)

    def skip(self, owned: Owned, offset: int, by: str, now: float) -> tuple[bool, str]:
        """Give up the record at ``offset`` (``by``: who and when, for its dead letter): it goes to
        the dead-letter topic with reason ``skipped`` and the partition moves on. Returns whether it
        was given up, and why not.

        Raises:
          LedgerUnavailable, LedgerAccessDenied.
        """
        where, state = f"{owned.where}@{offset}", owned.state
        refusal = self._refusal(owned, offset)
        if refusal is not None:
            return False, f"{where} {refusal}"
        entry = state.entry(offset)
        assert entry is not None
        ordered = owned.handler.ordering != "none"
        if ordered:
            # Records staged behind it wait for its end, which may never come: they go out again.
            self._take_back(owned)
        # A batch runs as one call: its records are given up together.
        batch = state.batch_of(entry) if isinstance(state, BatchState) and entry.dispatched else []
        if not batch and ordered and entry.dispatched and not state.is_head(entry):
            return False, (
                f"{where} waits on its lane behind {owned.where}@{entry.prev}, which has not finished; skip that "
                "one first, or this one once it runs"
            )
        detail: dict[str, Any] = {
            "error": {"type": "Skipped", "message": f"skipped by {by}"},
            "attempts": entry.attempts,
            "actor": owned.handler.name,
        }
        given = []
        for member in batch or [entry]:
            code = self.store.skip(owned.keys, member.offset, state.epoch, {**detail, "reason": Reason.SKIPPED.value})
            if code == 1:
                given.append(member)
            elif member is entry:
                return False, _CHANGED.get(code, "{where} changed meanwhile").format(where=where, owner=owned.where)
        for member in given:
            state.withdraw(member)
            self._router.fail(owned, member, now, Reason.SKIPPED.value, detail)
        target = owned.dead_letter_topic
        letter = f"its dead letter goes to {target} with reason skipped" if target else "dead-lettering is off for it"
        with_batch = f" with the {len(given)} records of its batch" if len(given) > 1 else ""
        return True, f"{where} given up{with_batch} ({entry.attempts} dispatch(es)): {letter}; the commit moves " \
            "past it once that is done"

    def _refusal(self, owned: Owned, offset: int) -> str | None:
        """Why the record at ``offset`` cannot be skipped, or None."""
        a, state = owned.assignment, owned.state
        if a.needs_setup or a.handing_over or a.fenced:
            return "is changing owners; run the command again in a moment"
        if offset < owned.marks.confirmed:
            return f"is committed already (the group's committed offset is {owned.marks.confirmed})"
        entry = state.entry(offset)
        if entry is None:
            last = state.last_delivered
            if last is None or offset > last:
                taken = "nothing yet" if last is None else f"records up to offset {last}"
                return f"is not consumed yet: the bridge has taken {taken} from Kafka"
            following = state.committable()
            if following is not None and offset < following:
                return "is finished already (the commit follows)"
            return "is no record: a gap in the log (compaction or a transaction marker)"
        if entry.done:
            return "is finished already (the commit follows)"
        if entry.failure is not None:
            return f"failed for good already ({entry.failure.get('reason')}); its dead letter is on its way"
        return None
