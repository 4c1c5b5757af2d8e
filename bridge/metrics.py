"""Prometheus metrics of the bridge process.

The main loop publishes an immutable :class:`View` of its partitions a few times a second; a
scrape reads the latest view and copies of the counters, so it never touches the loop's state.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .stats import BATCH_SIZE_BUCKETS, Stats

PREFIX = "kafka_dramatiq_bridge_"

#: Counters exported per topic: (Stats counter, metric name without prefix and suffix, help).
_RECORD_COUNTERS = (
    ("dispatched", "records_dispatched", "Records put on their lanes (first dispatch of each)."),
    ("done", "records_done", "Records whose final state the ledger recorded (success, or failure settled)."),
    ("failed", "records_failed", "Records that failed finally (retries exhausted, undecodable, too large)."),
    ("dead_lettered", "records_dead_lettered", "Failed records written to their dead-letter topic."),
    ("redispatched", "records_redispatched", "Records dispatched again after showing no sign of life."),
    ("batches", "batches_dispatched", "Batch messages put on their lanes (first dispatch of each; batch handlers)."),
)


@dataclass(frozen=True, slots=True)
class PartitionView:
    topic: str
    partition: int
    committed: int | None
    end: int | None
    in_flight: int
    oldest_unfinished_age: float | None
    paused: bool
    #: Now minus the timestamp of the oldest record not yet committed; 0 when caught up, None
    #: while unknown.
    lag_seconds: float | None = None
    #: The record holding the partition (:mod:`bridge.stuck`) and seconds since its dispatch.
    holding_offset: int | None = None
    holding_age: float | None = None

    @property
    def lag(self) -> int | None:
        if self.end is None:
            return None
        return max(self.end - max(self.committed or 0, 0), 0)


@dataclass(frozen=True, slots=True)
class View:
    """What the main loop last published; ``monotonic`` times are ``time.monotonic()``."""

    partitions: tuple[PartitionView, ...] = ()
    #: The bridge subscribed and received its first assignment (possibly empty).
    joined: bool = False
    #: When the current ledger / task broker outage began, or None.
    outage_since: float | None = None
    #: When the main loop last polled Kafka.
    last_poll: float | None = None

    def oldest_unfinished_age(self) -> float | None:
        ages = [p.oldest_unfinished_age for p in self.partitions if p.oldest_unfinished_age is not None]
        return max(ages) if ages else None


class Metrics(Collector):
    """The registry served on ``/metrics``."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.view = View()
        self.registry = CollectorRegistry(auto_describe=False)
        self.commit_duration = Histogram(
            PREFIX + "commit_duration_seconds",
            "Time from an offset commit request to Kafka's answer.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.registry.register(self)

    def publish(self, view: View) -> None:
        self.view = view

    def collect(self) -> Iterable[Metric]:
        view = self.view
        now = time.monotonic()
        yield from _partition_gauges(view.partitions)
        yield _gauge("assigned_partitions", "Partitions this bridge owns.", len(view.partitions))
        yield _gauge("ledger_up", "1 while the ledger and task broker answer, 0 during an outage.",
                     0 if view.outage_since is not None else 1)
        if view.last_poll is not None:
            yield _gauge("last_poll_age_seconds", "Seconds since the main loop last polled Kafka.",
                         now - view.last_poll)
        by_topic = self.stats.by_topic.copy()
        for counter, name, text in _RECORD_COUNTERS:
            family = CounterMetricFamily(PREFIX + name, text, labels=["topic"])
            for (kind, topic), value in sorted(by_topic.items()):
                if kind == counter:
                    family.add_metric([topic], value)
            yield family
        yield _batch_sizes(self.stats)
        rebalances = CounterMetricFamily(
            PREFIX + "rebalances", "Rebalance events: partitions assigned, revoked or lost.", labels=["event"]
        )
        events = self.stats.rebalance_events.copy()
        for event in ("assigned", "revoked", "lost"):
            rebalances.add_metric([event], events.get(event, 0))
        yield rebalances
        yield CounterMetricFamily(PREFIX + "commits", "Offset commits Kafka accepted.", value=self.stats.commits)
        yield CounterMetricFamily(
            PREFIX + "commit_failures", "Offset commits that failed (retried).", value=self.stats.commit_failures
        )


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, text, value=value)


def _batch_sizes(stats: Stats) -> Metric:
    family = HistogramMetricFamily(
        PREFIX + "batch_size_records", "Records per batch message (batch handlers), per topic.", labels=["topic"]
    )
    for topic, (counts, total) in sorted(stats.batch_sizes.copy().items()):
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, BATCH_SIZE_BUCKETS), "+Inf"), counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric([topic], buckets, total)
    return family


def _partition_gauges(partitions: tuple[PartitionView, ...]) -> Iterator[Metric]:
    labels = ["topic", "partition"]
    families = {
        "committed": GaugeMetricFamily(
            PREFIX + "partition_committed_offset", "Offset this bridge last committed (next record to process).",
            labels=labels),
        "end": GaugeMetricFamily(PREFIX + "partition_end_offset", "High watermark of the partition.", labels=labels),
        "lag": GaugeMetricFamily(
            PREFIX + "partition_lag_records", "End offset minus committed offset.", labels=labels),
        "lag_seconds": GaugeMetricFamily(
            PREFIX + "partition_lag_seconds",
            "Now minus the timestamp of the oldest record not yet committed (0 when caught up).", labels=labels),
        "in_flight": GaugeMetricFamily(
            PREFIX + "partition_in_flight_records", "Records taken from Kafka and not yet done.", labels=labels),
        "age": GaugeMetricFamily(
            PREFIX + "partition_oldest_unfinished_age_seconds",
            "Seconds since the oldest unfinished record was dispatched (0 when none).", labels=labels),
        "holding": GaugeMetricFamily(
            PREFIX + "partition_holding_record_age_seconds",
            "Seconds since the record holding the partition (its oldest unfinished, with later records behind it) "
            "was dispatched (0 when none).", labels=labels),
        "paused": GaugeMetricFamily(
            PREFIX + "partition_paused", "1 while fetching is paused (window full, outage, handover).",
            labels=labels),
    }
    for p in partitions:
        key = [p.topic, str(p.partition)]
        if p.committed is not None and p.committed >= 0:
            families["committed"].add_metric(key, p.committed)
        if p.end is not None:
            families["end"].add_metric(key, p.end)
        if (lag := p.lag) is not None:
            families["lag"].add_metric(key, lag)
        if p.lag_seconds is not None:
            families["lag_seconds"].add_metric(key, p.lag_seconds)
        families["in_flight"].add_metric(key, p.in_flight)
        families["age"].add_metric(key, p.oldest_unfinished_age or 0.0)
        families["holding"].add_metric(key, p.holding_age or 0.0)
        families["paused"].add_metric(key, 1 if p.paused else 0)
    yield from families.values()
