"""The bridge end to end: real Kafka, real redis-server, stock dramatiq worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from bridge.assignments import RETIRED_PARTITION_TTL
from bridge.keys import PartitionKeys
from tests.support.bridge_proc import REPO
from tests.support.core import group_protocols
from tests.support.history import check, read_events
from tests.support.kafka import produce_keyed, read_raw
from tests.support.pipeline import Pipeline
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

#: Rebalance tests run with each consumer group protocol the session's Kafka serves: the classic
#: one (cooperative-sticky assignor) and KIP-848's, where the broker computes assignments (Kafka 4).
PROTOCOLS = pytest.mark.parametrize("protocol", group_protocols())


@pytest.fixture(params=["redis", "rabbitmq"])
def fleet(request: pytest.FixtureRequest) -> dict[str, str]:
    """The workers' task broker: Redis, or RabbitMQ (dramatiq's default broker, push-based, whose
    consumers acknowledge by delivery tag: a record run from a worker's own queue has none)."""
    if request.param == "rabbitmq":
        return {"KDB_TEST_RABBITMQ_URL": request.getfixturevalue("rabbitmq").url}
    return {}


#: For scenarios whose RabbitMQ run repeats what the partition-mode run covers: the RabbitMQ
#: variant goes to the slow tier (python -m pytest -m slow), to keep the default run in budget.
RABBITMQ_SLOW = pytest.mark.parametrize(
    "fleet", ["redis", pytest.param("rabbitmq", marks=pytest.mark.slow)], indirect=True
)


def records_for(fleet: dict[str, str]) -> int:
    """Records of the long runs: fewer on RabbitMQ, whose fleet is slower (see
    docs/performance.md), to keep the suite's time in budget."""
    return 6_000 if fleet else 20_000


def wait_committed_to_end(pipeline: Pipeline, timeout: float = 180) -> dict[tuple[str, int], int]:
    ends = pipeline.ends()
    wait_until(lambda: pipeline.committed() == ends, timeout, interval=0.5,
               message=f"committed offsets never reached the end offsets {ends}")
    return ends


def test_partition_mode_processes_every_record_once_in_order_and_commits_to_the_end(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    fleet: dict[str, str],
) -> None:
    topic = topic_factory(6)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="partition", **fleet)
    total = records_for(fleet)
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, total)
    pipeline.start_workers(processes=2, threads=8)
    started = time.monotonic()
    pipeline.start_bridge()
    ends = wait_committed_to_end(pipeline)
    elapsed = time.monotonic() - started
    assert pipeline.bridges[0].stop() == 0
    report = check(read_events(redis_client), scope="partition")
    assert report.overlaps == []
    assert report.order_violations == []
    assert report.duplicates == 0
    for (t, p), end in ends.items():
        assert report.processed[(t, p)] == set(range(end))
    assert sum(ends.values()) == total
    broker = "rabbitmq" if fleet else "redis"
    print(f"partition mode, {broker}: {total} records in {elapsed:.1f}s = {total / elapsed:.0f} records/s")
    for workers in pipeline.workers:
        # Records run after a predecessor finished go back through the broker, which acknowledges
        # them as its own deliveries.
        assert "Failed to ack" not in workers.log(), "a record run again was acknowledged twice"
    for (t, p) in ends:
        # Given up at the stop: nothing of the partition runs, and its keys expire unless a new
        # owner takes it (a deleted topic leaves nothing behind).
        keys = PartitionKeys(pipeline.group, t, p)
        assert redis_client.hlen(keys.running) == 0
        present = [key for key in keys.script_keys if redis_client.exists(key)]
        assert keys.epoch in present
        assert all(0 < redis_client.ttl(key) <= RETIRED_PARTITION_TTL for key in present)


def run_to_end(pipeline: Pipeline, redis_client: redis.Redis, scope: str) -> Any:
    wait_committed_to_end(pipeline)
    for bridge in pipeline.bridges:
        assert bridge.stop() == 0
    return check(read_events(redis_client), scope=scope)


def assert_complete(report: Any, ends: dict[tuple[str, int], int]) -> None:
    for (t, p), end in ends.items():
        missing = set(range(end)) - report.processed.get((t, p), set())
        assert not missing, f"{t}[{p}] never processed {sorted(missing)[:10]}"


@RABBITMQ_SLOW
def test_key_mode_keeps_order_and_exclusivity_per_key(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    fleet: dict[str, str],
) -> None:
    topic = topic_factory(6)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="key", KDB_TEST_SLEEP_MS="0-5", **fleet)
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 4000)
    pipeline.start_workers(processes=2, threads=8)
    pipeline.start_bridge()
    report = run_to_end(pipeline, redis_client, "key")
    assert report.overlaps == []
    assert report.order_violations == []
    assert report.duplicates == 0
    assert_complete(report, pipeline.ends())


