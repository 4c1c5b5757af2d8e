"""The real services behave as the rest of the suite relies on: Kafka, redis-server, dramatiq CLI."""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from pathlib import Path

import dramatiq
import pytest
import redis
from confluent_kafka.admin import AdminClient
from dramatiq.brokers.redis import RedisBroker

from devstack import DramatiqWorkers, KafkaServer
from tests.conftest import TopicFactory
from tests.support.kafka import (
    Record,
    committed_offsets,
    consume_committing,
    create_topic,
    high_watermarks,
    produce_keyed,
    read_all,
    unique_name,
)
from tests.support.services import KafkaEndpoint, RedisEndpoint
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

RECORDS = 10_000
PARTITIONS = 6
KEYS = 97


def assert_complete_and_ordered(records: list[Record]) -> None:
    """All RECORDS values exactly once, offsets increasing per partition, values in produce order per key."""
    assert len(records) == RECORDS
    assert len({(r.partition, r.offset) for r in records}) == RECORDS
    assert sorted(int(r.value) for r in records) == list(range(RECORDS))

    offsets: dict[int, list[int]] = defaultdict(list)
    values_by_key: dict[str, list[int]] = defaultdict(list)
    partitions_by_key: dict[str, set[int]] = defaultdict(set)
    for r in records:
        assert r.key is not None
        offsets[r.partition].append(r.offset)
        values_by_key[r.key].append(int(r.value))
        partitions_by_key[r.key].add(r.partition)

    for partition, seen in offsets.items():
        assert all(a < b for a, b in itertools.pairwise(seen)), f"partition {partition} out of order"
    assert len(values_by_key) == KEYS
    for key, values in values_by_key.items():
        assert values == [i for i in range(RECORDS) if str(i % KEYS) == key], f"key {key} out of order"
        assert len(partitions_by_key[key]) == 1, f"key {key} spread over {partitions_by_key[key]}"


def test_ten_thousand_keyed_records_are_consumed_once_in_order_and_fully_committed(
    kafka: KafkaEndpoint, topic_factory: TopicFactory
) -> None:
    topic = topic_factory(PARTITIONS)
    group = unique_name("group")

    produce_keyed(kafka.bootstrap_servers, topic, RECORDS)
    records = consume_committing(kafka.bootstrap_servers, topic, group, RECORDS)

    assert_complete_and_ordered(records)
    highs = high_watermarks(kafka.bootstrap_servers, topic, PARTITIONS)
    assert sum(highs.values()) == RECORDS
    assert all(high > 0 for high in highs.values()), f"some partition got no record: {highs}"
    assert committed_offsets(kafka.bootstrap_servers, group, topic, range(PARTITIONS)) == highs


def test_records_and_committed_offsets_survive_a_graceful_restart_and_a_sigkill(tmp_path: Path) -> None:
    # A broker of its own: the session broker must never be killed under other tests.
    server = KafkaServer(tmp_path / "kafka")
    try:
        server.start()
        bootstrap = server.bootstrap_servers
        topic = create_topic(AdminClient({"bootstrap.servers": bootstrap}), unique_name("durable"), PARTITIONS)
        group = unique_name("group")
        produce_keyed(bootstrap, topic, RECORDS)
        assert len(consume_committing(bootstrap, topic, group, RECORDS)) == RECORDS
        committed = committed_offsets(bootstrap, group, topic, range(PARTITIONS))
        assert sum(committed.values()) == RECORDS

        for how in ("graceful", "sigkill"):
            if how == "graceful":
                server.stop()
            else:
                server.kill()
            assert not server.running
            server.start()
            assert server.bootstrap_servers == bootstrap, "a restart must keep the address"

            assert_complete_and_ordered(read_all(bootstrap, topic, PARTITIONS))
            assert committed_offsets(bootstrap, group, topic, range(PARTITIONS)) == committed, how
    finally:
        server.stop()


def test_a_stock_dramatiq_worker_runs_every_enqueued_message_against_redis_server(
    redis_server: RedisEndpoint, redis_client: redis.Redis, tmp_path: Path
) -> None:
    broker = RedisBroker(url=redis_server.url)  # type: ignore[no-untyped-call]
    workers = DramatiqWorkers(
        ["tests.support.echo_actors"],
        processes=2,
        threads=4,
        env={**os.environ, "ECHO_ACTORS_REDIS_URL": redis_server.url},
        cwd=Path(__file__).resolve().parents[2],
        log_path=tmp_path / "dramatiq.log",
    )
    try:
        workers.start()
        assert len(workers.pids()) == 2
        for n in range(100):
            broker.enqueue(dramatiq.Message(queue_name="echo", actor_name="echo", args=(n,), kwargs={}, options={}))

        wait_until(
            lambda: redis_client.hlen("echo:results") >= 100,
            timeout=60,
            message=lambda: f"{redis_client.hlen('echo:results')} of 100 results; log:\n{workers.log()[-3000:]}",
        )
        results = redis_client.hgetall("echo:results")
        assert sorted(int(n) for n in results) == list(range(100))
        assert {int(pid) for pid in results.values()} <= set(workers.pids())
    finally:
        code = workers.stop()
        broker.close()
    assert code == 0, workers.log()[-3000:]
    assert "exited unexpectedly" not in workers.log()
