"""Failovers under load: the ledger on a Redis Cluster losing the primary of a busy partition's
slot, and a replicated Kafka cluster losing the leader of busy partitions.

Each run records, besides the usual verdict, the longest time the group's commits stood still
and what the bridge showed of the outage (``Result.failover``, the "Failovers" table of
docs/reliability.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import redis

from bridge.keys import PartitionKeys
from devstack import KafkaCluster, RedisCluster, ServiceError, free_port
from devstack.redis_cluster import RedisClusterNode
from tests.reliability.harness import ReadinessProbe, Scenario
from tests.reliability.test_faults import PARTITIONS, assert_holds
from tests.support.kafka import read_raw, unique_name
from tests.support.pipeline import Pipeline
from tests.support.services import RedisEndpoint
from tests.support.waiting import wait_until

# Three Kafka brokers or six redis-servers each: with -m reliability, not in every CI run.
pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_redis_cluster_failover_of_a_busy_partitions_primary_loses_nothing_keeps_order_and_shows_the_outage(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    redis_server: RedisEndpoint, redis_cluster: RedisCluster,
) -> None:
    topic = topic_factory(PARTITIONS)
    port = free_port()
    # The ledger on the cluster; the lanes and the history on the session's redis-server.
    pipeline = pipeline_factory(
        [topic], redis_url=redis_cluster.ledger_url, KDB_TEST_BROKER_URL=redis_server.url,
        KDB_TEST_ORDERING="partition", KDB_TEST_SLEEP_MS="2", BRIDGE_REDISPATCH_TIMEOUT="10",
    )
    s = Scenario("redis cluster failover", pipeline, redis_client, ordering="partition", partitions=PARTITIONS,
                 faults="CLUSTER FAILOVER of the primary holding a busy partition's slot, SIGKILL of the old "
                        "primary; then SIGKILL of the new primary (its replica takes over)")
    s.pipeline.start_workers(processes=2, threads=8)
    bridge = s.bridge(BRIDGE_HTTP_PORT=str(port), BRIDGE_HEALTH_OUTAGE_TIMEOUT="1")
    probe = ReadinessProbe(port)
    probe.start()
    s.produce(4000, rate=150)
    wait_until(lambda: probe.answers and probe.answers[-1][1] == 200, 60, message="the bridge never got ready")
    busy = PartitionKeys(pipeline.group, topic, 0)
    s.sleep(3, 4)

    # A planned failover: the replica catches up, takes the slots, the old primary follows it.
    planned = time.monotonic()
    old = redis_cluster.node_for_key(busy.epoch)
    new = redis_cluster.failover(old)
    s.fault_count += 1
    s.sleep(2, 3)
    redis_cluster.kill(old)
    s.fault_count += 1
    s.sleep(2, 3)
    redis_cluster.restart(old)  # rejoins as the replica of the new primary

    # An unplanned one: the primary dies; its replica takes over after cluster-node-timeout.
    crashed = time.monotonic()
    redis_cluster.kill(new)
    s.fault_count += 1
    wait_until(lambda: serving(redis_cluster, busy.epoch) is old, 30, interval=0.2,
               message="the replica never took over")
    promoted = time.monotonic() - crashed
    wait_until(lambda: any(t > crashed and status == 503 for t, status in probe.answers), 30, interval=0.1,
               message="/readyz never answered 503 during the outage")
    wait_until(lambda: probe.answers[-1][1] == 200, 60, interval=0.2, message="/readyz never came back")
    probe.stop_event.set()
    redis_cluster.restart(new)
    s.failover = (f"CLUSTER FAILOVER and the old primary's SIGKILL: /readyz 503 for "
                  f"{probe.not_ready(planned, crashed):.1f}s; the new primary's SIGKILL: replica promoted after "
                  f"{promoted:.1f}s, /readyz 503 for {probe.not_ready(crashed):.1f}s, then 200 again")
    verdict = s.finish()
    assert_holds(verdict)
    assert "partitions paused, not dispatching or committing" in bridge.log, "the outage is in the log"
    assert "ledger answers again after" in bridge.log
    assert "its ledger keys moved to another Redis primary" in bridge.log, "replays run under a new epoch"


def serving(cluster: RedisCluster, key: str) -> RedisClusterNode | None:
    """The primary serving ``key``, or None while no live primary does."""
    try:
        return cluster.node_for_key(key)
    except ServiceError:
        return None


# -- Kafka --------------------------------------------------------------------------------------------


def kafka_scenario(name: str, faults: str, cluster: KafkaCluster, pipeline_factory: Callable[..., Pipeline],
                   redis_client: redis.Redis) -> Scenario:
    topic = cluster.create_topic(unique_name("rf3"), PARTITIONS)
    pipeline = pipeline_factory([topic], kafka_endpoint=cluster, KDB_TEST_ORDERING="partition",
                                KDB_TEST_SLEEP_MS="2", KDB_TEST_VALUE_CODEC="json")
    return Scenario(name, pipeline, redis_client, ordering="partition", partitions=PARTITIONS, faults=faults)


def poison_value(i: int) -> bytes:
    return b"{poison" if i % 100 == 42 else json.dumps({"i": i}).encode()


def run_leader_loss(s: Scenario, cluster: KafkaCluster, how: str) -> None:
    s.pipeline.start_workers(processes=2, threads=8)
    s.bridge()
    s.produce(3000, rate=150, value=poison_value)
    s.sleep(4, 6)
    leader = cluster.leader_of(s.topic, 0)
    led = [p for p in range(PARTITIONS) if cluster.leader_of(s.topic, p) == leader]
    began = time.monotonic()
    if how == "sigkill":
        cluster.kill(leader)
        fault = f"broker {leader}, leader of partitions {led}, SIGKILLed"
    else:
        cluster.stop_broker(leader)
        fault = f"broker {leader}, leader of partitions {led}, stopped cleanly in {time.monotonic() - began:.1f}s"
    s.fault_count += 1
    successor = cluster.wait_leader(s.topic, 0, not_on=leader, timeout=60)
    moved = time.monotonic() - began
    s.sleep(3, 5)
    restarted = time.monotonic()
    cluster.start_broker(leader)
    cluster.wait_isr_full(s.topic, timeout=120)
    s.failover = (f"{fault}; partition 0 led by broker {successor} {moved:.1f}s after the fault; broker {leader} "
                  f"back in the ISR {time.monotonic() - restarted:.1f}s after its restart")


def assert_dead_letters_survived(s: Scenario, cluster: KafkaCluster) -> None:
    dlq = f"{s.topic}.dlq"
    assert cluster.replicas_of(dlq, 0) == [1, 2, 3], "the bridge created its dead-letter topic replicated"
    dead = read_raw(cluster.bootstrap_servers, dlq, 30, timeout=60)
    offsets = sorted((int(dict(m.headers())["kdb.partition"]), int(dict(m.headers())["kdb.offset"])) for m in dead)
    assert len(set(offsets)) == 30, "every poison record has its dead letter after the failover"
    assert len(offsets) == 30, "acks=all and idempotence: no dead letter written twice"


@pytest.mark.parametrize("how", ["sigkill", "clean stop"])
def test_a_kafka_partition_leader_lost_mid_run_loses_nothing_keeps_order_and_its_dead_letters_survive(
    pipeline_factory: Callable[..., Pipeline], redis_client: redis.Redis, kafka_cluster: KafkaCluster, how: str,
) -> None:
    fault = ("leader of busy partitions SIGKILLed, restarted 3-5 s after a new leader took over" if how == "sigkill"
             else "leader of busy partitions stopped cleanly (controlled shutdown), started again 3-5 s later")
    s = kafka_scenario(f"kafka leader {how}", f"3-broker cluster, RF 3, min ISR 2: {fault}; 1% undecodable values",
                       kafka_cluster, pipeline_factory, redis_client)
    run_leader_loss(s, kafka_cluster, how)
    verdict = s.finish()
    assert_holds(verdict)
    assert verdict.processed == 3000 - 30
    assert_dead_letters_survived(s, kafka_cluster)