@RABBITMQ_SLOW
def test_none_mode_processes_everything_and_commits_to_the_end(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    fleet: dict[str, str],
) -> None:
    topic = topic_factory(6)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="none", **fleet)
    total = records_for(fleet)
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, total)
    pipeline.start_workers(processes=2, threads=8)
    started = time.monotonic()
    pipeline.start_bridge()
    report = run_to_end(pipeline, redis_client, "key")
    elapsed = time.monotonic() - started
    assert report.duplicates == 0
    assert_complete(report, pipeline.ends())
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "bridge", "status", "tests.support.bridge_actors", "--json"],
            env={**os.environ, **pipeline.env, "PYTHONPATH": str(REPO)}, cwd=REPO,
            capture_output=True, check=True, timeout=60,
        ).stdout
    )
    committed = pipeline.committed()
    assert {(r["topic"], r["partition"]): r["committed"] for r in status} == committed
    assert all(r["lag"] == 0 and r["in_flight"] == 0 for r in status)
    if not fleet:
        # The workers acknowledged every lane message (in batches), as dramatiq's own ack would.
        wait_until(lambda: not unacknowledged(redis_client), 10,
                   message=lambda: f"lane messages left unacknowledged: {unacknowledged(redis_client)}")
    broker = "rabbitmq" if fleet else "redis"
    print(f"none mode, {broker}: {total} records in {elapsed:.1f}s = {total / elapsed:.0f} records/s")


def unacknowledged(client: redis.Redis) -> dict[str, int]:
    """Lane message bodies and fetched ids that dramatiq's Redis broker still holds, by key."""
    held = {key.decode(): client.hlen(key) for key in client.scan_iter("dramatiq:kdb.*.msgs")}
    held |= {key.decode(): client.scard(key) for key in client.scan_iter("dramatiq:__acks__.*")}
    return {key: count for key, count in held.items() if count}


def test_a_graceful_stop_and_restart_loses_nothing_and_repeats_nothing(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(6)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="partition", KDB_TEST_SLEEP_MS="1")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 3000)
    pipeline.start_workers(processes=2, threads=8)
    first = pipeline.start_bridge()
    wait_until(lambda: redis_client.llen("kdb-test:events") > 600, 120, message="no progress")
    assert first.stop() == 0
    stopped_at = redis_client.llen("kdb-test:events")
    assert 0 < stopped_at < 6000, "the bridge must stop mid-stream"
    pipeline.start_bridge()
    report = run_to_end(pipeline, redis_client, "partition")
    assert report.duplicates == 0
    assert report.order_violations == []
    assert report.overlaps == []
    assert_complete(report, pipeline.ends())


@PROTOCOLS
def test_a_second_bridge_joining_and_leaving_moves_partitions_without_loss_or_duplicates(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    protocol: str,
) -> None:
    topic = topic_factory(6)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="partition", KDB_TEST_SLEEP_MS="2",
                                BRIDGE_GROUP_PROTOCOL=protocol)
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 4000)
    pipeline.start_workers(processes=2, threads=8)
    first = pipeline.start_bridge()
    wait_until(lambda: redis_client.llen("kdb-test:events") > 400, 120, message="no progress")
    second = pipeline.start_bridge()
    second.wait_log("assigned", timeout=60)
    # More records after the join, so both owners have work whatever the first one finished.
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 2000)
    moved_at = redis_client.llen("kdb-test:events")
    wait_until(lambda: redis_client.llen("kdb-test:events") > moved_at + 400, 120, message="no progress after join")
    assert second.stop() == 0
    assert "revoked" in first.log or "assigned" in first.log
    report = run_to_end(pipeline, redis_client, "partition")
    assert report.duplicates == 0
    assert report.order_violations == []
    assert report.overlaps == []
    assert_complete(report, pipeline.ends())


@RABBITMQ_SLOW
def test_a_failing_record_is_retried_then_advances_and_later_records_wait_for_it(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    fleet: dict[str, str],
) -> None:
    topic = topic_factory(2)
    fail_keys = {"5", "17"}
    pipeline = pipeline_factory(
        [topic], KDB_TEST_ORDERING="partition", KDB_TEST_MAX_RETRIES="2", KDB_TEST_FAIL_KEYS=",".join(fail_keys),
        **fleet,
    )
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 300, key=lambda i: str(i % 50))
    pipeline.start_workers(processes=2, threads=8)
    pipeline.start_bridge()
    report = run_to_end(pipeline, redis_client, "partition")
    events = read_events(redis_client)
    starts: dict[tuple[int, int], int] = {}
    for e in events:
        if e.kind == "S":
            starts[(e.partition, e.offset)] = starts.get((e.partition, e.offset), 0) + 1
    failing = {(e.partition, e.offset) for e in events if e.key in fail_keys}
    assert len(failing) == 12
    assert all(starts[c] == 3 for c in failing), "each failing record runs once and is retried twice"
    assert all(n == 1 for c, n in starts.items() if c not in failing)
    assert report.order_violations == []
    assert report.overlaps == []
    assert_complete(report, pipeline.ends())
    dead = read_raw(pipeline.kafka.bootstrap_servers, f"{topic}.dlq", len(failing))
    dead_letters = {(int(h["kdb.partition"]), int(h["kdb.offset"])): h for m in dead for h in [dict(m.headers())]}
    assert set(dead_letters) == failing, "exactly the failed records are dead-lettered, once each"
    assert len(dead) == len(failing)
    for h in dead_letters.values():
        assert h["kdb.reason"] == b"final-failure"
        assert h["kdb.error.type"] == b"Planned"
        assert h["kdb.attempts"] == b"3"
        assert h["kdb.handler"] == b"record_event"


