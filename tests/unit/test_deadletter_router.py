"""The dead-letter room: a final failure is done only once Kafka acknowledged its dead letter."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from confluent_kafka import KafkaError

from bridge import deadletter
from bridge.deadletter import RECREATE_INTERVAL, DeadLetterRouter, DeadLetters, Outcome
from bridge.owned import Partitions
from bridge.stats import Stats
from tests.unit.parts import T, deliver, ledger, owned, settings


class Producer:
    def __init__(self) -> None:
        self.sent: list[int] = []
        self.reports: list[Outcome] = []

    def send(self, topic: str, env: dict[str, Any], headers: list[tuple[str, bytes | None]]) -> None:
        self.sent.append(int(env["o"]))

    def poll(self) -> list[Outcome]:
        reports, self.reports = self.reports, []
        return reports


def router(dead_letter_topic: str | None = f"{T}.dlq") -> tuple[DeadLetterRouter, Producer, Any]:
    partitions, producer = Partitions(), Producer()
    room = DeadLetterRouter(settings(), ledger(), partitions, Stats(), producer)  # type: ignore[arg-type]
    partition = owned(dead_letter_topic=dead_letter_topic)
    partitions.add(partition)
    deliver(partition, 0, 1)
    partition.state.take_ready(2)
    return room, producer, partition


def test_a_dead_letter_is_written_once_and_its_record_is_done_when_acknowledged() -> None:
    room, producer, partition = router()
    room.fail(partition, partition.state.entry(0), 10.0, "final-failure", {"error": {"type": "E"}})
    room.send_due(10.0)
    room.send_due(10.0)
    assert producer.sent == [0]
    assert partition.state.committable() == 0, "not done before the acknowledgement"
    producer.reports.append(Outcome(T, 0, 0, None))
    room.collect()
    room.settle(10.1)
    assert partition.state.committable() == 1 and partition.letters.failing == {}


def test_a_failed_write_is_tried_again_after_its_backoff() -> None:
    room, producer, partition = router()
    room.fail(partition, partition.state.entry(1), 10.0, "final-failure", {})
    room.send_due(10.0)
    producer.reports.append(Outcome(T, 0, 1, "topic authorization failed"))
    room.collect()
    room.settle(10.0)
    room.send_due(11.9)
    assert producer.sent == [1], "backing off 2 s"
    room.send_due(12.0)
    assert producer.sent == [1, 1]


def test_with_dead_lettering_off_a_final_failure_is_settled_without_a_write() -> None:
    room, producer, partition = router(dead_letter_topic=None)
    room.fail(partition, partition.state.entry(0), 10.0, "final-failure", {})
    room.settle(10.0)
    assert producer.sent == [] and partition.state.committable() == 1


class _Future:
    def __init__(self, outcome: BaseException | None) -> None:
        self.outcome = outcome

    def result(self, timeout: float | None = None) -> None:
        if self.outcome is not None:
            raise self.outcome


class _Admin:
    """An AdminClient whose topic creations end as given: a broker lost mid-creation never answers."""

    outcomes: ClassVar[dict[str, BaseException | None]] = {}

    def __init__(self, config: dict[str, Any]) -> None:
        pass

    def list_topics(self, timeout: float) -> Any:
        return SimpleNamespace(topics={})

    def poll(self, timeout: float) -> int:
        return 0

    def create_topics(self, topics: list[Any], operation_timeout: float) -> dict[str, _Future]:
        return {t.topic: _Future(self.outcomes[t.topic]) for t in topics}


def test_a_dead_letter_topic_kafka_does_not_confirm_in_time_is_logged_and_the_bridge_starts(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    _Admin.outcomes = {"a.dlq": TimeoutError(), "b.dlq": None}
    monkeypatch.setattr(deadletter, "AdminClient", _Admin)
    letters = DeadLetters(settings(bootstrap_servers="kafka-1:9092"), producer_factory=lambda config: None)
    with caplog.at_level(logging.INFO, logger="bridge.deadletter"):
        letters.ensure_topics(["a.dlq", "b.dlq"], timeout=2)
    assert "cannot create dead-letter topic a.dlq: Kafka at kafka-1:9092 gave no answer within 2s" in caplog.text
    assert "created dead-letter topic b.dlq" in caplog.text


class _Producer:
    """A producer whose writes to topics that do not exist fail as librdkafka reports it."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.exists: set[str] = set()
        self.reports: list[tuple[Any, str]] = []

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.reports.append((kwargs["on_delivery"], topic))

    def poll(self, timeout: float) -> int:
        reports, self.reports = self.reports, []
        for report, topic in reports:
            report(None if topic in self.exists else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART), None)
        return len(reports)


class _Creating(_Admin):
    asked: ClassVar[list[str]] = []

    def create_topics(self, topics: list[Any], operation_timeout: float = 0) -> dict[str, Any]:
        _Creating.asked += [t.topic for t in topics]
        done: Future[None] = Future()
        done.set_result(None)
        return {t.topic: done for t in topics}


ENV = {"t": T, "p": 0, "o": 7, "k": None, "v": "", "h": []}


@pytest.mark.parametrize("create", [True, False])
def test_a_write_that_finds_its_dead_letter_topic_missing_asks_kafka_to_create_it_at_most_every_30s(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, create: bool,
) -> None:
    _Creating.asked = []
    monkeypatch.setattr(deadletter, "AdminClient", _Creating)
    clock = [1000.0]
    monkeypatch.setattr(deadletter.time, "monotonic", lambda: clock[0])
    producer = _Producer({})
    letters = DeadLetters(settings(create_dead_letter_topics=create), producer_factory=lambda config: producer)
    with caplog.at_level(logging.INFO, logger="bridge.deadletter"):
        letters.send(f"{T}.dlq", ENV, [])
        [outcome] = letters.poll()
        assert outcome.error is not None and "Unknown topic" in outcome.error
        assert _Creating.asked == ([f"{T}.dlq"] if create else [])
        letters.send(f"{T}.dlq", ENV, [])
        clock[0] += RECREATE_INTERVAL - 1
        letters.poll()
        assert _Creating.asked == ([f"{T}.dlq"] if create else []), "not asked again before the interval"
        letters.send(f"{T}.dlq", ENV, [])
        clock[0] += 1
        letters.poll()
        assert _Creating.asked == ([f"{T}.dlq"] * 2 if create else [])
        producer.exists.add(f"{T}.dlq")
        letters.send(f"{T}.dlq", ENV, [])
        [written] = letters.poll()
    assert written.error is None
    assert ("created dead-letter topic" in caplog.text) is create
