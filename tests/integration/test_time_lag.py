"""Lag in seconds against real Kafka, Redis and workers: true while a partition is paused and while
no bridge runs, in ``status`` and the bridge's progress line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from confluent_kafka import Producer

from tests.integration.test_bridge import wait_committed_to_end
from tests.support.bridge_proc import REPO
from tests.support.kafka import produce_keyed
from tests.support.pipeline import Pipeline
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

#: How old the records written while the bridge is away are.
AGE = 600.0
#: The progress line of a bridge whose one partition is paused 10 records behind.
PROGRESS = re.compile(r"progress: .* lag 10 \((?P<seconds>\d+)s\), partitions 2 \(1 paused\)")


def status(pipeline: Pipeline, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", "status", "tests.support.bridge_actors", *flags],
        env={**os.environ, **pipeline.env, "PYTHONPATH": str(REPO)}, cwd=REPO,
        capture_output=True, text=True, check=True, timeout=60,
    )


def rows(pipeline: Pipeline) -> dict[int, dict[str, Any]]:
    return {r["partition"]: r for r in json.loads(status(pipeline, "--json").stdout)}


def produce_at(servers: str, topic: str, partition: int, count: int, timestamp_ms: int) -> None:
    producer = Producer({"bootstrap.servers": servers, "enable.idempotence": True, "acks": "all"})
    for i in range(count):
        producer.produce(topic, key=f"late{i}", value=str(i), partition=partition, timestamp=timestamp_ms)
    assert producer.flush(30) == 0


def test_status_shows_the_lag_in_seconds_of_a_partition_left_behind_with_and_without_a_bridge(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(2)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="partition", BRIDGE_STATUS_INTERVAL="1",
                                BRIDGE_PROGRESS_INTERVAL="1")
    servers = pipeline.kafka.bootstrap_servers
    produce_keyed(servers, topic, 40)
    workers = pipeline.start_workers(processes=1, threads=2)
    bridge = pipeline.start_bridge()
    ends = wait_committed_to_end(pipeline)
    assert bridge.stop() == 0
    workers.stop()
    caught_up = rows(pipeline)
    assert [(r["lag"], r["lag_s"]) for r in caught_up.values()] == [(0, 0.0), (0, 0.0)]

    # Written while no bridge runs: partition 0 falls behind by records ten minutes old.
    written = time.time()
    produce_at(servers, topic, 0, 5, int((written - AGE) * 1000))
    produce_at(servers, topic, 0, 5, int(written * 1000))
    stopped = rows(pipeline)
    assert stopped[0]["lag"] == 10 and stopped[0]["committed"] == ends[(topic, 0)]
    assert stopped[0]["lag_s"] == pytest.approx(AGE + time.time() - written, abs=5)
    assert (stopped[1]["lag"], stopped[1]["lag_s"]) == (0, 0.0)
    table = status(pipeline).stdout
    assert "lag (s)" in table.splitlines()[0] and "holding offset" in table.splitlines()[0]

    # A bridge without workers: the partition fills its window, pauses, and its lag stays true.
    bridge = pipeline.start_bridge(env={"BRIDGE_WINDOW": "2"})
    def progress_lag() -> float | None:
        found = [m for line in bridge.log.splitlines() if (m := PROGRESS.search(line))]
        return float(found[-1]["seconds"]) if found else None

    shown = wait_until(progress_lag, 60, interval=0.5, message=lambda: bridge.log[-2000:])
    assert shown == pytest.approx(AGE + time.time() - written, abs=5)
    running = wait_until(lambda: (r := rows(pipeline)) and r[0]["holding_offset"] is not None and r, 60,
                         interval=1, message="the record holding the partition was never reported")
    assert running[0]["holding_offset"] == ends[(topic, 0)], "the first record written while away"
    assert running[0]["holding_age_s"] >= 0
    assert running[0]["lag_s"] == pytest.approx(AGE + time.time() - written, abs=5)
    assert bridge.stop() == 0
    assert rows(pipeline)[0]["lag_s"] == pytest.approx(AGE + time.time() - written, abs=5)
