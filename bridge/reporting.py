"""Reporting: what the bridge shows of itself. A view of the partitions for the metrics and health
checks (twice a second, with the warning about records holding their partition), the one-line
progress summary in the log (every ``BRIDGE_PROGRESS_INTERVAL``), and the status other processes
read from the ledger (every ``BRIDGE_STATUS_INTERVAL``, also when the progress line is off)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from confluent_kafka import KafkaException

from .batching import BatchState
from .clock import Every
from .consumer import KafkaConsumer
from .keys import status_key
from .ledger import Ledger
from .metrics import Metrics, PartitionView, View
from .owned import Owned, Partitions
from .settings import Settings
from .stats import Stats
from .stuck import Holders, StuckWarnings
from .timelag import TimestampReader, lag_seconds

logger = logging.getLogger("bridge")


class Reporting:
    """Publishes views, progress lines and status. Called from the loop's thread only."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        consumer: KafkaConsumer,
        partitions: Partitions,
        stats: Stats,
        metrics: Metrics,
        instance: str,
        *,
        timestamps: TimestampReader | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._consumer = consumer
        self._partitions = partitions
        self._stats = stats
        self._metrics = metrics
        self._instance = instance
        #: Reads what the loop does not hold; without it, such a partition's time lag is unknown.
        self._timestamps = timestamps
        self._wall = wall
        self._holders = Holders()
        self._stuck = StuckWarnings(settings.stuck_after)
        self._views_due = Every(0.5)
        self._progress_due = Every(settings.progress_interval, first=float("inf"))
        self._status_due = Every(settings.status_interval)
        self._started = False

    def views(self, now: float) -> list[PartitionView]:
        """What the metrics, the health checks and the progress summary show of each partition."""
        views = []
        wall = self._wall()
        for owned in self._partitions:
            oldest = owned.state.oldest_unfinished_dispatch()
            confirmed = owned.marks.confirmed
            held = self._holders.see(owned, now)
            view = PartitionView(
                topic=owned.topic,
                partition=owned.partition,
                committed=confirmed if confirmed >= 0 else None,
                end=self._end(owned),
                in_flight=owned.state.open,
                oldest_unfinished_age=now - oldest if oldest else None,
                paused=owned.paused,
                holding_offset=held.offset if held else None,
                holding_age=held.age if held else None,
            )
            views.append(replace(view, lag_seconds=self._lag_seconds(owned, view, wall)))
        self._holders.forget(owned.key for owned in self._partitions)
        return views

    def _lag_seconds(self, owned: Owned, view: PartitionView, wall: float) -> float | None:
        """From the oldest record held and not committed, else read from Kafka (paused partitions
        do not fetch)."""
        offset, timestamp = owned.state.oldest_uncommitted()
        if view.end is not None and offset is not None and offset >= view.end:
            return 0.0  # what is left to commit is done: the commit is on its way
        if timestamp is None and offset is not None and view.lag and self._timestamps is not None:
            timestamp = self._timestamps.timestamp(owned.key, offset)
        return lag_seconds(view.lag, timestamp, wall)

    def publish_view(self, now: float, *, joined: bool, outage_since: float | None, last_poll: float | None) -> None:
        """Hand the metrics and health checks a fresh view (at most twice a second)."""
        if self._views_due.due(now):
            views = tuple(self.views(now))
            self._metrics.publish(View(views, joined=joined, outage_since=outage_since, last_poll=last_poll))
            self._stuck.check(views)

    def tick(self, now: float) -> None:
        """The progress line and the status, when due.

        Raises:
          LedgerUnavailable, LedgerAccessDenied: publishing the status failed.
        """
        if not self._started:
            # The first summary's rates count from here.
            self._started = True
            self._stats.mark(now)
            self._progress_due.reset(now)
        if self._progress_due.due(now):
            self.progress(now)
        if self._status_due.due(now):
            self.publish_status(now)

    def progress(self, now: float) -> None:
        """Log the one-line summary."""
        views = self.views(now)
        lag = sum(v.lag or 0 for v in views)
        in_flight = sum(v.in_flight for v in views)
        paused = sum(1 for v in views if v.paused)
        behind = max((v.lag_seconds for v in views if v.lag_seconds is not None), default=None)
        logger.info(self._stats.summary(now, in_flight=in_flight, lag=lag, partitions=len(views), paused=paused,
                                        lag_seconds=behind))

    def publish_status(self, now: float) -> None:
        """Publish each owned partition's summary where ``status`` reads it.

        Raises:
          LedgerUnavailable, LedgerAccessDenied.
        """
        views = self.views(now)
        wall = self._ledger.time_ms()  # status compares it with the same clock
        entries: dict[str, str] = {}
        for owned, view in zip(self._partitions, views, strict=True):
            age, held = view.oldest_unfinished_age, view.holding_age
            batches = owned.state.in_flight_batches() if isinstance(owned.state, BatchState) else None
            entries[f"{owned.topic}|{owned.partition}"] = json.dumps(
                {
                    **({"batches": batches} if batches is not None else {}),
                    "owner": self._instance,
                    "epoch": owned.state.epoch,
                    "committed": owned.marks.confirmed,
                    "in_flight": view.in_flight,
                    "dispatched": owned.state.dispatched_open,
                    "oldest_age_s": round(age, 3) if age is not None else None,
                    "lag": view.lag,
                    "lag_s": view.lag_seconds,
                    "holding_offset": view.holding_offset,
                    "holding_age_s": round(held, 3) if held is not None else None,
                    "paused": view.paused,
                    "updated_ms": wall,
                }
            )
        self._ledger.publish_status(status_key(self._settings.group_id), entries)

    def close(self) -> None:
        """Stop reading timestamps from Kafka."""
        if self._timestamps is not None:
            self._timestamps.close()

    def _end(self, owned: Owned) -> int | None:
        try:
            _, high = self._consumer.get_watermark_offsets(owned.tp, cached=True)
        except KafkaException:
            return None
        return int(high) if high >= 0 else None
