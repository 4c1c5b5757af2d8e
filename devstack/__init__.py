"""Real services for tests, benchmarks and local runs: Kafka, Redis, RabbitMQ and dramatiq workers.

Every process is started by this package, bound to 127.0.0.1, and signalled only
through the pid it was started with.
"""

from devstack.kafka import KafkaServer, build_class_archive
from devstack.kafka_artifacts import KAFKA_VERSION, fetch_kafka
from devstack.kafka_cluster import KafkaCluster
from devstack.kafka_config import DEFAULT_KAFKA_VERSION, TESTED_KAFKA_VERSIONS, kafka_release
from devstack.paths import cache_dir
from devstack.ports import free_port, free_ports
from devstack.process import ServiceError
from devstack.rabbitmq import RabbitServer
from devstack.redis import RedisServer
from devstack.redis_cluster import RedisCluster
from devstack.workers import DramatiqWorkers

__all__ = [
    "DEFAULT_KAFKA_VERSION",
    "KAFKA_VERSION",
    "TESTED_KAFKA_VERSIONS",
    "DramatiqWorkers",
    "KafkaCluster",
    "KafkaServer",
    "RabbitServer",
    "RedisCluster",
    "RedisServer",
    "ServiceError",
    "build_class_archive",
    "cache_dir",
    "fetch_kafka",
    "free_port",
    "free_ports",
    "kafka_release",
]
