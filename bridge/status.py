"""``status``: per partition committed offset, end offset, lag in records and in seconds, and what
the ledger holds.

Reads Kafka (committed and end offsets, and the timestamp of the record at the committed offset)
and the ledger (the summary each bridge publishes), so it works whether or not a bridge is running.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from .consumer import consumer_config
from .errors import KafkaUnavailable, LedgerUnavailable
from .keys import PartitionKeys, status_key
from .ledger import connect
from .registry import Handler
from .settings import Settings
from .timelag import lag_seconds, read_timestamps

#: Errors that can clear while the command waits: a broker not reachable yet, or one whose group
#: coordinator is still loading or moving.
_TRANSIENT = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._TIMED_OUT,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
    }
)


def _ask(consumer: Any, call: Any, what: str, settings: Settings, timeout: float) -> Any:
    """``call(seconds)`` in slices of at most a second until it answers or ``timeout`` passes.

    The consumer never polls for records, so its queue is served between slices: that hands
    librdkafka's log lines to the ``bridge.kafka`` logger as they happen, not all at close.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call(min(max(deadline - time.monotonic(), 0.1), 1.0))
        except KafkaException as e:
            error = e.args[0]
            code = error.code() if isinstance(error, KafkaError) else None
            if code in _TRANSIENT and time.monotonic() < deadline:
                consumer.poll(0.1)
                continue
            raise KafkaUnavailable(f"cannot reach Kafka at {settings.bootstrap_servers} ({what}): {e}") from e
        finally:
            consumer.poll(0)


def collect(settings: Settings, handlers: Mapping[str, Handler], timeout: float = 10.0) -> list[dict[str, Any]]:
    """One row per partition of every handler topic."""
    consumer = Consumer(consumer_config(settings))
    try:
        metadata = _ask(consumer, lambda t: consumer.list_topics(timeout=t), "metadata", settings, timeout)
        partitions: list[TopicPartition] = []
        missing: list[str] = []
        for topic in sorted(handlers):
            info = metadata.topics.get(topic)
            if info is None or info.error is not None:
                missing.append(topic)
                continue
            partitions.extend(TopicPartition(topic, p) for p in sorted(info.partitions))
        stored = _ask(
            consumer, lambda t: consumer.committed(partitions, timeout=t), "committed offsets", settings, timeout
        )
        committed = {(tp.topic, tp.partition): tp.offset for tp in stored}
        ends = {}
        for tp in partitions:
            _, high = _ask(
                consumer,
                lambda t, tp=tp: consumer.get_watermark_offsets(tp, timeout=t),
                f"end offset of {tp.topic}[{tp.partition}]",
                settings,
                timeout,
            )
            ends[(tp.topic, tp.partition)] = high
        # The oldest record not committed, read from Kafka: true while no bridge runs or while the
        # partition is paused.
        behind = {k: (c if c >= 0 else OFFSET_BEGINNING) for k, c in committed.items() if ends[k] > max(c, 0)}
        try:
            timestamps = read_timestamps(consumer, behind, min(timeout, 5.0))
        except KafkaException as e:
            where = settings.bootstrap_servers
            raise KafkaUnavailable(f"cannot reach Kafka at {where} (record timestamps): {e}") from e
        wall = time.time()
    finally:
        consumer.close()

    client = connect(settings.redis_url)
    try:
        seconds, micros = client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000  # the clock bridges stamp their status with
        raw = cast(dict[str, str], client.hgetall(status_key(settings.group_id)))
        published = {k: json.loads(v) for k, v in raw.items()}
        running = {}
        with client.pipeline(transaction=False) as pipe:
            for tp in partitions:
                pipe.hlen(PartitionKeys(settings.group_id, tp.topic, tp.partition).running)
            for tp, count in zip(partitions, pipe.execute(), strict=True):
                running[(tp.topic, tp.partition)] = int(count)
    except Exception as e:  # redis.RedisError and connection errors
        raise LedgerUnavailable(f"cannot read the ledger: {e}") from e
    finally:
        client.close()

    rows: list[dict[str, Any]] = []
    for topic in missing:
        rows.append({"topic": topic, "partition": None, "error": "topic does not exist"})
    for tp in partitions:
        key = (tp.topic, tp.partition)
        end = ends[key]
        commit = committed[key]
        info = published.get(f"{tp.topic}|{tp.partition}", {})
        lag = end - commit if commit >= 0 else end
        rows.append(
            {
                "topic": tp.topic,
                "partition": tp.partition,
                "handler": handlers[tp.topic].name,
                "committed": commit if commit >= 0 else None,
                "end": end,
                "lag": lag,
                "lag_s": lag_seconds(lag, timestamps.get(key), wall),
                "in_flight": info.get("in_flight"),
                # Batch handlers: batch messages dispatched and not wholly final.
                "in_flight_batches": info.get("batches"),
                "running": running[key],
                "oldest_age_s": info.get("oldest_age_s"),
                "holding_offset": info.get("holding_offset"),
                "holding_age_s": info.get("holding_age_s"),
                "owner": info.get("owner"),
                "epoch": info.get("epoch"),
                "reported_s_ago": round((now_ms - info["updated_ms"]) / 1000, 1) if info else None,
            }
        )
    return rows


_COLUMNS = ("topic", "partition", "committed", "end", "lag", "lag_s", "in_flight", "oldest_age_s", "holding_offset",
            "holding_age_s", "owner", "reported_s_ago")


def _title(column: str) -> str:
    for suffix, unit in (("_s_ago", " (s ago)"), ("_s", " (s)")):
        if column.endswith(suffix):
            column = column[: -len(suffix)] + unit
    return column.replace("_", " ")


def _cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None:
        return "-"
    if column == "in_flight" and row.get("in_flight_batches") is not None:
        return f"{value} ({row['in_flight_batches']} batches)"
    return str(value)


def render(rows: list[dict[str, Any]], as_json: bool) -> str:
    if as_json:
        return json.dumps(rows, indent=2)
    header = [_title(c) for c in _COLUMNS]
    table = [header] + [[_cell(r, c) for c in _COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['topic']}: {r['error']}")
    return "\n".join(lines)
