"""Endpoints of the services a test talks to, whether devstack started them or not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class KafkaEndpoint(Protocol):
    """What tests may rely on from the ``kafka`` fixture."""

    @property
    def bootstrap_servers(self) -> str: ...


class RedisEndpoint(Protocol):
    """What tests may rely on from the ``redis_server`` fixture."""

    @property
    def url(self) -> str: ...


class RabbitEndpoint(Protocol):
    """What tests may rely on from the ``rabbitmq`` fixture."""

    @property
    def url(self) -> str: ...


@dataclass(frozen=True)
class ExternalKafka:
    """A Kafka cluster given by ``BRIDGE_TEST_BOOTSTRAP_SERVERS``; it cannot be stopped or killed."""

    bootstrap_servers: str


@dataclass(frozen=True)
class ExternalRedis:
    """A Redis server given by ``BRIDGE_TEST_REDIS_URL``; it cannot be stopped or killed."""

    url: str


@dataclass(frozen=True)
class ExternalRabbit:
    """A RabbitMQ broker given by ``BRIDGE_TEST_RABBITMQ_URL``; it cannot be stopped or killed."""

    url: str
