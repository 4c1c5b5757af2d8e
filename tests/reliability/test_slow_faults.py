"""The rest of the fault scenarios: graceful-stop loops, a rebalance storm, Redis and Kafka
outages, network faults through a proxy, and poison records under crashes.

Run with the whole suite: ``python -m pytest -m reliability``.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from confluent_kafka.admin import AdminClient

from devstack import KafkaServer, RedisServer, free_port
from tests.reliability.harness import Scenario
from tests.reliability.test_faults import PARTITIONS, assert_holds, scenario
from tests.support.bridge_proc import BridgeProcess
from tests.support.core import group_protocols
from tests.support.kafka import create_topic, unique_name
from tests.support.pipeline import Pipeline
from tests.support.proxy import TcpProxy

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.timeout(900)]


def test_bridge_sigterm_loop_repeats_nothing(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    s = scenario("bridge SIGTERM loop", pipeline_factory, topic_factory, redis_client,
                 faults="bridge SIGTERM every 3-6 s, 4 times")
    s.duplicate_bound = "none allowed: graceful stops"
    s.pipeline.start_workers(processes=2, threads=8)
    bridge = s.bridge()
    s.produce(4000, rate=250)
    for _ in range(4):
        s.sleep(3, 6)
        assert bridge.stop() == 0
        s.fault_count += 1
        bridge = s.bridge()
    verdict = s.finish()
    assert_holds(verdict)
    assert verdict.duplicates == 0, "graceful stops produce no duplicates"


@pytest.mark.parametrize("protocol", group_protocols())
def test_rebalance_storm_with_three_bridges(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    protocol: str,
) -> None:
    s = scenario(f"rebalance storm ({protocol} protocol)", pipeline_factory, topic_factory, redis_client,
                 faults="3 bridges, 6 partitions, a bridge started or stopped every 0.5-3 s for 60 s",
                 BRIDGE_GROUP_PROTOCOL=protocol)
    s.pipeline.start_workers(processes=2, threads=8)
    slots: list[BridgeProcess | None] = [s.bridge(), None, None]
    s.produce(12000, rate=200)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        s.sleep(0.5, 3)
        i = s.rng.randrange(3)
        current = slots[i]
        running = [b for b in slots if b is not None and b.proc is not None and b.proc.poll() is None]
        if current is not None and current.proc is not None and current.proc.poll() is None:
            if len(running) > 1:
                current.proc.send_signal(signal.SIGTERM)  # graceful; do not wait
                slots[i] = None
                s.fault_count += 1
        else:
            slots[i] = s.bridge()
            s.fault_count += 1
    assert_holds(s.finish(catch_up_timeout=300))


def test_redis_stopped_beyond_timeouts_then_killed_with_aof(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    store = RedisServer(tmp_path / "redis", aof=True)
    store.start()
    try:
        client = redis.Redis.from_url(store.url)
        topic = topic_factory(PARTITIONS)
        pipeline = pipeline_factory([topic], redis_url=store.url, KDB_TEST_ORDERING="partition",
                                    KDB_TEST_SLEEP_MS="2", KDB_TEST_MAX_RETRIES="50", BRIDGE_REDISPATCH_TIMEOUT="10")
        s = Scenario("redis SIGSTOP + SIGKILL", pipeline, client, ordering="partition", partitions=PARTITIONS,
                     faults="redis-server SIGSTOP 15 s, then SIGKILL and restart (AOF on)")
        pipeline.start_workers(processes=2, threads=8)
        s.bridge()
        s.produce(3000, rate=150)
        s.sleep(4, 6)
        store.pause()
        time.sleep(15)
        store.resume()
        s.fault_count += 1
        s.sleep(4, 6)
        store.kill()
        time.sleep(2)
        store.start()
        s.fault_count += 1
        assert_holds(s.finish(catch_up_timeout=300))
    finally:
        store.stop()


def dedicated_kafka(tmp_path: Path, *, proxy: bool = False) -> KafkaServer:
    server = KafkaServer(tmp_path / "kafka", proxy_port=free_port() if proxy else None)
    server.start()
    return server


def kafka_scenario(name: str, faults: str, server: KafkaServer, pipeline_factory: Callable[..., Pipeline],
                   redis_client: redis.Redis, *, bootstrap: str | None = None) -> Scenario:
    topic = create_topic(AdminClient({"bootstrap.servers": server.bootstrap_servers}), unique_name("t"), PARTITIONS)

    class Endpoint:
        bootstrap_servers = bootstrap or server.bootstrap_servers

    pipeline = pipeline_factory([topic], kafka_endpoint=server, KDB_TEST_ORDERING="partition", KDB_TEST_SLEEP_MS="2")
    if bootstrap:
        pipeline.env["BRIDGE_BOOTSTRAP_SERVERS"] = bootstrap
    return Scenario(name, pipeline, redis_client, ordering="partition", partitions=PARTITIONS, faults=faults)


def test_kafka_broker_restarted_and_stopped_beyond_the_session_timeout(
    pipeline_factory: Callable[..., Pipeline], tmp_path: Path, redis_client: redis.Redis
) -> None:
    server = dedicated_kafka(tmp_path)
    try:
        s = kafka_scenario("kafka restart + SIGSTOP", "broker SIGTERM restart, SIGKILL restart, SIGSTOP 12 s",
                           server, pipeline_factory, redis_client)
        s.pipeline.start_workers(processes=2, threads=8)
        s.bridge()
        s.produce(3000, rate=100)
        s.sleep(3, 5)
        server.stop()
        server.start()
        s.sleep(3, 5)
        server.kill()
        server.start()
        s.sleep(3, 5)
        server.pause()
        time.sleep(12)
        server.resume()
        s.fault_count += 3
        assert_holds(s.finish(catch_up_timeout=300))
    finally:
        server.stop()


def test_network_cut_and_latency_between_bridge_and_broker(
    pipeline_factory: Callable[..., Pipeline], tmp_path: Path, redis_client: redis.Redis
) -> None:
    server = dedicated_kafka(tmp_path, proxy=True)
    state = json.loads(server.state_file.read_text())
    proxy = TcpProxy(target=server.proxied_port, port=int(state["proxy_port"]))
    try:
        s = kafka_scenario("network cut + latency", "bridge-broker link cut 12 s, then 50 ms latency for 10 s",
                           server, pipeline_factory, redis_client, bootstrap=f"127.0.0.1:{proxy.port}")
        s.pipeline.start_workers(processes=2, threads=8)
        s.bridge()
        s.produce(3000, rate=100)
        s.sleep(3, 5)
        proxy.cut()
        time.sleep(12)
        proxy.heal()
        s.sleep(3, 5)
        proxy.latency = 0.05
        time.sleep(10)
        proxy.latency = 0.0
        s.fault_count += 2
        assert_holds(s.finish(catch_up_timeout=300))
    finally:
        proxy.close()
        server.stop()


def test_poison_records_interleaved_under_a_sigkill_loop(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    s = scenario("poison + SIGKILL loop", pipeline_factory, topic_factory, redis_client, ordering="key",
                 faults="1% undecodable values; bridge SIGKILL every 2-5 s, 3 times", KDB_TEST_VALUE_CODEC="json")
    s.pipeline.start_workers(processes=2, threads=8)
    bridge = s.bridge()
    s.produce(3000, rate=250, value=lambda i: b"{poison" if i % 100 == 42 else json.dumps({"i": i}).encode())
    for _ in range(3):
        s.sleep(2, 5)
        bridge.kill()
        s.fault_count += 1
        bridge = s.bridge()
    verdict = s.finish()
    assert_holds(verdict)
    assert verdict.processed == 3000 - 30
