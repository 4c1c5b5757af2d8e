"""Reporting: views for metrics and health, the progress line, and the status in the ledger."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from bridge.keys import status_key
from bridge.metrics import Metrics
from bridge.owned import Partitions
from bridge.reporting import Reporting
from bridge.stats import Stats
from tests.unit.fake_kafka import FakeConsumer
from tests.unit.parts import GROUP, T, deliver, ledger, owned, settings


def reporting(**overrides: Any) -> tuple[Reporting, Partitions, Any, Metrics]:
    partitions, stats, store = Partitions(), Stats(), ledger()
    consumer = FakeConsumer({})
    consumer.add(T, 0, 5)
    metrics = Metrics(stats)
    room = Reporting(settings(**overrides), store, consumer, partitions, stats, metrics, "host:1")
    return room, partitions, store, metrics


def test_a_view_shows_lag_in_flight_and_the_age_of_the_oldest_unfinished_record() -> None:
    room, partitions, _, metrics = reporting()
    partition = owned()
    partitions.add(partition)
    partition.marks.confirmed = 1
    deliver(partition, 1, 2)
    partition.state.take_ready(2, now=10.0)
    room.publish_view(12.5, joined=True, outage_since=None, last_poll=12.5)
    (view,) = metrics.view.partitions
    assert (view.committed, view.end, view.lag, view.in_flight) == (1, 5, 4, 2)
    assert view.oldest_unfinished_age == pytest.approx(2.5)


def test_the_status_is_published_on_its_own_timer_with_the_progress_line_off(caplog: pytest.LogCaptureFixture) -> None:
    room, partitions, store, _ = reporting(progress_interval=0, status_interval=5.0)
    partitions.add(owned())
    caplog.set_level(logging.INFO, "bridge")
    room.tick(100.0)
    published = store.client.hgetall(status_key(GROUP))
    assert json.loads(published[f"{T}|0"])["owner"] == "host:1"
    store.client.delete(status_key(GROUP))
    room.tick(104.0)
    assert store.client.hlen(status_key(GROUP)) == 0, "not before its interval"
    room.tick(105.0)
    assert store.client.hlen(status_key(GROUP)) == 1
    assert not [r for r in caplog.records if r.getMessage().startswith("progress:")]


def test_the_progress_line_comes_every_interval_counting_from_the_first_round(caplog: pytest.LogCaptureFixture) -> None:
    room, partitions, _, _ = reporting(progress_interval=10.0)
    partitions.add(owned())
    caplog.set_level(logging.INFO, "bridge")
    for now in (100.0, 105.0, 110.0, 115.0, 120.0):
        room.tick(now)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert len(lines) == 2 and "partitions 1 (0 paused)" in lines[0]
