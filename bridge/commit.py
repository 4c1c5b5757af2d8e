"""Commits: one past the contiguous prefix of done records, never ahead of an unfinished one.

Commits go out every ``BRIDGE_COMMIT_INTERVAL`` (asynchronous, also when idle) and synchronously
when partitions are revoked and at shutdown. A partition's marks record what was asked for and
what Kafka confirmed, so a commit never repeats or moves backwards; after a confirmed commit the
ledger forgets the facts below it.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from .clock import Clock
from .consumer import KafkaConsumer
from .denied import access_denied
from .errors import FatalError
from .ledger import Ledger, LedgerError
from .metrics import Metrics
from .owned import Owned, Partitions
from .probe import Probe
from .settings import Settings
from .stats import Stats

logger = logging.getLogger("bridge")


class Committer:
    """Commits and prunes. :meth:`commit` runs on the loop's thread; :meth:`on_commit` is the
    consumer's ``on_commit`` callback, served inside ``consume`` on that same thread."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        partitions: Partitions,
        clock: Clock,
        stats: Stats,
        metrics: Metrics,
        probe: Probe | None,
        halt: Callable[[FatalError], None],
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._partitions = partitions
        self._clock = clock
        self._stats = stats
        self._metrics = metrics
        self._probe = probe
        self._halt = halt
        self.consumer: KafkaConsumer | None = None
        self._sent: collections.deque[float] = collections.deque()
        #: Pruning waits while the ledger is away (set by the loop).
        self.ledger_away = False

    def commit(self, partitions: Iterable[Owned], *, asynchronous: bool, in_rebalance: bool = False) -> None:
        """Commit what is done of ``partitions``; synchronously, the answer is awaited.
        ``in_rebalance``: called from a rebalance callback, inside ``consume``."""
        assert self.consumer is not None
        partitions = list(partitions)
        offsets: list[TopicPartition] = []
        for owned in partitions:
            target = self.target(owned, in_rebalance=in_rebalance)
            marks = owned.marks
            if target is None or target <= marks.confirmed or (asynchronous and target <= marks.requested):
                continue
            marks.requested = target
            offsets.append(TopicPartition(owned.topic, owned.partition, target))
        if offsets:
            began = self._clock.monotonic()
            if asynchronous:
                self._sent.append(began)
            try:
                result = self.consumer.commit(offsets=offsets, asynchronous=asynchronous)
            except KafkaException as e:
                if asynchronous:
                    self._sent.pop()
                for owned in partitions:
                    owned.marks.requested = owned.marks.confirmed
                self._stats.commit_failures += 1
                logger.warning("commit failed, will retry: %s", e)
                return
            if not asynchronous:
                self._metrics.commit_duration.observe(self._clock.monotonic() - began)
                self._stats.commits += 1
            if self._probe:
                self._probe.event("commit", offsets=[[tp.topic, tp.partition, tp.offset] for tp in offsets])
                self._probe.point("after-commit")
            if not asynchronous and result:
                self._confirm(result)
        self.prune()

    def new_client(self) -> None:
        """The consumer was replaced: the old one's commits in flight will never be answered."""
        self._sent.clear()

    def target(self, owned: Owned, *, in_rebalance: bool = False) -> int | None:
        """The offset to commit for ``owned``: one past its done prefix, or None."""
        if owned.assignment.fenced:
            return None
        state = owned.state
        target = state.committable()
        if self._settings.unsafe_commit_at_dispatch and state.last_dispatched >= 0:
            return max(target or 0, state.last_dispatched + 1)
        if state.idle and target is not None and self.consumer is not None and not in_rebalance:
            # Past the last record may lie transaction markers; the consumer's position includes
            # them, and every record before it was delivered and is done. Not inside a rebalance:
            # librdkafka counts a record in the position as it takes it into a batch, and a
            # rebalance met later in that batch runs before the bridge saw the record (which is
            # then dropped from the batch). The next owner reads such markers again.
            try:
                position = int(self.consumer.position([owned.tp])[0].offset)
            except KafkaException:
                position = -1
            if position > target:
                target = position
        return target

    def on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        # Answers to asynchronous commits arrive in the order they were sent.
        if self._sent:
            self._metrics.commit_duration.observe(self._clock.monotonic() - self._sent.popleft())
        if error is not None:
            self._stats.commit_failures += 1
            denied = access_denied(error, self._settings)
            if denied is not None:
                self._halt(denied)
                return
            logger.warning("commit failed, will retry: %s", error.str())
            for tp in partitions:
                owned = self._partitions.get(tp.topic, tp.partition)
                if owned is not None:
                    owned.marks.requested = owned.marks.confirmed
            return
        self._stats.commits += 1
        self._confirm(partitions)

    def _confirm(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            owned = self._partitions.get(tp.topic, tp.partition)
            if tp.error is not None:
                logger.warning("commit of %s[%d] failed: %s", tp.topic, tp.partition, tp.error)
                if owned is not None:
                    owned.marks.requested = owned.marks.confirmed
                continue
            if owned is not None and tp.offset > owned.marks.confirmed:
                owned.marks.confirmed = tp.offset

    def prune(self) -> None:
        """Let the ledger forget facts below each confirmed commit."""
        due = {
            o.keys: o.marks.confirmed
            for o in self._partitions
            if o.marks.confirmed > o.marks.pruned and not o.assignment.needs_setup
        }
        if not due or self.ledger_away:
            return
        try:
            self._ledger.prune(due)
        except LedgerError as e:
            logger.warning("pruning the ledger failed, will retry: %s", e)
            return
        for owned in self._partitions:
            if owned.keys in due:
                owned.marks.pruned = due[owned.keys]