def test_binary_keys_values_and_duplicate_binary_headers_arrive_unchanged(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    from confluent_kafka import Producer

    from bridge import Record

    topic = topic_factory(1)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="partition")
    producer = Producer({"bootstrap.servers": pipeline.kafka.bootstrap_servers, "acks": "all"})
    sent = []
    for i in range(20):
        key = bytes([255, 254, i]) if i % 4 else None
        value = bytes(range(256))[i:] + b"\x00" if i % 5 else b""
        headers = [("h", b"\x00\xff" + bytes([i])), ("h", b"\x01"), ("n", None), ("\u00e9", b"")]
        producer.produce(topic, value=value, key=key, headers=headers, timestamp=1_700_000_000_000 + i)
        sent.append(Record(topic, 0, i, key, value, tuple(headers), 1_700_000_000_000 + i))
    producer.flush(30)
    pipeline.start_workers(processes=1, threads=2)
    pipeline.start_bridge()
    run_to_end(pipeline, redis_client, "partition")
    received = [r.decode() for r in redis_client.lrange("kdb-test:events:records", 0, -1)]
    assert received == [repr(r) for r in sent]


@PROTOCOLS
def test_a_partition_added_while_running_is_picked_up(
    pipeline_factory: Callable[..., Pipeline],
    topic_factory: Callable[..., str],
    redis_client: redis.Redis,
    admin: Any,
    protocol: str,
) -> None:
    from confluent_kafka.admin import NewPartitions

    topic = topic_factory(2)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="partition", BRIDGE_GROUP_PROTOCOL=protocol)
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 200)
    pipeline.start_workers(processes=1, threads=4)
    pipeline.start_bridge("-X", "topic.metadata.refresh.interval.ms=1000")
    wait_committed_to_end(pipeline)
    admin.create_partitions([NewPartitions(topic, 4)])[topic].result(30)
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": pipeline.kafka.bootstrap_servers, "acks": "all"})
    for i in range(200):
        producer.produce(topic, value=str(i).encode(), key=str(i).encode(), partition=2 + i % 2)
    producer.flush(30)
    ends = pipeline.ends()
    assert ends[(topic, 2)] == ends[(topic, 3)] == 100
    report = run_to_end(pipeline, redis_client, "partition")
    assert report.duplicates == 0
    assert_complete(report, ends)


@PROTOCOLS
def test_a_partition_handed_over_while_records_run_keeps_order_across_owners(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    protocol: str,
) -> None:
    topic = topic_factory(6)
    # Bridges here do not wait for their records when partitions are revoked, so the new owner
    # takes over while records of the old assignment still run (8-9 s each) and must wait.
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="partition", KDB_TEST_SLEEP_MS="8000-9000",
                                BRIDGE_GROUP_PROTOCOL=protocol)
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 18)
    pipeline.start_workers(processes=2, threads=8)
    no_drain = {"BRIDGE_DRAIN_TIMEOUT": "0"}
    pipeline.start_bridge(env=no_drain)
    wait_until(lambda: redis_client.llen("kdb-test:events") >= 6, 120, message="no progress")
    second = pipeline.start_bridge(env=no_drain)
    second.wait_log("of an older assignment still running", timeout=60)
    assert second.stop() == 0
    report = run_to_end(pipeline, redis_client, "partition")
    assert report.overlaps == []
    assert report.order_violations == []
    assert report.duplicates == 0
    assert_complete(report, pipeline.ends())


def test_aborted_transactions_never_reach_handlers_and_the_commit_passes_the_markers(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    from confluent_kafka import Producer

    topic = topic_factory(1)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="partition")
    producer = Producer({"bootstrap.servers": pipeline.kafka.bootstrap_servers, "transactional.id": topic})
    producer.init_transactions(30)
    committed_values = []
    for batch, commit in ((range(0, 10), True), (range(10, 15), False), (range(15, 25), True)):
        producer.begin_transaction()
        for i in batch:
            producer.produce(topic, value=str(i).encode(), key=str(i).encode())
        if commit:
            producer.commit_transaction(30)
            committed_values += [str(i) for i in batch]
        else:
            producer.flush(30)  # the aborted records must reach the log, not die in the client
            producer.abort_transaction(30)
    pipeline.start_workers(processes=1, threads=4)
    pipeline.start_bridge()
    ends = wait_committed_to_end(pipeline)
    # 25 records and 3 transaction markers: the committed offset passes the trailing marker too.
    assert ends == {(topic, 0): 28}
    for bridge in pipeline.bridges:
        assert bridge.stop() == 0
    done = [e for e in read_events(redis_client) if e.kind == "E" and e.outcome == "ok"]
    assert sorted(e.key for e in done) == sorted(committed_values)
