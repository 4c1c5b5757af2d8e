"""What differs between the Kafka releases devstack runs, and the broker configuration built from it.

Pure logic: nothing here starts a process or touches a file, so the single broker
(:class:`devstack.kafka.KafkaServer`) and every node of a cluster
(:class:`devstack.kafka_cluster.KafkaCluster`) get their ``server.properties`` from the same code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devstack.ports import HOST
from devstack.process import ServiceError

#: The version the tests and ``python -m devstack up`` run unless told otherwise.
DEFAULT_KAFKA_VERSION = "4.1.1"
#: Versions devstack is tested with: the default, the newest 4.x and the newest 3.9.x on Maven Central.
TESTED_KAFKA_VERSIONS = ("4.1.1", "4.4.0", "3.9.2")

_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")

_LOG4J2 = """\
# Everything at INFO goes to the file; only warnings reach the console log.
status = warn
name = devstack-kafka

appender.console.type = Console
appender.console.name = CONSOLE
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
appender.console.filter.threshold.type = ThresholdFilter
appender.console.filter.threshold.level = warn

appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n

rootLogger.level = info
rootLogger.appenderRef.console.ref = CONSOLE
rootLogger.appenderRef.file.ref = FILE

# Per-request and per-segment chatter drowns out what matters in a test log.
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = warn
"""

# The same routing in log4j 1.x syntax, for the reload4j binding of Kafka 3.x.
_LOG4J1 = """\
# Everything at INFO goes to the file; only warnings reach the console log.
log4j.rootLogger=INFO, CONSOLE, FILE

log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender
log4j.appender.CONSOLE.Threshold=WARN
log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout
log4j.appender.CONSOLE.layout.ConversionPattern=[%d] %p %m (%c)%n

log4j.appender.FILE=org.apache.log4j.FileAppender
log4j.appender.FILE.File={log_file}
log4j.appender.FILE.layout=org.apache.log4j.PatternLayout
log4j.appender.FILE.layout.ConversionPattern=[%d] %p %m (%c)%n

# Per-request and per-segment chatter drowns out what matters in a test log.
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
"""


@dataclass(frozen=True)
class MavenArtifact:
    group: str
    artifact: str
    version: str


@dataclass(frozen=True)
class KafkaRelease:
    """One Apache Kafka version and what devstack does differently for it.

    * 4.x logs through log4j2 and serves KIP-848's ``consumer`` group protocol (GA since 4.0,
      enabled by default); its share coordinator has internal-topic settings of its own.
    * 3.9 logs through log4j 1.x (reload4j, as its binary distribution does) and serves only the
      ``classic`` group protocol: KIP-848 is a preview there, off by default, and devstack leaves
      it off. 3.9 is the oldest release whose storage tool formats a dynamic (KIP-853)
      controller quorum with ``--standalone``, which a single node uses.
    """

    version: str

    @property
    def major(self) -> int:
        return self._parts[0]

    @property
    def minor(self) -> int:
        return self._parts[1]

    @property
    def _parts(self) -> tuple[int, int, int]:
        found = _VERSION.match(self.version)
        if found is None:
            raise ServiceError(f"not a Kafka release version: {self.version!r} (expected MAJOR.MINOR.PATCH)")
        major, minor, patch = (int(part) for part in found.groups())
        return major, minor, patch

    @property
    def log4j2(self) -> bool:
        """True when the broker logs through log4j2 (4.0 and later), False for log4j 1.x (reload4j)."""
        return self.major >= 4

    @property
    def consumer_protocol(self) -> bool:
        """True when the brokers serve KIP-848's ``consumer`` group protocol out of the box."""
        return self.major >= 4

    @property
    def share_groups(self) -> bool:
        """True when the broker has a share coordinator (KIP-932), whose state topic needs settings."""
        return self.major >= 4

    @property
    def group_protocols(self) -> tuple[str, ...]:
        """Consumer group protocols a client may ask for (``group.protocol``)."""
        return ("classic", "consumer") if self.consumer_protocol else ("classic",)

    def logging_artifacts(self) -> list[MavenArtifact]:
        """The slf4j binding and logging backend added to ``kafka_2.13``, which brings only the slf4j API.

        The direct slf4j-api dependency wins over the older one ``kafka_2.13`` asks for, so the
        binding and the API always match.
        """
        if self.log4j2:
            # Kafka 4.x is built against this log4j2; its binary distribution ships the same.
            return [
                MavenArtifact("org.slf4j", "slf4j-api", "2.0.17"),
                MavenArtifact("org.apache.logging.log4j", "log4j-core", "2.24.3"),
                MavenArtifact("org.apache.logging.log4j", "log4j-slf4j2-impl", "2.24.3"),
            ]
        # What Kafka 3.9's binary distribution ships in libs/.
        return [
            MavenArtifact("org.slf4j", "slf4j-api", "1.7.36"),
            MavenArtifact("org.slf4j", "slf4j-reload4j", "1.7.36"),
            MavenArtifact("ch.qos.reload4j", "reload4j", "1.2.25"),
        ]

    @property
    def log_config_name(self) -> str:
        return "log4j2.properties" if self.log4j2 else "log4j.properties"

    def log_config(self, log_file: Path) -> str:
        """The logging configuration: INFO to ``log_file``, warnings also to the console."""
        return (_LOG4J2 if self.log4j2 else _LOG4J1).format(log_file=log_file)

    def log_config_option(self, config_file: Path) -> str:
        """The JVM system property that points the logging backend at ``config_file``."""
        if self.log4j2:
            return f"-Dlog4j2.configurationFile={config_file}"
        return f"-Dlog4j.configuration=file:{config_file}"


