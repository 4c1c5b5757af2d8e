"""librdkafka's own log lines go through Python logging, never raw ``%N|...`` lines on stderr."""

from __future__ import annotations

import ast
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from bridge import status
from bridge.consumer import consumer_config
from bridge.deadletter import producer_config
from bridge.errors import KafkaUnavailable
from bridge.settings import load_settings
from tasks import produce
from tests.unit.fake_kafka import FakeMessage

REPO = Path(__file__).resolve().parents[2]
CLIENTS = {"Consumer", "Producer", "AdminClient"}
#: Functions that build a client configuration carrying a ``logger``.
CONFIG_BUILDERS = {"consumer_config", "producer_config"}
#: A line of the project's text log format.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


def test_the_bridge_consumer_and_producer_configs_send_librdkafka_lines_to_the_bridge_kafka_logger() -> None:
    settings = load_settings(group_id="g")
    assert consumer_config(settings)["logger"] is logging.getLogger("bridge.kafka")
    assert producer_config(settings)["logger"] is logging.getLogger("bridge.kafka")


def test_the_demo_producer_config_sends_librdkafka_lines_to_the_tasks_logger() -> None:
    assert produce.producer_config("localhost:9092")["logger"] is logging.getLogger("tasks.produce")


def _client_calls(path: Path) -> list[tuple[int, ast.Call]]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name in CLIENTS:
                calls.append((node.lineno, node))
    return calls


def _has_logger(call: ast.Call) -> bool:
    if any(k.arg == "logger" for k in call.keywords):
        return True
    for arg in call.args:
        if isinstance(arg, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "logger" for k in arg.keys):
            return True
        # A builder's result, or {**builder(...)}.
        for node in ast.walk(arg):
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if name in CONFIG_BUILDERS:
                    return True
    return False


def test_every_kafka_client_the_bridge_and_the_example_fleet_create_is_given_a_logger() -> None:
    sources = [*sorted((REPO / "bridge").rglob("*.py")), *sorted((REPO / "tasks").glob("*.py"))]
    found = [(path, line, call) for path in sources for line, call in _client_calls(path)]
    assert len(found) >= 5  # consumer, producers, admin client: the scan sees them
    without = [f"{path.relative_to(REPO)}:{line}" for path, line, call in found if not _has_logger(call)]
    assert without == []


def test_the_demo_producer_logs_librdkafka_lines_in_the_log_format_and_stops_quietly_on_two_interrupts() -> None:
    # No broker on port 1: librdkafka logs connection failures, and the flush cannot finish, so
    # the second SIGINT (the demo forwards one after the terminal's) arrives during the flush.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.produce", "--count", "0", "--bootstrap-servers", "127.0.0.1:1",
         "--flush-timeout", "2"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    # The first librdkafka line comes after the producer exists, so its signal handlers too.
    first = proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=30)
    err = first + rest
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert [line for line in lines if not LOG_LINE.match(line)] == []
    assert any(" tasks.produce: FAIL [rdkafka#producer-1]" in line for line in lines)
    assert "records not acknowledged" in err
    assert re.search(r"produced \d+ records in", out)


class _BusyCoordinator:
    """A consumer whose group coordinator answers ``answers`` errors before the offsets."""

    def __init__(self, answers: list[int]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def list_topics(self, timeout: float) -> Any:
        self.calls.append("list_topics")
        partitions = {0: object()}
        return type("M", (), {"topics": {"t": type("T", (), {"error": None, "partitions": partitions})()}})()

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self.calls.append("committed")
        assert timeout <= 1.0
        if self.answers:
            raise KafkaException(KafkaError(self.answers.pop(0)))
        return [TopicPartition(tp.topic, tp.partition, 7) for tp in partitions]

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
        self.calls.append("watermarks")
        return 0, 10

    def poll(self, timeout: float) -> None:
        self.calls.append("poll")
        time.sleep(timeout)

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.calls.append(f"assign {[(tp.topic, tp.partition, tp.offset) for tp in partitions]}")

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        return [FakeMessage("t", 0, 6), FakeMessage("t", 0, 7)]  # a fetch may start before the position

    def unassign(self) -> None:
        self.calls.append("unassign")

    def close(self) -> None:
        self.calls.append("close")


def _collect(monkeypatch: pytest.MonkeyPatch, consumer: _BusyCoordinator, timeout: float) -> list[dict[str, Any]]:
    monkeypatch.setattr(status, "Consumer", lambda config: consumer)
    monkeypatch.setattr(status, "connect", lambda url: fakeredis.FakeRedis(decode_responses=True))
    handler = type("H", (), {"name": "h"})()
    return status.collect(load_settings(group_id="g"), {"t": handler}, timeout=timeout)


def test_status_asks_again_while_the_group_coordinator_is_loading_and_serves_log_lines_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = _BusyCoordinator([KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS])
    rows = _collect(monkeypatch, consumer, timeout=10)
    assert [(r["topic"], r["partition"], r["committed"], r["lag"]) for r in rows] == [("t", 0, 7, 3)]
    # The time lag comes from the record at the committed offset, read by assignment, not by a group.
    assert rows[0]["lag_s"] == pytest.approx(time.time() - 1_700_000_000.007, abs=5)
    assert [c for c in consumer.calls if "assign" in c] == ["assign [('t', 0, 7)]", "unassign"]
    assert consumer.calls.count("committed") == 3
    # Every call to Kafka is followed by serving the queue that holds librdkafka's log lines.
    asks = [i for i, call in enumerate(consumer.calls) if call in ("list_topics", "committed", "watermarks")]
    assert all(consumer.calls[i + 1] == "poll" for i in asks)


def test_status_reports_kafka_unavailable_when_the_coordinator_stays_busy_past_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = _BusyCoordinator([KafkaError.COORDINATOR_LOAD_IN_PROGRESS] * 1000)
    with pytest.raises(KafkaUnavailable, match="committed offsets"):
        _collect(monkeypatch, consumer, timeout=0.3)
    assert consumer.calls[-1] == "close"
