"""Apache Kafka in single-node KRaft mode, from the official Maven Central artifacts."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec

from devstack.kafka_artifacts import class_archive, fetch_kafka, java_binary, kafka_libs
from devstack.kafka_config import (
    DEFAULT_KAFKA_VERSION,
    BrokerNode,
    KafkaRelease,
    Listener,
    broker_properties,
    format_arguments,
    jvm_heap_options,
    kafka_release,
    render_properties,
)
from devstack.ports import HOST, free_port, free_ports
from devstack.process import Service, ServiceError

_log = logging.getLogger(__name__)

#: Heap ceiling of a single broker; cluster nodes get less (see devstack.kafka_cluster).
HEAP_MB = 512

JVM_OPTS = [
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (22 characters).

    Like Kafka's own ``Uuid.randomUuid``, ids starting with ``-`` are drawn again:
    command-line parsers take them for options.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass(frozen=True)
class Security:
    """Two more listeners for clients that authenticate: ``SASL_PLAINTEXT`` with SCRAM-SHA-512
    and ``SSL`` (a server certificate, no client certificates), with Kafka's standard
    authorizer on. The ``PLAINTEXT`` listener stays for administration: its clients
    (``User:ANONYMOUS``) and ``User:admin`` are super users; every other principal needs ACLs.
    SCRAM users are created with the admin API (``alter_user_scram_credentials``).
    """

    #: PEM file with the server's PKCS#8 private key followed by its certificate chain.
    keystore: Path


class KafkaServer(Service):
    """One Kafka process acting as broker and controller, with all its state in ``data_dir``.

    Ports and the cluster id are chosen on the first start and kept in
    ``devstack-kafka.json``, so a restart on the same data dir is the same cluster
    at the same address. ``port`` pins the broker port; the controller port can
    never change once the storage is formatted, because the voter set records it.

    ``version`` picks the Kafka release (default :data:`DEFAULT_KAFKA_VERSION`, or the one
    that formatted an existing data dir); its jars are resolved on first use. A data dir
    formatted by one version refuses to start with another. ``heap_mb`` caps the JVM heap.
    """

    name = "kafka"

    def __init__(
        self, data_dir: Path, *, port: int | None = None, proxy_port: int | None = None,
        security: Security | None = None, version: str | None = None, heap_mb: int = HEAP_MB,
    ) -> None:
        super().__init__(data_dir)
        self.security = security
        self._requested_port = port
        # A second listener, advertised at ``proxy_port``: clients that bootstrap there stay
        # behind a proxy (see ``proxied_port``) for every connection, not just the first.
        self._proxy_port = proxy_port
        self._state: dict[str, Any] | None = self._load_state()
        saved = None if self._state is None else self._state.get("version")
        self.release: KafkaRelease = kafka_release(version or (str(saved) if saved else DEFAULT_KAFKA_VERSION))
        self._heap = jvm_heap_options(heap_mb)
        self._probe: AdminClient | None = None
        # Set only for the run that records the class-data-sharing archive.
        self._archive_to: Path | None = None

    # -- addresses ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """Broker (PLAINTEXT) port; known once the server has been started, or when given."""
        if self._state is None and self._requested_port is not None:
            return self._requested_port
        return int(self._require_state()["port"])

    @property
    def controller_port(self) -> int:
        return int(self._require_state()["controller_port"])

    @property
    def cluster_id(self) -> str:
        return str(self._require_state()["cluster_id"])

    @property
    def bootstrap_servers(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def version(self) -> str:
        """The Kafka release this server runs."""
        return self.release.version

    @property
    def group_protocols(self) -> tuple[str, ...]:
        """Consumer group protocols (``group.protocol``) this broker serves: ``classic``, and
        ``consumer`` (KIP-848) from Kafka 4.0 on."""
        return self.release.group_protocols

    @property
    def sasl_bootstrap_servers(self) -> str:
        """The SASL_PLAINTEXT (SCRAM-SHA-512) listener; needs ``security``."""
        return f"{HOST}:{self._require_state()['sasl_port']}"

    @property
    def ssl_bootstrap_servers(self) -> str:
        """The SSL listener; needs ``security``."""
        return f"{HOST}:{self._require_state()['ssl_port']}"

    # -- files --------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.data_dir / "devstack-kafka.json"

    @property
    def properties_file(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log4j_file(self) -> Path:
        return self.data_dir / self.release.log_config_name

    @property
    def server_log(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "kraft-logs"

    def _log_files(self) -> list[Path]:
        return [self.console_log, self.server_log]

    @property
    def cmdline_markers(self) -> list[str]:
        return ["kafka.Kafka", str(self.properties_file)]

    # -- Service ------------------------------------------------------------------------

    def _prepare(self) -> None:
        saved = None if self._state is None else self._state.get("version")
        if saved is not None and saved != self.version:
            raise ServiceError(
                f"Kafka in {self.data_dir} was formatted by Kafka {saved}; it cannot start with {self.version}"
            )
        fetch_kafka(self.version)
        if self._archive_to is None:
            build_class_archive(self.version)
        state = self._state or self._new_state()
        state["version"] = self.version
        if self._requested_port is not None:
            state["port"] = self._requested_port
        if self._proxy_port is not None:
            state.setdefault("proxied_port", free_port())
            state["proxy_port"] = self._proxy_port
        if self.security is not None and "sasl_port" not in state:
            state["sasl_port"], state["ssl_port"] = free_ports(2)
        self._state = state
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")
        self.properties_file.write_text(self._properties())
        self.log4j_file.write_text(self.release.log_config(self.server_log))
        if not (self.log_dir / "meta.properties").exists():
            self._format_storage()

    def _new_state(self) -> dict[str, Any]:
        """Ports and cluster id of a data dir started for the first time."""
        port, controller_port = free_ports(2)
        return {"cluster_id": new_cluster_id(), "port": port, "controller_port": controller_port}

    def _command(self) -> list[str]:
        return [*self._java(), "kafka.Kafka", str(self.properties_file)]

    def _ready(self, budget: float) -> bool:
        if self._probe is None:
            self._probe = quiet_admin(self.bootstrap_servers)
        try:
            metadata = self._probe.list_topics(timeout=max(budget, 0.2))
        except KafkaException:
            return False
        if not metadata.brokers:
            return False
        # After a restart the broker answers metadata before it leads its
        # partitions again, and its metadata names a leader slightly before the
        # partition can serve; clients would get NOT_LEADER errors meanwhile. So
        # every partition must have a leader that answers a ListOffsets request.
        partitions: list[TopicPartition] = []
        for name, topic in metadata.topics.items():
            if topic.error is not None or any(p.leader < 0 or p.error is not None for p in topic.partitions.values()):
                return False
            partitions += [TopicPartition(name, p) for p in topic.partitions]
        if partitions:
            futures = self._probe.list_offsets(
                {tp: _LATEST for tp in partitions}, request_timeout=max(budget, 0.5)
            )
            try:
                for future in futures.values():
                    future.result()
            except KafkaException:
                return False
        self._probe = None
        return True

    def start(self, timeout: float = 120) -> float:
        """Format storage on first use, launch the broker and wait until it serves metadata.

        Ready means a metadata request lists this broker and every partition of every
        existing topic has a leader. Returns the seconds from launch to ready.
        """
        return super().start(timeout)

    def wait_ready(self, timeout: float) -> None:
        self._probe = None
        try:
            super().wait_ready(timeout)
        finally:
            self._probe = None

    # -- internals ----------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any] | None:
        try:
            loaded = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        if not isinstance(loaded, dict):
            raise ServiceError(f"{self.state_file} is not a JSON object")
        return loaded

    def _require_state(self) -> dict[str, Any]:
        if self._state is None:
            raise ServiceError(f"Kafka in {self.data_dir} has no ports yet: start it first")
        return self._state

    def _java(self) -> list[str]:
        sharing: list[str] = []
        archive = class_archive(self.version)
        if self._archive_to is not None:
            sharing = [f"-XX:ArchiveClassesAtExit={self._archive_to}"]
        elif archive.exists():
            # Loading pre-parsed classes saves about 40% of the start-up time.
            sharing = [f"-XX:SharedArchiveFile={archive}"]
        return [
            java_binary(),
            *self._heap,
            *JVM_OPTS,
            *sharing,
            self.release.log_config_option(self.log4j_file),
            f"-Dkafka.logs.dir={self.data_dir}",
            "-cp",
            str(kafka_libs(self.version) / "*"),  # expanded by the JVM, not a shell
        ]

    @property
    def proxied_port(self) -> int:
        """Port of the listener that advertises the proxy's address (``proxy_port``)."""
        return int(self._require_state()["proxied_port"])

    def _node(self) -> BrokerNode:
        """This process's place in its cluster: a single node, the only voter of its quorum."""
        state = self._require_state()
        listeners: list[Listener] = []
        if "proxy_port" in state:
            listeners.append(Listener("PROXIED", int(state["proxied_port"]), advertised_port=int(state["proxy_port"])))
        if self.security is not None:
            listeners += [
                Listener("SASL_PLAINTEXT", int(state["sasl_port"]), protocol="SASL_PLAINTEXT"),
                Listener("SSL", int(state["ssl_port"]), protocol="SSL"),
            ]
        return BrokerNode(
            node_id=1, port=self.port, controller_port=self.controller_port, log_dir=self.log_dir,
            listeners=tuple(listeners),
        )

    def _properties(self) -> str:
        props = broker_properties(self._node(), self.release)
        if self.security is not None:
            props.update({
                "sasl.enabled.mechanisms": "SCRAM-SHA-512",
                "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                "listener.name.ssl.ssl.keystore.type": "PEM",
                "listener.name.ssl.ssl.keystore.location": str(self.security.keystore),
                "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                "super.users": "User:ANONYMOUS;User:admin",
                "allow.everyone.if.no.acl.found": "false",
            })
        return render_properties(props)

    def _format_storage(self) -> None:
        result = subprocess.run(
            [
                *self._java(),
                "kafka.tools.StorageTool",
                *format_arguments(self._node(), self.cluster_id, self.properties_file),
            ],
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ServiceError(
                f"kafka-storage format in {self.data_dir} failed (exit {result.returncode})\n"
                f"{result.stdout}\n{result.stderr}"
            )


def _quiet_logger() -> logging.Logger:
    # librdkafka reports every refused connection while the broker boots; those
    # are expected here and would only clutter the caller's output.
    logger = logging.getLogger("devstack.kafka.probe")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger


_QUIET = _quiet_logger()
_LATEST = OffsetSpec.latest()  # type: ignore[no-untyped-call]


def _ignore_error(_error: object) -> None:
    """Connection errors while the broker boots are the expected answer, not a failure."""


def _probe_config(bootstrap_servers: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap_servers,
        # Retry fast while the port is still closed, instead of backing off to 10 s.
        "reconnect.backoff.ms": 50,
        "reconnect.backoff.max.ms": 250,
    }


def quiet_admin(bootstrap_servers: str) -> AdminClient:
    """An AdminClient for probing brokers that may be down: it retries fast and logs nothing.

    Never ask it anything of a group coordinator (``describe_consumer_groups``,
    ``list_consumer_group_offsets``, ...): use :func:`quiet_consumer`. librdkafka frees such
    a request when it times out before the coordinator is reachable, and touches it again
    once the coordinator is: an assertion then aborts the whole process.
    """
    return AdminClient(_probe_config(bootstrap_servers), logger=_QUIET, error_cb=_ignore_error)


def quiet_consumer(bootstrap_servers: str, group: str) -> Consumer:
    """A consumer of ``group`` for asking its coordinator, like :func:`quiet_admin` retrying
    fast and logging nothing; it commits nothing."""
    config = {**_probe_config(bootstrap_servers), "group.id": group, "enable.auto.commit": False}
    return Consumer(config, logger=_QUIET, error_cb=_ignore_error)


def build_class_archive(version: str = DEFAULT_KAFKA_VERSION) -> Path | None:
    """Record a class-data-sharing archive of a broker start, once per Kafka version and JVM.

    A throwaway broker starts with ``-XX:ArchiveClassesAtExit`` and stops
    gracefully, which writes the archive; later starts load it. Returns the
    archive, or None if it could not be made (the broker then starts without it,
    and a ``.failed`` marker stops further attempts).
    """
    archive = class_archive(version)
    failed = archive.with_suffix(".failed")
    if archive.exists():
        return archive
    if failed.exists():
        return None
    partial = archive.with_name(f"{archive.stem}.{os.getpid()}.partial")
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kafka-cds-") as tmp:
        server = KafkaServer(Path(tmp), version=version)
        server._archive_to = partial
        try:
            server.start(timeout=180)
        except ServiceError as exc:
            failed.write_text(str(exc))
            _log.warning("no class-data-sharing archive for Kafka %s: %s", version, exc)
            return None
        finally:
            server.stop(timeout=120)  # the archive is written while the JVM exits
    if not partial.exists() or partial.stat().st_size == 0:
        failed.write_text("the JVM wrote no archive\n")
        partial.unlink(missing_ok=True)
        return None
    partial.replace(archive)  # atomic: concurrent builders each finish with a whole file
    _log.info("recorded %s in %.1fs", archive, time.monotonic() - began)
    return archive