def kafka_release(version: str) -> KafkaRelease:
    """The release ``version``; raises :class:`ServiceError` for a version devstack cannot run."""
    release = KafkaRelease(version)
    if (release.major, release.minor) < (3, 9):
        raise ServiceError(f"Kafka {version} is not supported: devstack runs 3.9 and later (KRaft with KIP-853)")
    return release


@dataclass(frozen=True)
class Listener:
    """A client listener beside ``PLAINTEXT``: bound at ``port``, advertised at ``advertised_port``."""

    name: str
    port: int
    protocol: str = "PLAINTEXT"
    advertised_port: int | None = None


@dataclass(frozen=True)
class BrokerNode:
    """Where one broker+controller process lives and which quorum it belongs to.

    ``voters`` maps the node id of every controller to its controller port; None means a
    single node whose storage is formatted as a dynamic quorum of one (``--standalone``).
    ``replicas`` is the replication factor of every topic, internal ones included; the
    minimum in-sync replicas follow from it (2 of 3, 1 of 1).
    """

    node_id: int
    port: int
    controller_port: int
    log_dir: Path
    voters: Mapping[int, int] | None = None
    replicas: int = 1
    listeners: Sequence[Listener] = field(default_factory=tuple)

    @property
    def min_insync(self) -> int:
        return max(1, self.replicas - 1)


def broker_properties(node: BrokerNode, release: KafkaRelease) -> dict[str, str]:
    """``server.properties`` of a combined broker+controller process, as a dict in file order."""
    controller = f"{HOST}:{node.controller_port}"
    broker = f"{HOST}:{node.port}"
    listeners = [f"PLAINTEXT://{broker}", f"CONTROLLER://{controller}"]
    advertised = list(listeners)
    protocols = ["CONTROLLER:PLAINTEXT", "PLAINTEXT:PLAINTEXT"]
    for extra in node.listeners:
        listeners.append(f"{extra.name}://{HOST}:{extra.port}")
        advertised.append(f"{extra.name}://{HOST}:{extra.advertised_port or extra.port}")
        protocols.append(f"{extra.name}:{extra.protocol}")
    if node.voters is None:
        # Dynamic quorum: `format --standalone` makes this node the only voter.
        quorum = {"controller.quorum.bootstrap.servers": controller}
    else:
        if node.node_id not in node.voters:
            raise ValueError(f"node {node.node_id} is not among the voters {sorted(node.voters)}")
        # A static voter set: every node is formatted alike and knows the others from the start.
        quorum = {
            "controller.quorum.voters": ",".join(
                f"{voter}@{HOST}:{port}" for voter, port in sorted(node.voters.items())
            )
        }
    replicas, min_isr = str(node.replicas), str(node.min_insync)
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        **quorum,
        "controller.listener.names": "CONTROLLER",
        "listeners": ",".join(listeners),
        "advertised.listeners": ",".join(advertised),
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": ",".join(protocols),
        "log.dirs": str(node.log_dir),
        "num.partitions": "1",
        "auto.create.topics.enable": "false",
        # Every topic, internal ones included, on `replicas` brokers; writes with acks=all need
        # all but one of them.
        "default.replication.factor": replicas,
        "min.insync.replicas": min_isr,
        "offsets.topic.replication.factor": replicas,
        "transaction.state.log.replication.factor": replicas,
        "transaction.state.log.min.isr": min_isr,
    }
    if release.share_groups:
        props["share.coordinator.state.topic.replication.factor"] = replicas
        props["share.coordinator.state.topic.min.isr"] = min_isr
    props.update({
        # Consumers in tests join one at a time; waiting for more only adds latency.
        "group.initial.rebalance.delay.ms": "0",
        # After a SIGKILL the new process cannot register until the old
        # incarnation's session expires (9 s by default); keep that short. It is also
        # how long a cluster takes to move leadership away from a killed broker.
        "broker.session.timeout.ms": "4000",
        "broker.heartbeat.interval.ms": "1000",
    })
    if release.consumer_protocol:
        props.update({
            # KIP-848 groups: the session and heartbeat are the broker's; detect a dead member as
            # quickly as classic groups whose clients ask for 6 s / 1 s.
            "group.consumer.min.session.timeout.ms": "6000",
            "group.consumer.session.timeout.ms": "6000",
            "group.consumer.min.heartbeat.interval.ms": "1000",
            "group.consumer.heartbeat.interval.ms": "1000",
        })
    props.update({"num.network.threads": "2", "num.io.threads": "4"})
    return props


def render_properties(props: Mapping[str, str]) -> str:
    return "".join(f"{key}={value}\n" for key, value in props.items())


def format_arguments(node: BrokerNode, cluster_id: str, properties_file: Path) -> list[str]:
    """Arguments of ``kafka.tools.StorageTool`` that format this node's log dir."""
    quorum = ["--standalone"] if node.voters is None else []
    return ["format", *quorum, f"--cluster-id={cluster_id}", f"--config={properties_file}"]


def jvm_heap_options(heap_mb: int) -> list[str]:
    """Heap bounds: start at half the maximum (at least 64 MB), grow up to ``heap_mb``."""
    if heap_mb < 128:
        raise ValueError(f"a broker needs at least 128 MB of heap, not {heap_mb}")
    return [f"-Xms{max(64, heap_mb // 2)}m", f"-Xmx{heap_mb}m"]
