"""Failure handling end to end: dead letters, poison records, lost task messages, outages, bad
configuration. The rule everywhere: a clear error naming what is at fault, and nothing lost."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from bridge.keys import lane_name, topic_lane_name
from devstack import KafkaServer, RedisServer, free_port
from tests.integration.test_bridge import assert_complete, run_to_end, wait_committed_to_end
from tests.support.bridge_proc import REPO
from tests.support.history import check, read_events
from tests.support.kafka import create_topic, produce_keyed, read_raw
from tests.support.pipeline import Pipeline
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def headers_of(message: Any) -> dict[str, bytes]:
    return {k: v for k, v in message.headers() or [] if k.startswith("kdb.")}


def test_poison_values_land_in_the_dead_letter_topic_once_each_and_nothing_stalls(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(6)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="none", KDB_TEST_VALUE_CODEC="json")
    poison = {i for i in range(10_000) if i % 100 == 37}
    produce_keyed(
        pipeline.kafka.bootstrap_servers, topic, 10_000,
        value=lambda i: f"{{not json {i}" if i in poison else json.dumps({"i": i}),
    )
    pipeline.start_workers(processes=2, threads=8)
    pipeline.start_bridge()
    report = run_to_end(pipeline, redis_client, "key")
    dead = read_raw(pipeline.kafka.bootstrap_servers, f"{topic}.dlq", len(poison))
    assert sorted(m.value().decode() for m in dead) == sorted(f"{{not json {i}" for i in poison)
    for message in dead:
        h = headers_of(message)
        assert h["kdb.topic"] == topic.encode()
        assert h["kdb.reason"] == b"undecodable"
        assert h["kdb.error.type"] == b"DecodeError"
        assert b"value (json codec)" in h["kdb.error.message"]
        assert h["kdb.attempts"] == b"1"
        assert h["kdb.group"] == pipeline.group.encode()
    poisoned = {(int(headers_of(m)["kdb.partition"]), int(headers_of(m)["kdb.offset"])) for m in dead}
    assert len(poisoned) == len(poison)
    ends = pipeline.ends()
    for (t, p), end in ends.items():
        assert report.processed.get((t, p), set()) == set(range(end)) - {o for pp, o in poisoned if pp == p}
    assert report.duplicates == 0


def test_an_unwritable_dead_letter_topic_holds_the_commit_until_it_heals(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    admin: Any,
) -> None:
    topic = topic_factory(1)
    dlq = f"{topic}.missing-dlq"
    pipeline = pipeline_factory(
        [topic], KDB_TEST_ORDERING="partition", KDB_TEST_FAIL_KEYS="3", KDB_TEST_DLQ=dlq,
        BRIDGE_CREATE_DEAD_LETTER_TOPICS="false",
    )
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 20, key=str)
    pipeline.start_workers(processes=1, threads=4)
    bridge = pipeline.start_bridge()
    # Records after the failed one still run; the commit stops at the failed offset.
    wait_until(lambda: len(check(read_events(redis_client), scope="partition").successes) == 19, 60,
               message="records after the failure did not run")
    bridge.wait_log(f"writing it to {dlq}", timeout=30)
    wait_until(lambda: pipeline.committed()[(topic, 0)] == 3, 30, message="the commit never reached offset 3")
    for _ in range(10):
        time.sleep(0.5)
        assert pipeline.committed()[(topic, 0)] == 3, "the commit passed a record whose dead letter is not written"
    create_topic(admin, dlq, 1)
    ends = wait_committed_to_end(pipeline, timeout=120)
    assert ends == {(topic, 0): 20}
    dead = read_raw(pipeline.kafka.bootstrap_servers, dlq, 1)
    assert [int(headers_of(m)["kdb.offset"]) for m in dead] == [3]
    assert headers_of(dead[0])["kdb.reason"] == b"final-failure"
    assert bridge.stop() == 0


@pytest.mark.parametrize("lanes", ["auto", "partition"])
def test_a_purged_lane_is_dispatched_again_and_processed(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    lanes: str,
) -> None:
    topic = topic_factory(3)
    pipeline = pipeline_factory(
        [topic], KDB_TEST_ORDERING="partition", BRIDGE_REDISPATCH_TIMEOUT="3", BRIDGE_LANES=lanes,
    )
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 30)
    bridge = pipeline.start_bridge()
    bridge.wait_log("assigned", timeout=60)
    broker = RedisBroker(url=pipeline.env["BRIDGE_REDIS_URL"])
    # auto on the Redis broker: one queue for the topic; partition: one per partition.
    queues = [topic_lane_name(pipeline.group, topic)] if lanes == "auto" else [
        lane_name(pipeline.group, topic, p) for p in range(3)
    ]
    wait_until(lambda: sum(broker.client.hlen(f"dramatiq:{q}.msgs") for q in queues) == 3
               and all(broker.client.hlen(f"dramatiq:{q}.msgs") for q in queues), 30,
               message="the three partitions' first records never reached their lanes")
    for queue in queues:  # the task broker loses every message in flight
        broker.flush(queue)
    pipeline.start_workers(processes=1, threads=4)
    report = run_to_end(pipeline, redis_client, "partition")
    # Each lost head comes back once. Heads dispatched in different loop rounds reach the timeout
    # in different checks, so they may come back in more than one summary line.
    summaries = [line for line in bridge.log.splitlines() if "again after no sign of life" in line]
    counts = [int(re.search(r"dispatching (\d+) record\(s\) again", line)[1]) for line in summaries]  # type: ignore[index]
    assert sum(counts) == 3 and len(summaries) <= 3, summaries
    assert all(sum(f"{topic}[{p}]@0" in line for line in summaries) == 1 for p in range(3)), summaries
    assert report.duplicates == 0
    assert report.order_violations == []
    assert_complete(report, pipeline.ends())


def test_a_handler_running_longer_than_the_redispatch_timeout_is_not_duplicated(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(1)
    pipeline = pipeline_factory(
        [topic], KDB_TEST_ORDERING="partition", KDB_TEST_SLEEP_MS="7000",
        BRIDGE_REDISPATCH_TIMEOUT="2", BRIDGE_HEARTBEAT_INTERVAL="0.5",
    )
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 2)
    pipeline.start_workers(processes=1, threads=4)
    bridge = pipeline.start_bridge()
    report = run_to_end(pipeline, redis_client, "partition")
    starts = [e for e in read_events(redis_client) if e.kind == "S"]
    assert [e.offset for e in starts] == [0, 1]
    assert "again after no sign of life" not in bridge.log
    assert report.duplicates == 0


def test_a_stopped_then_restarted_redis_loses_nothing_and_the_bridge_stays_in_the_group(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    store = RedisServer(tmp_path / "redis", aof=True)
    store.start()
    try:
        client = redis.Redis.from_url(store.url)
        topic = topic_factory(3)
        # The test's handler writes its history to the same Redis, so it fails while Redis is
        # away; dramatiq retries it, and retries lost in the outage are dispatched again.
        pipeline = pipeline_factory(
            [topic], redis_url=store.url, KDB_TEST_ORDERING="none", KDB_TEST_SLEEP_MS="2",
            KDB_TEST_MAX_RETRIES="20", BRIDGE_REDISPATCH_TIMEOUT="15",
        )
        produce_keyed(pipeline.kafka.bootstrap_servers, topic, 6000)
        pipeline.start_workers(processes=1, threads=8)
        bridge = pipeline.start_bridge()
        wait_until(lambda: client.llen("kdb-test:events") > 1500, 120, message="no progress")
        store.pause()
        time.sleep(3)  # a commit already in flight may still land
        frozen = pipeline.committed()
        for _ in range(12):
            time.sleep(1)
            assert pipeline.committed() == frozen, "committed while the ledger was away"
        store.resume()
        bridge.wait_log("ledger answers again", timeout=60)
        wait_until(lambda: client.llen("kdb-test:events") > 6000, 120, message="no progress after resume")
        store.stop()
        time.sleep(3)
        store.start()
        report = run_to_end(pipeline, client, "key")
        assert_complete(report, pipeline.ends())
        log = bridge.log
        assert "partitions paused" in log
        assert "dropped without commit" not in log and "revoked" not in log.split("stopping: draining")[0]
        assert log.count("assigned ") == 3
    finally:
        store.stop()


def test_a_bridge_started_before_kafka_connects_once_kafka_is_up(
    pipeline_factory: Callable[..., Pipeline], tmp_path: Path, redis_client: redis.Redis
) -> None:
    server = KafkaServer(tmp_path / "kafka", port=free_port())
    topic = "late-orders"
    pipeline = pipeline_factory(
        [topic], kafka_endpoint=server, KDB_TEST_ORDERING="partition", BRIDGE_WAIT_FOR_TOPICS="true"
    )
    try:
        pipeline.start_workers(processes=1, threads=4)
        bridge = pipeline.start_bridge("-X", "topic.metadata.refresh.interval.ms=1000")
        bridge.wait_log("cannot reach Kafka", timeout=60)
        time.sleep(3)
        assert bridge.proc is not None and bridge.proc.poll() is None, "the bridge gave up instead of waiting"
        server.start()
        from confluent_kafka.admin import AdminClient

        create_topic(AdminClient({"bootstrap.servers": server.bootstrap_servers}), topic, 2)
        produce_keyed(server.bootstrap_servers, topic, 300)
        report = run_to_end(pipeline, redis_client, "partition")
        assert_complete(report, pipeline.ends())
        assert report.duplicates == 0
    finally:
        pipeline.close()
        server.stop()


def test_replaying_a_dead_letter_topic_processes_the_records_again(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(2)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="key", KDB_TEST_FAIL_SET="kdb-test:fail")
    redis_client.sadd("kdb-test:fail", "4", "9")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 100, key=lambda i: str(i % 10))
    pipeline.start_workers(processes=1, threads=4)
    pipeline.start_bridge()
    wait_committed_to_end(pipeline)
    dead = read_raw(pipeline.kafka.bootstrap_servers, f"{topic}.dlq", 20)
    assert sorted(m.value().decode() for m in dead) == sorted(str(i) for i in range(100) if i % 10 in (4, 9))
    redis_client.delete("kdb-test:fail")
    env = {**os.environ, **pipeline.env}
    replayed = subprocess.run(
        [sys.executable, "-m", "bridge", "replay", f"{topic}.dlq"], env=env, cwd=REPO,
        capture_output=True, text=True, timeout=120,
    )
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed 20 record(s) from {topic}.dlq: 20 to {topic}" in replayed.stdout
    again = subprocess.run(
        [sys.executable, "-m", "bridge", "replay", f"{topic}.dlq"], env=env, cwd=REPO,
        capture_output=True, text=True, timeout=120,
    )
    assert "replayed 0 record(s)" in again.stdout, "a second replay must not send the records twice"
    ends = wait_committed_to_end(pipeline)
    assert sum(ends.values()) == 120
    ok_values = [e for e in read_events(redis_client) if e.kind == "E" and e.outcome == "ok"]
    assert len(ok_values) == 100, "80 records the first time, the 20 replayed ones once more"
