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
from .ledger.connection import SCHEMES, cluster_nodes, is_cluster
from .probe import CRASH_POINTS

#: ``BRIDGE_LANES``: how partitions map onto dramatiq queues (see :mod:`bridge.lanes`).
LaneSetting = Literal["auto", "topic", "partition"]

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

    redis_url: str = Field(
        "redis://localhost:6379/0",
        description=(
            "The ack ledger: one Redis (`redis://`, `rediss://` or `unix://`) or a Redis Cluster"
            " (`redis+cluster://host:port,host:port`, `rediss+cluster://` over TLS; one node is enough to find"
            " the others, more let it start with one down). Bridges and workers of one group must use the same"
            " one."
        ),
    )
    lane_refresh_interval: float = Field(
        1.0, gt=0, le=60,
        description="Seconds between a worker's looks for new lanes (new partitions, new topics).",
    )
    heartbeat_interval: float = Field(
        5.0, gt=0, le=600,
        description=(
            "Seconds between a worker's heartbeats for the records it is running; they keep a long handler "
            "from being dispatched again."
        ),
    )
    park_recheck_interval: float = Field(
        1.0, gt=0, le=60,
        description=(
            "A worker parks a record whose predecessor in its partition (key) has not finished, and runs it "
            "as soon as that one finishes; this is how often it looks at the ledger should that news be "
            "missed. See [ordered lanes](concepts.md#ordered-lanes)."
        ),
    )

    max_json_depth: int = Field(
        128, ge=1, le=10_000,
        description=(
            "Deepest nesting of arrays and objects the `json` codec accepts; a deeper key or value fails as"
            " undecodable (dead-lettered with reason `undecodable`) before the handler runs."
        ),
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(SCHEMES):
            raise ValueError(f"must start with {', '.join(SCHEMES[:-1])} or {SCHEMES[-1]}")
        if is_cluster(value):
            cluster_nodes(value)  # its ValueError names what is wrong
        return value


class Settings(WorkerSettings):
    """Settings of the bridge process."""

    bootstrap_servers: str = Field(
        "localhost:9092",
        description="Kafka bootstrap servers, comma separated.",
    )
    group_id: str = Field(
        "kafka-dramatiq-bridge", min_length=1,
        description=(
            "Consumer group. Bridge replicas with the same group split the partitions; it also names the "
            "lanes and the ledger keys."
        ),
    )
    group_protocol: Literal["classic", "consumer"] = Field(
        "classic",
        description=(
            "`classic` (cooperative-sticky assignor) or `consumer` (KIP-848, Kafka 4). With `consumer` the"
            " broker assigns partitions and owns the session and heartbeat timeouts"
            " (`group.consumer.session.timeout.ms`), so `session.timeout.ms` and `heartbeat.interval.ms`"
            " in `BRIDGE_KAFKA` are refused at start."
        ),
    )
    isolation_level: Literal["read_committed", "read_uncommitted"] = Field(
        "read_committed",
        description=(
            "`read_committed` hides records of aborted transactions from handlers; `read_uncommitted` does "
            "not."
        ),
    )
    kafka: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Any other librdkafka consumer property, as a JSON object (`{\"security.protocol\": \"SASL_SSL\"}`): "
            "security, SASL, SSL, timeouts."
        ),
    )
    window: int = Field(
        1000, ge=1, le=1_000_000,
        description=(
            "Records of one partition held by the bridge and not yet done; at the window the partition is "
            "paused. A handler's `window` option wins."
        ),
    )
    max_in_flight: int = Field(
        20_000, ge=1, le=10_000_000,
        description="Records held and not yet done over all partitions; beyond it every partition is paused.",
    )
    lanes: LaneSetting = Field(
        "auto",
        description=(
            "How partitions map onto dramatiq queues: `topic` (one queue per topic, shared by its "
            "partitions), `partition` (one queue per partition), or `auto`: `topic` for handlers on "
            "dramatiq's Redis broker and for `none` ordering, `partition` for ordered handlers on other "
            "brokers. Each queue costs every worker process a consumer thread and a connection. See "
            "[lanes and queues](concepts.md#lanes-and-queues)."
        ),
    )
    lane_depth: int = Field(
        32, ge=1, le=100_000,
        description=(
            "`partition` and `key` modes: records of one partition (one key) dispatched at once. They still "
            "run one at a time and in offset order; with dramatiq's Redis and RabbitMQ brokers the ones "
            "behind the first are staged in the ledger, and the worker that finishes a record starts the "
            "next at once (see [ordered lanes](concepts.md#ordered-lanes)). `1` dispatches each record only "
            "after the previous one is done."
        ),
    )
    commit_interval: float = Field(
        1.0, gt=0, le=300,
        description="Seconds between offset commits (also when idle).",
    )
    drain_timeout: float = Field(
        20.0, ge=0, le=600,
        description=(
            "Seconds a revoked partition's dispatched records get to finish before its final commit. Must "
            "stay below `max.poll.interval.ms` (60 s by default)."
        ),
    )
    handover_timeout: float = Field(
        30.0, ge=0, le=3600,
        description=(
            "Seconds a new owner waits for records of an older assignment that are still running (ordered "
            "modes)."
        ),
    )
    rejoin_timeout: float = Field(
        120.0, ge=0, le=3600,
        description=(
            "Seconds the bridge may stay outside its consumer group after losing its partitions (a session "
            "timeout) while Kafka answers; then it replaces its Kafka consumer with a new one, which joins "
            "afresh (once per loss). 0: never. Keep it above `max.poll.interval.ms` plus `session.timeout.ms`, "
            "the longest an ordinary rebalance takes."
        ),
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, le=3600,
        description="Seconds a graceful stop waits for dispatched records to finish.",
    )
    progress_interval: float = Field(
        10.0, ge=0, le=3600,
        description="Seconds between one-line progress summaries in the log; `0` turns them off.",
    )
    status_interval: float = Field(
        5.0, gt=0, le=3600,
        description=(
            "Seconds between the summaries a bridge publishes in the ledger for `status` (independent of the "
            "progress line)."
        ),
    )
    redispatch_timeout: float = Field(
        120.0, gt=0, le=86400,
        description=(
            "Seconds a dispatched record may show no sign of life (no start, no heartbeat) before it is "
            "dispatched again: its message was lost in the task broker (purged queue, broker restarted "
            "without persistence) or its worker died. Set it above the longest time a message waits in its "
            "lane."
        ),
    )
    stuck_after: float = Field(
        300.0, ge=0, le=7 * 86400,
        description=(
            "Seconds a record may hold its partition (the oldest unfinished record, with later records waiting"
            " or done behind it) before one WARNING names it; `0` turns the warning off. Its offset and age are"
            " in `status` and on `/metrics` either way. See [stuck records](failures.md#stuck-records)."
        ),
    )
    max_message_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024,
        description=(
            "Largest record (key + value + headers) sent to the task broker; a larger one goes to the "
            "dead-letter topic with reason `too-large`."
        ),
    )
    create_dead_letter_topics: bool = Field(
        True,
        description=(
            "Create missing dead-letter topics at start, and again when a write finds one missing (one partition,"
            " the broker's default replication)."
        ),
    )
    wait_for_topics: bool = Field(
        False,
        description=(
            "Start even when a handler's topic does not exist, and wait for it. By default a missing topic "
            "stops the bridge at start with an error naming it."
        ),
    )
    poll_batch: int = Field(
        500, ge=1, le=100_000,
        description="Most records taken from the consumer in one poll.",
    )
    enqueue_batch: int = Field(
        500, ge=1, le=100_000,
        description=(
            "Most messages put on lanes in one round trip to Redis (dramatiq's Redis broker; other brokers "
            "get one `enqueue` per message)."
        ),
    )
    http_host: str = Field(
        "0.0.0.0",
        description=(
            "Address the HTTP server listens on (`/metrics`, `/livez`, `/readyz`; see "
            "[operations](operations.md#metrics))."
        ),
    )
    http_port: int = Field(
        9400, ge=0, le=65535,
        description=(
            "Port of that server; `0` turns it off. A port already in use stops the bridge at start (exit "
            "code 2)."
        ),
    )
    health_stall_timeout: float = Field(
        60.0, gt=0, le=3600,
        description=(
            "`/livez` answers 503 when the main loop has not polled Kafka for this many seconds, so an "
            "orchestrator restarts the bridge."
        ),
    )
    health_max_record_age: float = Field(
        0.0, ge=0, le=7 * 86400,
        description=(
            "`/livez` answers 503 when a dispatched record has been unfinished for this many seconds; `0` "
            "turns the check off. Set it above the longest handler run plus the longest wait on a lane."
        ),
    )
    health_outage_timeout: float = Field(
        10.0, ge=0, le=3600,
        description=(
            "`/readyz` answers 503 when the ledger (Redis) or the task broker has not answered for this many "
            "seconds."
        ),
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description=(
            "`text` for people; `json` for one JSON object per line (`ts`, `level`, `logger`, `message`, "
            "`pid`, and `topic`, `partition`, `offset` on record-level lines). Secrets are masked in both."
        ),
    )
    event_log: str | None = Field(
        None,
        description="Append one JSON line per assignment, revoke, loss, dispatch, done fact and commit to this file.",
        json_schema_extra={"group": "testing"},
    )
    crash_at: str | None = Field(
        None,
        description=(
            "`POINT[:N]`: exit abruptly (code 86) at the Nth passage of a crash point: `after-enqueue`, "
            "`after-done`, `after-commit`, `in-revoke`."
        ),
        json_schema_extra={"group": "testing"},
    )
    unsafe_commit_at_dispatch: bool = Field(
        False,
        description=(
            "UNSAFE: commit offsets as soon as records are dispatched, the mistake the bridge exists to "
            "avoid; the suite's negative control uses it to prove that it detects loss."
        ),
        json_schema_extra={"group": "testing"},
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO",
        description="`DEBUG`, `INFO`, `WARNING` or `ERROR`.",
    )

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
