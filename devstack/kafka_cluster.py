"""A KRaft Kafka cluster of several broker+controller processes on the loopback interface.

Every node is a :class:`~devstack.kafka.KafkaServer` configured by the same code as the
single broker (:mod:`devstack.kafka_config`); what differs is the quorum (a static set of
all the nodes as voters), the replication factor of every topic (3, with 2 in sync for
``acks=all``) and a smaller heap.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._metadata import ClusterMetadata, PartitionMetadata, TopicMetadata
from confluent_kafka.cimpl import NewTopic

from devstack.kafka import KafkaServer, new_cluster_id, quiet_admin, quiet_consumer
from devstack.kafka_config import DEFAULT_KAFKA_VERSION, BrokerNode, KafkaRelease, kafka_release
from devstack.ports import free_ports
from devstack.process import ServiceError, poll, stop_all, wait_all_ready

#: Heap ceiling of each node: three of them fit beside the rest of a test session.
CLUSTER_HEAP_MB = 384
#: Consumer groups keep their offsets here; created at start so groups work with a broker down.
OFFSETS_TOPIC = "__consumer_offsets"
#: The group whose coordinator start asks for, which creates the offsets topic.
WARM_UP_GROUP = "devstack-warm-up"
#: Longest single wait for a group coordinator's answer; the wait as a whole is longer.
COORDINATOR_REQUEST_TIMEOUT = 5.0

T = TypeVar("T")


class KafkaClusterNode(KafkaServer):
    """One broker+controller process of a :class:`KafkaCluster`, with its data in its own dir.

    Ready once the cluster's metadata lists it as a live broker: it has registered with
    the controller quorum and is no longer fenced.
    """

    def __init__(
        self, data_dir: Path, *, node_id: int, port: int, controller_port: int, voters: dict[int, int],
        cluster_id: str, version: str, heap_mb: int,
    ) -> None:
        self.node_id = node_id
        self.name = f"kafka-{node_id}"
        self._voters = dict(voters)
        self._planned = {"cluster_id": cluster_id, "port": port, "controller_port": controller_port}
        super().__init__(data_dir, version=version, heap_mb=heap_mb)

    def _new_state(self) -> dict[str, Any]:
        return dict(self._planned)

    def _node(self) -> BrokerNode:
        return BrokerNode(
            node_id=self.node_id, port=self.port, controller_port=self.controller_port, log_dir=self.log_dir,
            voters=self._voters, replicas=len(self._voters),
        )

    def _ready(self, budget: float) -> bool:
        if self._probe is None:
            self._probe = quiet_admin(self.bootstrap_servers)
        try:
            metadata = self._probe.list_topics(timeout=max(budget, 0.2))
        except KafkaException:
            return False
        if self.node_id not in metadata.brokers:
            return False
        self._probe = None
        return True


class KafkaCluster:
    """``brokers`` Kafka processes (node ids 1..n), each broker and controller, forming one cluster.

    The controller quorum has every node as a voter, so it survives the loss of a minority.
    Topics are created with replication factor n (internal topics too) and
    ``min.insync.replicas`` n-1, so ``acks=all`` writes go on with one broker down. Ports
    and the cluster id are kept in ``devstack-kafka-cluster.json``: a restart is the same
    cluster at the same addresses. Methods that name a broker take its node id, the id
    that metadata reports as a partition's leader.
    """

    name = "kafka-cluster"

    def __init__(
        self, data_dir: Path, *, brokers: int = 3, version: str | None = None, heap_mb: int = CLUSTER_HEAP_MB,
    ) -> None:
        if brokers < 1:
            raise ValueError("a cluster needs at least one broker")
        self.data_dir = Path(data_dir).resolve()
        self.heap_mb = heap_mb
        plan = self._load_plan()
        if plan is not None and len(plan["nodes"]) != brokers:
            raise ServiceError(f"the Kafka cluster in {self.data_dir} has {len(plan['nodes'])} brokers, not {brokers}")
        saved = None if plan is None else str(plan["version"])
        if plan is not None and version is not None and version != saved:
            raise ServiceError(
                f"the Kafka cluster in {self.data_dir} runs Kafka {saved}; it cannot start with {version}"
            )
        self.release: KafkaRelease = kafka_release(version or saved or DEFAULT_KAFKA_VERSION)
        self._brokers = brokers
        self._plan = plan
        self._nodes: dict[int, KafkaClusterNode] = {} if plan is None else self._make_nodes(plan)
        self._admin: AdminClient | None = None

    # -- addresses ----------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.data_dir / "devstack-kafka-cluster.json"

    @property
    def version(self) -> str:
        return self.release.version

    @property
    def group_protocols(self) -> tuple[str, ...]:
        """Consumer group protocols (``group.protocol``) the brokers serve."""
        return self.release.group_protocols

    @property
    def node_ids(self) -> list[int]:
        return list(range(1, self._brokers + 1))

    @property
    def nodes(self) -> dict[int, KafkaClusterNode]:
        """Node id -> its process; empty until the cluster has been started once."""
        return dict(self._nodes)

    def node(self, node_id: int) -> KafkaClusterNode:
        try:
            return self._nodes[node_id]
        except KeyError:
            raise ServiceError(f"no Kafka node {node_id} in {self.data_dir} (nodes: {sorted(self._nodes)})") from None

    @property
    def bootstrap_servers(self) -> str:
        """Every broker's address, comma-separated: clients find the cluster through any live one."""
        if not self._nodes:
            raise ServiceError(f"the Kafka cluster in {self.data_dir} has no ports yet: start it first")
        return ",".join(node.bootstrap_servers for node in self._nodes.values())

    @property
    def running(self) -> bool:
        """True while every node runs."""
        return bool(self._nodes) and all(node.running for node in self._nodes.values())

    def running_ids(self) -> list[int]:
        return [node_id for node_id, node in self._nodes.items() if node.running]

    def rss_bytes(self) -> dict[int, int | None]:
        """Resident memory of each node's process (None for a node that is down)."""
        return {node_id: node.rss_bytes() for node_id, node in self._nodes.items()}

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 180) -> float:
        """Format every node on first use, launch them all and wait until they form the cluster.

        Ready means every node is a live broker in the metadata and the consumer offsets
        topic exists with all its replicas in sync. ``timeout`` counts from the launch, as for
        a single server: formatting the nodes (a JVM each) does not use it up. Returns the
        seconds from preparation to ready; raises :class:`ServiceError` naming the node and
        its logs (and kills every node) otherwise.
        """
        if any(node.running for node in self._nodes.values()):
            raise ServiceError(f"the Kafka cluster in {self.data_dir} is already running")
        began = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._plan is None:
            self._plan = self._new_plan()
            self.state_file.write_text(json.dumps(self._plan, indent=2) + "\n")
            self._nodes = self._make_nodes(self._plan)
        nodes = list(self._nodes.values())
        try:
            for node in nodes:
                node.launch()
            launched = time.monotonic()
            deadline = launched + timeout
            try:
                wait_all_ready(nodes, timeout)
                self.wait_brokers(self.node_ids, timeout=_left(deadline))
                self._create_offsets_topic(_left(deadline))
            except ServiceError as exc:
                # Each step only knows its share of the budget; say what the whole start had.
                raise ServiceError(
                    f"the Kafka cluster in {self.data_dir} was not ready {time.monotonic() - launched:.0f}s after "
                    f"its nodes were launched (start timeout {timeout:.0f}s from the launch; preparing and "
                    f"launching took {launched - began:.0f}s before that): {exc}"
                ) from exc
        except BaseException:
            for node in nodes:
                node.kill()
            raise
        return time.monotonic() - began

    def stop(self, timeout: float = 20) -> None:
        """Stop every node cleanly and together; SIGKILL any still alive after ``timeout``.

        Usually all are gone within 7 s. The last node can wait minutes for a controlled
        shutdown that no controller is left to grant, hence the short timeout: its data is
        recovered on the next start like after a crash.
        """
        # Let the AdminClient go while its brokers still answer: destroyed after they are gone, a
        # broker thread of one that was SIGKILLed and restarted mid-run never terminated and
        # librdkafka's destroy waited for it (a session's teardown hung for 20 minutes).
        self._admin = None
        stop_all(list(self._nodes.values()), timeout)

    def kill(self, node_id: int) -> None:
        """SIGKILL one broker: a crash, nothing flushed, no leadership handed over."""
        self.node(node_id).kill()

    def stop_broker(self, node_id: int, timeout: float = 60) -> None:
        """Stop one broker cleanly (SIGTERM, controlled shutdown) and wait for it to exit."""
        self.node(node_id).stop(timeout)

    def start_broker(self, node_id: int, timeout: float = 120) -> float:
        """Start one broker again on its data dir; return once it is a live broker of the cluster."""
        return self.node(node_id).start(timeout)

    def heal(self, timeout: float = 120) -> None:
        """Start every node that is down and wait until all are live brokers again."""
        down = [node for node in self._nodes.values() if not node.running]
        for node in down:
            node.launch()
        wait_all_ready(down, timeout)
        self.wait_brokers(self.node_ids, timeout=timeout)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- topics and metadata ------------------------------------------------------------

    def create_topic(
        self, name: str, partitions: int = 1, *, config: dict[str, str] | None = None, timeout: float = 60
    ) -> str:
        """Create ``name`` replicated on every broker; return once all its replicas are in sync."""
        if self._admin is None:
            self._admin = quiet_admin(self.bootstrap_servers)
        topic = NewTopic(name, num_partitions=partitions, replication_factor=len(self._nodes), config=config or {})
        self._admin.create_topics([topic], operation_timeout=timeout)[name].result(timeout)
        self.wait_isr_full(name, timeout=timeout)
        return name


    def metadata(self, topic: str | None = None, timeout: float = 10) -> ClusterMetadata:
        """Cluster metadata as a live broker sees it (all topics, or just ``topic``)."""
        if self._admin is None:
            self._admin = quiet_admin(self.bootstrap_servers)
        return self._admin.list_topics(topic, timeout=timeout)

    def live_brokers(self) -> set[int]:
        """Node ids the metadata lists as brokers: registered and not fenced."""
        return set(self.metadata().brokers)

    def leader_of(self, topic: str, partition: int) -> int:
        """Node id of the partition's leader; raises :class:`ServiceError` if it has none."""
        leader = self._partition(topic, partition).leader
        if leader < 0:
            raise ServiceError(f"{topic}[{partition}] has no leader")
        return int(leader)

    def replicas_of(self, topic: str, partition: int) -> list[int]:
        return sorted(self._partition(topic, partition).replicas)

    def isr_of(self, topic: str, partition: int) -> list[int]:
        """Node ids of the replicas in sync with the leader."""
        return sorted(self._partition(topic, partition).isrs)

    def wait_brokers(self, node_ids: Iterable[int], timeout: float = 60) -> None:
        """Wait until the metadata lists exactly ``node_ids`` as live brokers."""
        wanted = set(node_ids)
        _poll(
            lambda: self.live_brokers() == wanted,
            timeout,
            lambda: f"live brokers are {sorted(self._safe(self.live_brokers, set[int]()))}, not {sorted(wanted)}",
        )

    def wait_leader(self, topic: str, partition: int, *, not_on: int | None = None, timeout: float = 60) -> int:
        """Wait until the partition has a leader (other than ``not_on``) and return its node id."""
        def leader() -> int | None:
            found = self._partition(topic, partition).leader
            return int(found) if found >= 0 and found != not_on else None

        return _poll(leader, timeout, lambda: f"{topic}[{partition}] has no leader other than {not_on}")

    def wait_isr_full(self, topic: str, timeout: float = 60) -> None:
        """Wait until every partition of ``topic`` has a leader and all its replicas in sync."""
        def full() -> bool:
            partitions = self._topic(topic, timeout=0).partitions.values()
            return bool(partitions) and all(
                p.leader >= 0 and sorted(p.isrs) == sorted(p.replicas) for p in partitions
            )

        def state() -> str:
            topic_metadata = self._safe(lambda: self._topic(topic, timeout=0), None)
            if topic_metadata is None:
                return f"{topic} is not in the metadata"
            return f"{topic} replicas/in sync: " + ", ".join(
                f"[{n}] {sorted(p.replicas)}/{sorted(p.isrs)}" for n, p in sorted(topic_metadata.partitions.items())
            )

        _poll(full, timeout, state)

    def wait_group_coordinator(self, group: str, timeout: float = 60) -> None:
        """Wait until the coordinator of consumer group ``group`` answers a committed-offsets request.

        Asked by a consumer of the group, never by an admin client (see
        :func:`~devstack.kafka.quiet_admin`): the coordinator may stay out of reach for longer
        than one request waits, as while the offsets topic is being created.
        """
        deadline = time.monotonic() + timeout
        consumer = quiet_consumer(self.bootstrap_servers, group)
        probe = [TopicPartition(OFFSETS_TOPIC, 0)]
        try:
            _poll(
                lambda: consumer.committed(probe, timeout=min(COORDINATOR_REQUEST_TIMEOUT, _left(deadline, 0.5))),
                timeout,
                lambda: f"the coordinator of group {group} did not answer",
            )
        finally:
            consumer.close()

    # -- internals ----------------------------------------------------------------------

    def _topic(self, topic: str, timeout: float = 10) -> TopicMetadata:
        # Brokers learn of a new topic from the metadata log one after the other: one may
        # still call it unknown a moment after another has answered with its leaders.
        def found() -> TopicMetadata | None:
            metadata = self.metadata(topic).topics.get(topic)
            return metadata if metadata is not None and metadata.error is None else None

        return _poll(found, timeout, lambda: f"topic {topic} is not in the metadata")

    def _partition(self, topic: str, partition: int) -> PartitionMetadata:
        found = self._topic(topic).partitions.get(partition)
        if found is None:
            raise ServiceError(f"topic {topic} has no partition {partition}")
        return found

    @staticmethod
    def _safe(read: Callable[[], T], default: T) -> T:
        try:
            return read()
        except (KafkaException, ServiceError):
            return default

    def _create_offsets_topic(self, timeout: float) -> None:
        # The group coordinator creates the offsets topic on the first FindCoordinator
        # request, with the configured replication factor, which needs every broker up. A
        # cluster that loses a broker before any group was used could serve no group at all.
        deadline = time.monotonic() + timeout
        self.wait_group_coordinator(WARM_UP_GROUP, timeout=timeout)
        self.wait_isr_full(OFFSETS_TOPIC, timeout=_left(deadline))

    def _new_plan(self) -> dict[str, Any]:
        ports = free_ports(2 * self._brokers)
        return {
            "cluster_id": new_cluster_id(),
            "version": self.version,
            "nodes": {
                str(node_id): {"port": ports[2 * i], "controller_port": ports[2 * i + 1]}
                for i, node_id in enumerate(range(1, self._brokers + 1))
            },
        }

    def _load_plan(self) -> dict[str, Any] | None:
        try:
            loaded = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        if not isinstance(loaded, dict) or not isinstance(loaded.get("nodes"), dict):
            raise ServiceError(f"{self.state_file} is not a Kafka cluster description")
        return loaded

    def _make_nodes(self, plan: dict[str, Any]) -> dict[int, KafkaClusterNode]:
        ports = {int(node_id): node for node_id, node in plan["nodes"].items()}
        voters = {node_id: int(node["controller_port"]) for node_id, node in ports.items()}
        return {
            node_id: KafkaClusterNode(
                self.data_dir / f"node-{node_id}",
                node_id=node_id,
                port=int(ports[node_id]["port"]),
                controller_port=voters[node_id],
                voters=voters,
                cluster_id=str(plan["cluster_id"]),
                version=str(plan["version"]),
                heap_mb=self.heap_mb,
            )
            for node_id in sorted(ports)
        }


def _left(deadline: float, floor: float = 1.0) -> float:
    """Seconds until ``deadline``, but at least ``floor``: a step reached late still gets one look."""
    return max(floor, deadline - time.monotonic())


def _poll(predicate: Callable[[], T | None], timeout: float, explain: Callable[[], str]) -> T:
    # Metadata requests that fail while brokers come and go count as "not yet".
    return poll(predicate, timeout, explain, transient=(KafkaException, ServiceError))
