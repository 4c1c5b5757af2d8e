"""Workers and bridges of one test, as subprocesses sharing one environment."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from confluent_kafka import Consumer, KafkaException, TopicPartition

from devstack import DramatiqWorkers
from tests.support.bridge_proc import REPO, BridgeProcess
from tests.support.kafka import unique_name
from tests.support.services import KafkaEndpoint

T = TypeVar("T")


class Pipeline:
    """Workers and bridges of one test, sharing one environment."""

    def __init__(self, kafka: KafkaEndpoint, redis_url: str, topics: list[str], tmp: Path, **options: str) -> None:
        self.kafka = kafka
        self.group = unique_name("group")
        self.topics = topics
        self.tmp = tmp
        self.env = {
            "BRIDGE_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "BRIDGE_REDIS_URL": redis_url,
            "BRIDGE_GROUP_ID": self.group,
            "BRIDGE_PROGRESS_INTERVAL": "2",
            "BRIDGE_LANE_REFRESH_INTERVAL": "0.2",
            "KDB_TEST_TOPICS": ",".join(topics),
            **options,
        }
        #: The module of handlers the workers and bridges import.
        self.module = "tests.support.bridge_actors"
        self.workers: list[DramatiqWorkers] = []
        self.bridges: list[BridgeProcess] = []

    def start_workers(self, processes: int = 2, threads: int = 8) -> DramatiqWorkers:
        env = {**self.env, "PYTHONPATH": str(REPO)}
        workers = DramatiqWorkers(
            [self.module], processes=processes, threads=threads,
            env={**os.environ, **env}, cwd=REPO, log_path=self.tmp / f"workers-{len(self.workers)}.log",
        )
        workers.start()
        self.workers.append(workers)
        return workers

    def start_bridge(self, *args: str, env: dict[str, str] | None = None) -> BridgeProcess:
        bridge = BridgeProcess([self.module], {**self.env, **(env or {})}, args=list(args),
                               log_path=self.tmp / f"bridge-{len(self.bridges)}.log")
        bridge.start()
        self.bridges.append(bridge)
        return bridge

    def committed(self, attempts: int = 20) -> dict[tuple[str, int], int]:
        """The group's committed offsets, retrying while the group coordinator is still loading."""
        return _retried(self._committed, attempts)

    def _committed(self) -> dict[tuple[str, int], int]:
        consumer = Consumer({"bootstrap.servers": self.kafka.bootstrap_servers, "group.id": self.group})
        try:
            metadata = consumer.list_topics(timeout=10)
            tps = [TopicPartition(t, p) for t in self.topics for p in metadata.topics[t].partitions]
            return {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(tps, timeout=10)}
        finally:
            consumer.close()

    def ends(self, attempts: int = 20) -> dict[tuple[str, int], int]:
        """The partitions' end offsets, retrying while a restarted broker has not yet loaded them."""
        return _retried(self._ends, attempts)

    def _ends(self) -> dict[tuple[str, int], int]:
        consumer = Consumer({"bootstrap.servers": self.kafka.bootstrap_servers, "group.id": self.group})
        try:
            metadata = consumer.list_topics(timeout=10)
            return {
                (t, p): consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
                for t in self.topics for p in metadata.topics[t].partitions
            }
        finally:
            consumer.close()

    def close(self) -> None:
        for bridge in self.bridges:
            bridge.kill()
        for workers in self.workers:
            workers.stop(timeout=10)


def _retried(read: Callable[[], T], attempts: int) -> T:
    """``read()``, again every 0.5 s while Kafka answers with an error (at most ``attempts`` times)."""
    for _ in range(attempts - 1):
        try:
            return read()
        except KafkaException:
            time.sleep(0.5)
    return read()
