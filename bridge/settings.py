"""Configuration: one validated settings object, read from ``BRIDGE_*`` environment variables.

Command-line flags override the environment. Kafka client properties that are not settings of
their own pass through ``kafka`` (``BRIDGE_KAFKA`` as a JSON object, or ``-X name=value``), except
the ones the bridge must control for its guarantees.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from .errors import ConfigurationError

#: librdkafka properties the bridge sets itself. Overriding them would break a guarantee
#: (auto commit / auto offset store / offset reset) or has a setting of its own.
RESERVED_KAFKA_PROPERTIES: dict[str, str] = {
    "enable.auto.commit": "offsets are committed only after the handler finished",
    "enable.auto.offset.store": "offsets are committed only after the handler finished",
    "auto.offset.reset": "use the handler's offset_reset option",
    "bootstrap.servers": "use BRIDGE_BOOTSTRAP_SERVERS",
    "group.id": "use BRIDGE_GROUP_ID",
    "group.protocol": "use BRIDGE_GROUP_PROTOCOL",
    "isolation.level": "use BRIDGE_ISOLATION_LEVEL",
    "enable.partition.eof": "the bridge does not use end-of-partition events",
}


class WorkerSettings(BaseSettings):
    """Settings a worker process reads (through the ledger middleware)."""

    model_config = SettingsConfigDict(env_prefix="BRIDGE_", extra="ignore")

    #: The ack ledger: a Redis URL (``redis://``, ``rediss://`` or ``unix://``).
    redis_url: str = "redis://localhost:6379/0"
    #: Seconds between a worker's looks for new lanes (new partitions, new topics).
    lane_refresh_interval: float = Field(1.0, gt=0, le=60)
    #: Seconds between a worker's heartbeats for the records it is running.
    heartbeat_interval: float = Field(5.0, gt=0, le=600)
    #: Seconds between a worker's looks at the ledger for a record parked until the previous
    #: record of its partition (key) finishes; a finish normally wakes it at once.
    park_recheck_interval: float = Field(1.0, gt=0, le=60)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value


class Settings(WorkerSettings):
    """Settings of the bridge process."""

    #: Kafka bootstrap servers, comma separated.
    bootstrap_servers: str = "localhost:9092"
    #: Kafka consumer group; bridge replicas with the same group split the partitions.
    group_id: str = Field("kafka-dramatiq-bridge", min_length=1)
    #: Consumer group protocol: ``classic`` (cooperative-sticky assignor) or ``consumer`` (KIP-848).
    group_protocol: Literal["classic", "consumer"] = "classic"
    #: ``read_committed`` hides records of aborted transactions from handlers.
    isolation_level: Literal["read_committed", "read_uncommitted"] = "read_committed"
    #: Extra librdkafka properties (security, SASL, SSL, timeouts), passed to the consumer.
    kafka: dict[str, str] = Field(default_factory=dict)
    #: Records of one partition held by the bridge and not yet done (a handler's window option wins).
    window: int = Field(1000, ge=1, le=1_000_000)
    #: Records held and not yet done over all partitions; beyond it partitions are paused.
    max_in_flight: int = Field(20_000, ge=1, le=10_000_000)
    #: Ordered modes: records of one partition (one key) on its lane at once. Workers still run
    #: them one at a time and in order; the ones behind wait their turn, so the next record
    #: starts as soon as the previous one finishes (1: dispatch each only after the previous).
    lane_depth: int = Field(32, ge=1, le=100_000)
    #: Seconds between offset commits (also when idle).
    commit_interval: float = Field(1.0, gt=0, le=300)
    #: Seconds a revoked partition's dispatched records get to finish before its final commit.
    drain_timeout: float = Field(20.0, ge=0, le=600)
    #: Seconds a new owner waits for records of an older assignment still running (ordered modes).
    handover_timeout: float = Field(30.0, ge=0, le=3600)
    #: Seconds a graceful stop waits for dispatched records to finish.
    shutdown_timeout: float = Field(30.0, ge=0, le=3600)
    #: Seconds between one-line progress summaries in the log (0 turns them off).
    progress_interval: float = Field(10.0, ge=0, le=3600)
    #: Seconds a dispatched record may show no sign of life (no start, no worker heartbeat)
    #: before it is dispatched again; covers messages lost in the task broker.
    redispatch_timeout: float = Field(120.0, gt=0, le=86400)
    #: Largest record (key + value + headers, in bytes) sent to the task broker; larger records
    #: go to the dead-letter topic.
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    #: Create missing dead-letter topics at start (one partition, the broker's replication).
    create_dead_letter_topics: bool = True
    #: Start even when a handler topic does not exist yet, and wait for it.
    wait_for_topics: bool = False
    #: Most records taken from the consumer in one poll.
    poll_batch: int = Field(500, ge=1, le=100_000)
    #: Most messages put on lanes in one round trip to the task broker (Redis broker only).
    enqueue_batch: int = Field(500, ge=1, le=100_000)
    #: Testing only: append a JSON line per assignment, dispatch, done fact and commit to this file.
    event_log: str | None = None
    #: Testing only: exit abruptly at the Nth passage of a crash point ("after-enqueue:500";
    #: points: after-enqueue, after-done, after-commit, in-revoke).
    crash_at: str | None = None
    #: Testing only, UNSAFE: commit offsets as soon as records are dispatched (the mistake the
    #: bridge exists to avoid), to prove the reliability suite detects loss.
    unsafe_commit_at_dispatch: bool = False
    #: Log level of the bridge process.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("kafka", mode="before")
    @classmethod
    def _kafka_strings(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): _kafka_value(v) for k, v in value.items()}
        return value

    @field_validator("kafka")
    @classmethod
    def _no_reserved(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name in RESERVED_KAFKA_PROPERTIES:
                raise ValueError(f"{name!r} cannot be set: {RESERVED_KAFKA_PROPERTIES[name]}")
        return value

    @field_validator("crash_at")
    @classmethod
    def _crash_point(cls, value: str | None) -> str | None:
        from .probe import CRASH_POINTS

        if value is not None:
            point, _, count = value.partition(":")
            if point not in CRASH_POINTS or (count and not count.isdigit()):
                raise ValueError(f"must be POINT[:N] with POINT one of {', '.join(CRASH_POINTS)}")
        return value

    @model_validator(mode="after")
    def _drain_fits_poll_interval(self) -> Settings:
        limit_ms = int(self.kafka.get("max.poll.interval.ms", "60000"))
        if self.drain_timeout * 1000 >= limit_ms:
            raise ValueError(
                f"drain_timeout ({self.drain_timeout}s) must be shorter than max.poll.interval.ms ({limit_ms} ms), "
                "or the group evicts the bridge while it drains"
            )
        return self


def _kafka_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment with ``overrides`` on top (``None`` values are ignored).

    Raises:
      ConfigurationError: naming every invalid setting.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except SettingsError as e:
        # Raised for a value that is not even parseable, e.g. BRIDGE_KAFKA that is not JSON.
        field = str(e).split('"')[1] if '"' in str(e) else "settings"
        raise ConfigurationError(f"invalid configuration: BRIDGE_{field.upper()}: {e}") from None
    except ValidationError as e:
        problems = []
        for error in e.errors():
            name = ".".join(str(p) for p in error["loc"]) or "settings"
            env = f"BRIDGE_{str(error['loc'][0]).upper()}" if error["loc"] else "BRIDGE_*"
            problems.append(f"{name} ({env}): {error['msg']}")
        raise ConfigurationError("invalid configuration: " + "; ".join(problems)) from None
