"""Metrics, health checks and log output of the bridge process, without services."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bridge.endpoints import Endpoints
from bridge.errors import ConfigurationError
from bridge.health import Thresholds, liveness, readiness
from bridge.logs import MASK, Redactor, _JsonFormatter, _TextFormatter, coordinates, secrets_of
from bridge.metrics import Metrics, PartitionView, View
from bridge.stats import Stats
from tests.support import http

LIMITS = Thresholds(stall_timeout=60, max_record_age=300, outage_timeout=10)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def view(**changes: object) -> View:
    base: dict[str, object] = {
        "partitions": (
            PartitionView("orders", 0, committed=40, end=100, in_flight=60, oldest_unfinished_age=2.5, paused=False),
            PartitionView("orders", 1, committed=None, end=7, in_flight=0, oldest_unfinished_age=None, paused=True),
        ),
        "joined": True,
        "outage_since": None,
        "last_poll": 1000.0,
    }
    base.update(changes)
    return View(**base)  # type: ignore[arg-type]


def test_partition_gauges_and_per_topic_counters_follow_the_published_view() -> None:
    stats = Stats()
    metrics = Metrics(stats)
    stats.add("dispatched", "orders", 100)
    stats.add("done", "orders", 40)
    stats.add("done", "audit", 3)
    stats.add("failed", "orders")
    stats.rebalance("assigned")
    stats.commits = 4
    metrics.commit_duration.observe(0.02)
    metrics.publish(view())
    got = samples(metrics)
    p0, p1 = (("partition", "0"), ("topic", "orders")), (("partition", "1"), ("topic", "orders"))
    assert got[("kafka_dramatiq_bridge_partition_committed_offset", p0)] == 40
    assert ("kafka_dramatiq_bridge_partition_committed_offset", p1) not in got, "no commit yet: no sample"
    assert got[("kafka_dramatiq_bridge_partition_end_offset", p0)] == 100
    assert got[("kafka_dramatiq_bridge_partition_lag_records", p0)] == 60
    assert got[("kafka_dramatiq_bridge_partition_lag_records", p1)] == 7
    assert got[("kafka_dramatiq_bridge_partition_in_flight_records", p0)] == 60
    assert got[("kafka_dramatiq_bridge_partition_oldest_unfinished_age_seconds", p0)] == 2.5
    assert got[("kafka_dramatiq_bridge_partition_paused", p1)] == 1
    assert got[("kafka_dramatiq_bridge_assigned_partitions", ())] == 2
    assert got[("kafka_dramatiq_bridge_records_dispatched_total", (("topic", "orders"),))] == 100
    assert got[("kafka_dramatiq_bridge_records_done_total", (("topic", "orders"),))] == 40
    assert got[("kafka_dramatiq_bridge_records_done_total", (("topic", "audit"),))] == 3
    assert got[("kafka_dramatiq_bridge_records_failed_total", (("topic", "orders"),))] == 1
    assert got[("kafka_dramatiq_bridge_rebalances_total", (("event", "assigned"),))] == 1
    assert got[("kafka_dramatiq_bridge_rebalances_total", (("event", "lost"),))] == 0
    assert got[("kafka_dramatiq_bridge_commits_total", ())] == 4
    assert got[("kafka_dramatiq_bridge_commit_duration_seconds_count", ())] == 1
    assert got[("kafka_dramatiq_bridge_ledger_up", ())] == 1
    assert stats.done == 43 and stats.dispatched == 100

    metrics.publish(view(partitions=(), outage_since=5.0))
    got = samples(metrics)
    assert got[("kafka_dramatiq_bridge_ledger_up", ())] == 0
    assert not any(name.startswith("kafka_dramatiq_bridge_partition_lag") for name, _ in got), "revoked: gone"


def test_liveness_fails_on_a_stalled_loop_and_on_a_record_older_than_the_limit() -> None:
    assert liveness(view(), 1000.0 + 59, LIMITS) is None
    stalled = liveness(view(), 1000.0 + 61, LIMITS)
    assert stalled is not None and "BRIDGE_HEALTH_STALL_TIMEOUT" in stalled
    old = view(partitions=(PartitionView("t", 0, 1, 2, 1, oldest_unfinished_age=301.0, paused=False),))
    problem = liveness(old, 1000.0, LIMITS)
    assert problem is not None and "BRIDGE_HEALTH_MAX_RECORD_AGE" in problem
    assert liveness(old, 1000.0, Thresholds(60, 0, 10)) is None, "0 turns the age check off"
    assert liveness(view(last_poll=None), 5000.0, LIMITS) is None, "still starting"


def test_readiness_needs_the_group_and_a_ledger_that_answers() -> None:
    assert readiness(view(), 1000.0, LIMITS) is None
    not_joined = readiness(view(joined=False), 1000.0, LIMITS)
    assert not_joined is not None and "consumer group" in not_joined
    assert readiness(view(outage_since=995.0), 1000.0, LIMITS) is None, "a short outage is tolerated"
    down = readiness(view(outage_since=980.0), 1000.0, LIMITS)
    assert down is not None and "BRIDGE_HEALTH_OUTAGE_TIMEOUT" in down


@pytest.fixture
def served() -> Iterator[tuple[Metrics, int]]:
    metrics = Metrics(Stats())
    endpoints = Endpoints(metrics, LIMITS, "127.0.0.1", 0)
    endpoints.start()
    try:
        yield metrics, endpoints.port
    finally:
        endpoints.close()


def fetch(port: int, path: str) -> tuple[int | None, str]:
    return http.get(f"http://127.0.0.1:{port}{path}")


def test_the_http_server_answers_metrics_and_both_health_checks(served: tuple[Metrics, int]) -> None:
    import time

    metrics, port = served
    assert fetch(port, "/readyz")[0] == 503, "before the first assignment"
    metrics.publish(view(last_poll=time.monotonic()))
    assert fetch(port, "/livez") == (200, "ok\n")
    assert fetch(port, "/readyz") == (200, "ok\n")
    code, body = fetch(port, "/metrics")
    assert code == 200 and "kafka_dramatiq_bridge_partition_lag_records" in body
    metrics.publish(view(last_poll=time.monotonic() - 120))
    code, body = fetch(port, "/livez")
    assert code == 503 and "has not polled Kafka" in body
    assert fetch(port, "/nothing")[0] == 404


def test_a_port_in_use_is_a_configuration_error_naming_the_setting(served: tuple[Metrics, int]) -> None:
    _, port = served
    with pytest.raises(ConfigurationError, match="BRIDGE_HTTP_PORT"):
        Endpoints(Metrics(Stats()), LIMITS, "127.0.0.1", port)


def test_secret_values_and_url_passwords_are_masked() -> None:
    secrets = secrets_of(
        "redis://ledger:p%40ss-word@redis:6379/0",
        {"sasl.password": "sasl-secret", "ssl.key.password": "key-secret", "sasl.username": "alice",
         "sasl.oauthbearer.client.secret": "oauth-secret", "ssl.key.pem": "PEM-BODY", "ssl.ca.location": "/ca"},
    )
    assert set(secrets) == {"p%40ss-word", "p@ss-word", "sasl-secret", "key-secret", "oauth-secret", "PEM-BODY"}
    redact = Redactor(secrets)
    text = redact("connecting to redis://ledger:p%40ss-word@redis:6379/0 as alice with sasl-secret and p@ss-word")
    assert "p%40ss-word" not in text and "p@ss-word" not in text and "sasl-secret" not in text
    assert "alice" in text and text.count(MASK) == 3
    assert Redactor()("amqp://guest:hunter22@rabbit:5672/") == f"amqp://guest:{MASK}@rabbit:5672/"


def _format(formatter: logging.Formatter, message: str, *args: object, **extra: object) -> str:
    record = logging.LogRecord("bridge", logging.ERROR, __file__, 1, message, args, None)
    for name, value in extra.items():
        setattr(record, name, value)
    return formatter.format(record)


def test_json_lines_carry_record_coordinates_and_mask_secrets() -> None:
    redact = Redactor(["sasl-secret"])
    line = _format(_JsonFormatter(redact), "%s@%d failed with %s", "orders[2]", 17, "sasl-secret",
                   **coordinates("orders", 2, 17))
    entry = json.loads(line)
    assert entry["topic"] == "orders" and entry["partition"] == 2 and entry["offset"] == 17
    assert entry["level"] == "ERROR" and entry["logger"] == "bridge"
    assert entry["message"] == f"orders[2]@17 failed with {MASK}"
    text = _format(_TextFormatter(redact), "redis://u:sasl-secret@h failed")
    assert "sasl-secret" not in text and " ERROR bridge: " in text


def test_configure_replaces_the_handlers_and_masks_what_any_logger_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge import logs

    stream = io.StringIO()
    monkeypatch.setattr(logs.sys, "stderr", stream)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("INFO", "json")
        logging.getLogger("redis.client").warning("lost redis://x:topsecret@h:1")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    entry = json.loads(stream.getvalue())
    assert entry["message"] == f"lost redis://x:{MASK}@h:1"
