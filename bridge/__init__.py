"""kafka-dramatiq-bridge: process Kafka topics with dramatiq actors, committing offsets only after
the task has finished."""

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

__all__ = [
    # Errors
    "BridgeError",
    "ConfigurationError",
    "FatalError",
    "HandlerError",
    "KafkaUnavailable",
    "LedgerUnavailable",
    # Handlers
    "Record",
    "RecoverableError",
    "Settings",
    "current_record",
    "kafka_handler",
    "on_partitions_assigned",
    "on_partitions_revoked",
]
