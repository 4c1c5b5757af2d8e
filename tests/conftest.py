"""Session-wide real services (Kafka, redis-server) and per-test clients.

Set ``BRIDGE_TEST_BOOTSTRAP_SERVERS`` / ``BRIDGE_TEST_REDIS_URL`` to test against
services you run yourself; otherwise devstack starts them in a temporary dir, Kafka in
the version ``BRIDGE_TEST_KAFKA_VERSION`` names (default: devstack's). The Kafka and
Redis clusters start on first use. A service that cannot be started fails the tests
that need it: nothing is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from devstack import KafkaCluster, KafkaServer, RabbitServer, RedisCluster, RedisServer, ServiceError
from tests.support.kafka import create_topic, delete_topics, unique_name
from tests.support.pipeline import Pipeline
from tests.support.services import (
    ExternalKafka,
    ExternalRabbit,
    ExternalRedis,
    KafkaEndpoint,
    RabbitEndpoint,
    RedisEndpoint,
)

BOOTSTRAP_ENV = "BRIDGE_TEST_BOOTSTRAP_SERVERS"
REDIS_URL_ENV = "BRIDGE_TEST_REDIS_URL"
RABBITMQ_URL_ENV = "BRIDGE_TEST_RABBITMQ_URL"
KAFKA_VERSION_ENV = "BRIDGE_TEST_KAFKA_VERSION"

_startup_report: list[str] = []


def _note(line: str) -> None:
    _startup_report.append(line)
    print(line)


def kafka_version() -> str | None:
    """The Kafka version the session's brokers run: ``BRIDGE_TEST_KAFKA_VERSION``, or None for devstack's default."""
    return os.environ.get(KAFKA_VERSION_ENV) or None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _startup_report:
        terminalreporter.section("devstack")
        for line in _startup_report:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaEndpoint]:
    """A running Kafka: ``BRIDGE_TEST_BOOTSTRAP_SERVERS`` if set, else a fresh single-node KRaft broker."""
    external = os.environ.get(BOOTSTRAP_ENV)
    if external:
        try:
            AdminClient({"bootstrap.servers": external}).list_topics(timeout=15)
        except KafkaException as exc:
            pytest.fail(f"{BOOTSTRAP_ENV}={external} does not answer: {exc}", pytrace=False)
        _note(f"kafka: using {external} from {BOOTSTRAP_ENV}")
        yield ExternalKafka(external)
        return
    try:
        server = KafkaServer(tmp_path_factory.mktemp("kafka"), version=kafka_version())
        seconds = server.start()
    except ServiceError as exc:
        pytest.fail(f"could not start Kafka (set {BOOTSTRAP_ENV} to use your own):\n{exc}", pytrace=False)
    _note(f"kafka: {server.version} started at {server.bootstrap_servers} in {seconds:.1f}s "
          f"(data in {server.data_dir})")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisEndpoint]:
    """A running Redis: ``BRIDGE_TEST_REDIS_URL`` if set, else a fresh redis-server."""
    external = os.environ.get(REDIS_URL_ENV)
    if external:
        client = redis.Redis.from_url(external, socket_connect_timeout=5)
        try:
            client.ping()
        except redis.RedisError as exc:
            pytest.fail(f"{REDIS_URL_ENV}={external} does not answer: {exc}", pytrace=False)
        finally:
            client.close()
        _note(f"redis: using {external} from {REDIS_URL_ENV}")
        yield ExternalRedis(external)
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        seconds = server.start(timeout=30)
    except ServiceError as exc:
        server.stop()
        pytest.fail(f"could not start redis-server (set {REDIS_URL_ENV} to use your own):\n{exc}", pytrace=False)
    _note(f"redis: started at {server.url} in {seconds:.2f}s (data in {server.data_dir})")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitEndpoint]:
    """A running RabbitMQ: ``BRIDGE_TEST_RABBITMQ_URL`` if set, else a fresh rabbitmq-server node
    (started on first use: only the RabbitMQ fleet tests need it)."""
    external = os.environ.get(RABBITMQ_URL_ENV)
    if external:
        _note(f"rabbitmq: using {external} from {RABBITMQ_URL_ENV}")
        yield ExternalRabbit(external)
        return
    server = RabbitServer(tmp_path_factory.mktemp("rabbitmq"))
    try:
        seconds = server.start(timeout=120)
    except ServiceError as exc:
        server.stop()
        pytest.fail(f"could not start rabbitmq-server (set {RABBITMQ_URL_ENV} to use your own):\n{exc}",
                    pytrace=False)
    _note(f"rabbitmq: started at {server.url} in {seconds:.1f}s (data in {server.data_dir})")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """A 3-broker KRaft cluster for the whole session, started on first use (use ``kafka_cluster``)."""
    try:
        cluster = KafkaCluster(tmp_path_factory.mktemp("kafka-cluster"), version=kafka_version())
        seconds = cluster.start()
    except ServiceError as exc:
        pytest.fail(f"could not start the Kafka cluster:\n{exc}", pytrace=False)
    rss = sum(size or 0 for size in cluster.rss_bytes().values()) / 2**20
    _note(f"kafka cluster: {cluster.version} started at {cluster.bootstrap_servers} in {seconds:.1f}s "
          f"({rss:.0f} MB resident, data in {cluster.data_dir})")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def kafka_cluster(kafka_cluster_session: KafkaCluster) -> Iterator[KafkaCluster]:
    """The session's Kafka cluster with all three brokers up, before and after the test: brokers a test
    killed or stopped are started again."""
    kafka_cluster_session.heal()
    yield kafka_cluster_session
    kafka_cluster_session.heal()


@pytest.fixture(scope="session")
def redis_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A Redis Cluster (3 primaries, 3 replicas) for the whole session, started on first use
    (use ``redis_cluster``)."""
    try:
        cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
        seconds = cluster.start()
    except ServiceError as exc:
        pytest.fail(f"could not start the Redis cluster:\n{exc}", pytrace=False)
    _note(f"redis cluster: started at {', '.join(cluster.addresses)} in {seconds:.1f}s (data in {cluster.data_dir})")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisCluster) -> Iterator[RedisCluster]:
    """The session's Redis Cluster, healthy with all six nodes up before and after the test, and empty
    when the test starts (roles may have moved: a failover is not undone)."""
    redis_cluster_session.heal()
    for primary in redis_cluster_session.primaries():
        primary.command("FLUSHALL")
    yield redis_cluster_session
    redis_cluster_session.heal()


