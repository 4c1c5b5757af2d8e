"""Flow control: the only code that pauses and resumes partitions."""

from __future__ import annotations

from typing import Any

from bridge.errors import LedgerAccessDenied, LedgerUnavailable
from bridge.flow import Flow
from bridge.owned import Partitions
from tests.unit.fake_kafka import FakeConsumer
from tests.unit.parts import T, deliver, owned, settings


def flow(**overrides: Any) -> tuple[Flow, FakeConsumer, Partitions]:
    consumer, partitions = FakeConsumer({}), Partitions()
    return Flow(consumer, settings(**overrides), partitions), consumer, partitions


def test_a_partition_pauses_at_its_window_and_resumes_below_it() -> None:
    control, consumer, partitions = flow()
    full, other = owned(0, window=3), owned(1, window=3)
    partitions.add(full)
    partitions.add(other)
    deliver(full, 0, 1, 2)
    control.apply_backpressure()
    assert consumer.paused == {(T, 0)} and full.paused and not other.paused
    full.state.mark_done([0])
    control.apply_backpressure()
    assert consumer.paused == set() and not full.paused


def test_every_partition_pauses_when_all_together_hold_the_global_cap() -> None:
    control, consumer, partitions = flow(max_in_flight=4)
    a, b = owned(0), owned(1)
    partitions.add(a)
    partitions.add(b)
    deliver(a, 0, 1, 2)
    deliver(b, 0)
    control.apply_backpressure()
    assert consumer.paused == {(T, 0), (T, 1)}


def test_a_partition_whose_epoch_is_not_recorded_stays_paused() -> None:
    control, consumer, partitions = flow()
    pending = owned(0)
    pending.assignment.needs_setup = True
    partitions.add(pending)
    control.apply_backpressure()
    assert consumer.paused == {(T, 0)}


def test_an_outage_pauses_everything_and_backs_off_doubling_to_ten_seconds() -> None:
    control, consumer, partitions = flow()
    partitions.add(owned(0))
    control.outage(LedgerUnavailable("down"), 100.0)
    assert control.outage_since == 100.0 and consumer.paused == {(T, 0)}
    assert not control.may_work(100.4) and control.may_work(100.5)
    at = 100.5
    for backoff in (1.0, 2.0, 4.0, 8.0, 10.0, 10.0):
        control.outage(LedgerUnavailable("still down"), at)
        assert not control.may_work(at + backoff - 0.01) and control.may_work(at + backoff)
        at += backoff
    assert control.outage_since == 100.0, "the outage began with the first failure"
    assert control.recovered(200.0) == 100.0 and control.outage_since is None


def test_a_refused_permission_pauses_without_scheduling_a_retry_log() -> None:
    control, consumer, partitions = flow()
    partitions.add(owned(0))
    control.outage(LedgerAccessDenied("no permission"), 5.0)
    assert consumer.paused == {(T, 0)}
