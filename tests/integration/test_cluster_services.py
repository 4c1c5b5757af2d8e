"""The clusters behave as the at-scale tests will rely on: Redis Cluster failover and a 3-broker KRaft cluster
that keeps serving with a broker down, and every tested Kafka version round-trips records."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from redis.crc import key_slot

from devstack import TESTED_KAFKA_VERSIONS, KafkaCluster, KafkaServer, RedisCluster, ServiceError
from devstack.kafka_cluster import COORDINATOR_REQUEST_TIMEOUT, OFFSETS_TOPIC
from tests.integration.test_services import RECORDS, assert_complete_and_ordered
from tests.support.bridge_proc import REPO
from tests.support.kafka import (
    committed_offsets,
    consume_committing,
    consumer,
    create_topic,
    high_watermarks,
    produce_keyed,
    read_all,
    unique_name,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

KEYS = 2_000
PARTITIONS = 3
HALF = RECORDS // 2


# -- Redis Cluster ------------------------------------------------------------------------------------


def write_keys(client: redis.RedisCluster, prefix: str) -> dict[str, str]:
    values = {f"{prefix}:{i}": f"value-{i}" for i in range(KEYS)}
    for key, value in values.items():
        client.set(key, value)
    return values


def read_keys(client: redis.RedisCluster, keys: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for key in keys:
        value = client.get(key)
        if value is not None:
            found[key] = value.decode()
    return found


def test_keys_survive_a_manual_failover_and_a_sigkill_of_the_old_primary_which_rejoins_as_a_replica(
    redis_cluster: RedisCluster,
) -> None:
    client = redis_cluster.client()
    try:
        values = write_keys(client, unique_name("k"))
        key = next(iter(values))
        old = redis_cluster.node_for_key(key)

        new = redis_cluster.failover(old)

        assert new.role() == "master" and old.role() == "slave"
        assert redis_cluster.node_for_key(key) is new
        redis_cluster.kill(old)
        assert read_keys(client, list(values)) == values

        redis_cluster.restart(old)

        assert old.role() == "slave"
        assert old.replication()["master_port"] == str(new.port)
        assert all(node.cluster_info()["cluster_state"] == "ok" for node in redis_cluster.nodes)
        # The replica resynchronised from its new primary: it holds the keys of its slots again.
        slots = next(view for view in new.views() if "myself" in view.flags)
        own = [k for k in values if slots.owns(key_slot(k.encode()))]
        assert own
        with old.client() as direct:
            direct.execute_command("READONLY")  # type: ignore[no-untyped-call]
            assert [direct.get(k) for k in own] == [values[k].encode() for k in own]
    finally:
        client.close()


def test_a_sigkilled_primary_is_replaced_by_its_replica_without_losing_replicated_writes(
    redis_cluster: RedisCluster,
) -> None:
    client = redis_cluster.client()
    try:
        values = write_keys(client, unique_name("k"))
        key = next(iter(values))
        old = redis_cluster.node_for_key(key)
        replica = redis_cluster.replica_of(old)
        # Replication is asynchronous: only writes the replica has are promised to survive.
        redis_cluster.wait_replicated(old)

        redis_cluster.kill(old)
        redis_cluster.wait_healthy(timeout=30)

        assert redis_cluster.node_for_key(key) is replica
        assert read_keys(client, list(values)) == values
        redis_cluster.restart(old)
        assert old.role() == "slave"
    finally:
        client.close()


def test_a_lua_script_over_keys_of_one_hash_tag_runs_and_keys_of_two_slots_are_refused(
    redis_cluster: RedisCluster,
) -> None:
    tag = unique_name("order")
    script = (
        "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); "
        "return redis.call('MGET', KEYS[1], KEYS[2])"
    )
    client = redis_cluster.client()
    try:
        keys = [f"{{{tag}}}:a", f"{{{tag}}}:b"]
        assert client.eval(script, 2, *keys, "done") == [b"done", b"done"]  # type: ignore[no-untyped-call]
        assert client.get(keys[1]) == b"done"

        # The server itself refuses a script whose keys live in two slots.
        apart = ["{a}:x", "{b}:x"]
        primary = redis_cluster.node_for_key(apart[0])
        with pytest.raises(redis.exceptions.ClusterCrossSlotError):
            primary.command("EVAL", script, 2, *apart, "done")
    finally:
        client.close()


# -- Kafka cluster ------------------------------------------------------------------------------------


def test_a_cluster_start_out_of_time_kills_every_node_and_says_how_long_it_waited_after_the_launch(
    tmp_path: Path,
) -> None:
    cluster = KafkaCluster(tmp_path / "cluster", version=os.environ.get("BRIDGE_TEST_KAFKA_VERSION") or None)
    began = time.monotonic()
    with pytest.raises(ServiceError) as raised:
        cluster.start(timeout=1)
    took = time.monotonic() - began

    message = str(raised.value)
    headline = re.match(
        r"the Kafka cluster in \S+ was not ready (\d+)s after its nodes were launched "
        r"\(start timeout 1s from the launch; preparing and launching took (\d+)s before that\): ",
        message,
    )
    assert headline is not None, message
    waited, launching = int(headline[1]), int(headline[2])
    assert waited >= 1
    assert waited + launching <= took + 1  # each rounded to whole seconds
    assert all(f"kafka-{i} ({cluster.node(i).data_dir})" in message for i in cluster.node_ids)
    assert cluster.running_ids() == []


#: All brokers stay frozen this long: longer than two of the coordinator wait's requests.
FROZEN = 2.5 * COORDINATOR_REQUEST_TIMEOUT

# Waits for the coordinator of a group through a cluster that is frozen, then stays around while
# lookups given up in the meantime finish.
_WAITER = """
import sys, time
from devstack import KafkaCluster
cluster = KafkaCluster(sys.argv[1])
began = time.monotonic()
print("asking", flush=True)
cluster.wait_group_coordinator(sys.argv[2], timeout=180)
print(f"answered after {time.monotonic() - began:.1f}s", flush=True)
cluster.wait_brokers(cluster.node_ids, timeout=120)
time.sleep(3)
print("alive", flush=True)
"""


def test_a_process_waiting_for_a_group_coordinator_through_a_frozen_cluster_gets_its_answer_and_lives_on(
    kafka_cluster: KafkaCluster,
) -> None:
    # A process of its own, so that a native abort fails this test, with the library's last words
    # on its stderr, instead of ending the session.
    nodes = list(kafka_cluster.nodes.values())
    for node in nodes:
        node.pause()
    try:
        waiter = subprocess.Popen(
            [sys.executable, "-c", _WAITER, str(kafka_cluster.data_dir), unique_name("group")],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert waiter.stdout is not None
        assert waiter.stdout.readline() == "asking\n"
        time.sleep(FROZEN)
    finally:
        for node in nodes:
            node.resume()
    out, err = waiter.communicate(timeout=300)

    assert waiter.returncode == 0, err
    answered = re.search(r"answered after ([\d.]+)s", out)
    assert answered is not None, out
    assert float(answered[1]) >= FROZEN
    assert out.endswith("alive\n")
    kafka_cluster.wait_brokers(kafka_cluster.node_ids)
    kafka_cluster.wait_isr_full(OFFSETS_TOPIC)


def produce_half(cluster: KafkaCluster, topic: str, first: int) -> None:
    """Produce records ``first .. first + HALF - 1`` keyed as ``assert_complete_and_ordered`` expects, acks=all."""
    produce_keyed(
        cluster.bootstrap_servers, topic, HALF, value=lambda i: str(first + i), key=lambda i: str((first + i) % 97)
    )


@pytest.mark.parametrize("how", ["sigkill", "clean stop"])
def test_acks_all_writes_and_a_consumer_group_go_on_when_a_partition_leader_goes_down_and_it_rejoins_the_isr(
    kafka_cluster: KafkaCluster, how: str,
) -> None:
    topic = kafka_cluster.create_topic(unique_name("rf3"), PARTITIONS)
    assert all(kafka_cluster.replicas_of(topic, p) == [1, 2, 3] for p in range(PARTITIONS))
    group = unique_name("group")
    produce_half(kafka_cluster, topic, 0)
    assert len(consume_committing(kafka_cluster.bootstrap_servers, topic, group, HALF)) == HALF
    leader = kafka_cluster.leader_of(topic, 0)

    if how == "sigkill":
        kafka_cluster.kill(leader)
    else:
        kafka_cluster.stop_broker(leader)
        # A controlled shutdown hands leadership over before the process exits, well before
        # the controller would notice a crash (broker.session.timeout.ms, 4 s).
        kafka_cluster.wait_leader(topic, 0, not_on=leader, timeout=2)
    # The producer starts while the leader may still be registered: it must retry onto the new leader.
    produce_half(kafka_cluster, topic, HALF)

    successor = kafka_cluster.wait_leader(topic, 0, not_on=leader)
    assert successor != leader
    assert leader not in kafka_cluster.isr_of(topic, 0)
    assert len(consume_committing(kafka_cluster.bootstrap_servers, topic, group, HALF)) == HALF
    records = read_all(kafka_cluster.bootstrap_servers, topic, PARTITIONS)
    assert_complete_and_ordered(records)

    kafka_cluster.start_broker(leader)
    kafka_cluster.wait_isr_full(topic)

    assert kafka_cluster.isr_of(topic, 0) == [1, 2, 3]
    highs = high_watermarks(kafka_cluster.bootstrap_servers, topic, PARTITIONS)
    assert sum(highs.values()) == 2 * HALF
    assert committed_offsets(kafka_cluster.bootstrap_servers, group, topic, range(PARTITIONS)) == highs


# -- Kafka versions -----------------------------------------------------------------------------------


def consume_with(bootstrap: str, topic: str, protocol: str, expected: int, timeout: float = 60) -> list[int]:
    """Values of ``expected`` records consumed in a new group speaking ``group.protocol``."""
    c = consumer(bootstrap, unique_name(f"group-{protocol}"), **{"group.protocol": protocol})
    values: list[int] = []
    try:
        c.subscribe([topic])

        def drained() -> bool:
            for msg in c.consume(num_messages=500, timeout=0.5):
                if msg.error() is not None:
                    raise KafkaException(msg.error())
                values.append(int(msg.value() or b"-1"))
            return len(values) >= expected

        wait_until(drained, timeout, message=lambda: f"{len(values)} of {expected} records with {protocol}")
    finally:
        c.close()
    return values


@pytest.mark.matrix
@pytest.mark.parametrize("version", TESTED_KAFKA_VERSIONS)
def test_a_single_broker_of_each_tested_kafka_version_round_trips_records_with_each_group_protocol_it_serves(
    version: str, tmp_path: Path,
) -> None:
    server = KafkaServer(tmp_path / "kafka", version=version)
    try:
        server.start()
        assert server.version == version
        assert ("consumer" in server.group_protocols) == version.startswith("4.")
        topic = create_topic(AdminClient({"bootstrap.servers": server.bootstrap_servers}), unique_name("t"), PARTITIONS)
        produce_keyed(server.bootstrap_servers, topic, 1_000)
        for protocol in server.group_protocols:
            values = consume_with(server.bootstrap_servers, topic, protocol, 1_000)
            assert sorted(values) == list(range(1_000)), protocol
        banner = (server.data_dir / "server.log").read_text(errors="replace")
        assert f"Kafka version: {version}" in banner
    finally:
        server.stop()