@pytest.fixture(scope="session")
def admin(kafka: KafkaEndpoint) -> AdminClient:
    """An AdminClient for the session's Kafka."""
    return AdminClient({"bootstrap.servers": kafka.bootstrap_servers})


TopicFactory = Callable[..., str]


@pytest.fixture
def topic_factory(admin: AdminClient) -> Iterator[TopicFactory]:
    """``topic_factory(partitions=1, *, prefix="t", config=None) -> name``.

    Creates a uniquely named topic, returns once metadata shows all its
    partitions with a leader, and deletes it after the test.
    """
    created: list[str] = []

    def make(partitions: int = 1, *, prefix: str = "t", config: dict[str, str] | None = None) -> str:
        name = create_topic(admin, unique_name(prefix), partitions, config)
        created.append(name)
        return name

    yield make
    delete_topics(admin, created)


@pytest.fixture
def redis_client(redis_server: RedisEndpoint) -> Iterator[redis.Redis]:
    """A client on the test DB, which is empty when the test starts and flushed after it."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
def pipeline_factory(
    kafka: KafkaEndpoint, redis_server: RedisEndpoint, redis_client: redis.Redis, tmp_path: Path
) -> Iterator[Callable[..., Pipeline]]:
    made: list[Pipeline] = []

    def make(
        topics: list[str], *, kafka_endpoint: KafkaEndpoint | None = None, redis_url: str | None = None, **options: str
    ) -> Pipeline:
        pipeline = Pipeline(kafka_endpoint or kafka, redis_url or redis_server.url, topics, tmp_path, **options)
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.close()
