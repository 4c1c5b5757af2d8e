"""kafka-dramatiq-bridge: process Kafka topics with dramatiq actors, committing offsets only after
the task has finished."""

from .batch import BatchFailed
from .errors import (
    BridgeError,
    ConfigurationError,
    FatalError,
    HandlerError,
    KafkaUnavailable,
    LedgerUnavailable,
    RecoverableError,
)
from .handlers import kafka_handler, on_partitions_assigned, on_partitions_revoked
from .record import Record, current_record
from .settings import Settings

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 - grouped by what they are for
    # Errors
    "BridgeError",
    "ConfigurationError",
    "FatalError",
    "HandlerError",
    "KafkaUnavailable",
    "LedgerUnavailable",
    "RecoverableError",
    # Handlers
    "BatchFailed",
    "Record",
    "current_record",
    "kafka_handler",
    "on_partitions_assigned",
    "on_partitions_revoked",
    # Configuration
    "Settings",
]
