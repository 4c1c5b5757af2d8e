"""The bridge's main loop against a scripted consumer, a fakeredis ledger and a StubBroker.

Workers are played by the test: it writes done facts and failures into the ledger as the
middleware would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import fakeredis
import pytest
from dramatiq.brokers.stub import StubBroker

from bridge import LedgerUnavailable, Record, kafka_handler
from bridge.deadletter import Outcome
from bridge.handlers import handlers_by_topic
from bridge.keys import PartitionKeys
from bridge.ledger import Beats, Ledger, Try
from bridge.protocol import registration_json
from bridge.runner import Bridge
from bridge.settings import load_settings
from tests.unit.fake_kafka import FakeConsumer

T = "orders"
GROUP = "g"


class SwitchableLedger(Ledger):
    """A ledger that can be made unreachable."""

    down = False

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if not name.startswith("_") and callable(attr) and super().__getattribute__("down"):

            def unreachable(*args: Any, **kwargs: Any) -> Any:
                raise LedgerUnavailable("ledger unreachable (test)")

            return unreachable
        return attr


class FakeDeadLetters:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []
        self.outcomes: list[Outcome] = []

    def ensure_topics(self, topics: Any) -> None:
        list(topics)

    def send(self, topic: str, env: dict[str, Any], headers: list[tuple[str, bytes | None]]) -> None:
        self.sent.append((topic, env["o"]))

    def ack(self, offset: int, error: str | None = None) -> None:
        self.outcomes.append(Outcome(T, 0, offset, error))

    def poll(self) -> list[Outcome]:
        out, self.outcomes = self.outcomes, []
        return out

    def flush(self, timeout: float) -> list[Outcome]:
        return self.poll()


@pytest.fixture
def world(stub_broker: StubBroker) -> Iterator[dict[str, Any]]:
    @kafka_handler(T, ordering="none")
    @dramatiq.actor
    def handle(record: Record) -> None: ...

    consumers: list[FakeConsumer] = []

    def factory(config: dict[str, Any]) -> FakeConsumer:
        consumer = FakeConsumer(config)
        consumer.add(T, 0, 0)
        consumers.append(consumer)
        return consumer

    ledger = SwitchableLedger(fakeredis.FakeRedis(decode_responses=True))
    dead = FakeDeadLetters()
    settings = load_settings(group_id=GROUP, commit_interval=0.001, progress_interval=0, redispatch_timeout=0.2)
    bridge = Bridge(settings, handlers_by_topic(), ledger=ledger, consumer_factory=factory, dead_letters=dead)  # type: ignore[arg-type]
    assert bridge.start()
    yield {"bridge": bridge, "consumer": consumers[0], "ledger": ledger, "dead": dead, "broker": stub_broker}


KEYS = PartitionKeys(GROUP, T, 0)


def finish(world: dict[str, Any], offset: int, outcome: str = "done", partition: int = 0, **detail: Any) -> None:
    """A worker finished ``offset`` under the partition's current epoch."""
    bridge, ledger = world["bridge"], world["ledger"]
    epoch = bridge.owned[(T, partition)].state.epoch
    keys = PartitionKeys(GROUP, T, partition)
    ledger.finish(keys, Try(offset, epoch, 1, 0, f"w{offset}"), outcome, detail=detail or None)  # type: ignore[arg-type]


def spin(bridge: Bridge, rounds: int = 3) -> None:
    for _ in range(rounds):
        bridge.poll_once()
        time.sleep(0.002)


def test_the_commit_covers_only_the_done_prefix_and_moves_forward_only(world: dict[str, Any]) -> None:
    bridge, consumer = world["bridge"], world["consumer"]
    consumer.add(T, 0, 10)
    consumer.assign((T, 0))
    spin(bridge)
    assert bridge.stats.dispatched == 10
    for offset in (0, 1, 3, 4):
        finish(world, offset)
    spin(bridge)
    assert consumer.committed_offsets[(T, 0)] == 2
    for offset in (2, 5, 6, 7, 8, 9):
        finish(world, offset)
    spin(bridge)
    assert consumer.committed_offsets[(T, 0)] == 10
    # The start position is committed first, so a restart never re-applies offset_reset.
    assert [c[(T, 0)] for c in consumer.commits] == [0, 2, 10]


def test_a_final_failure_holds_the_commit_until_its_dead_letter_is_acknowledged(world: dict[str, Any]) -> None:
    bridge, consumer, ledger, dead = world["bridge"], world["consumer"], world["ledger"], world["dead"]
    consumer.add(T, 0, 3)
    consumer.assign((T, 0))
    spin(bridge)
    finish(world, 0)
    finish(world, 1, "failed", error={"type": "ValueError", "message": "x"}, attempts=3)
    finish(world, 2)
    spin(bridge)
    assert dead.sent == [(f"{T}.dlq", 1)]
    assert consumer.committed_offsets[(T, 0)] == 1
    dead.ack(1, error="Broker: Topic authorization failed")
    spin(bridge)
    assert consumer.committed_offsets[(T, 0)] == 1, "a failed dead-letter write must not move the commit"
    bridge.owned[(T, 0)].failing[1].dead_letter_at = time.monotonic()  # the retry is due now
    spin(bridge)
    assert dead.sent == [(f"{T}.dlq", 1), (f"{T}.dlq", 1)]
    dead.ack(1)
    spin(bridge)
    assert consumer.committed_offsets[(T, 0)] == 3
    assert ledger.client.hlen(KEYS.failed) == 0, "the settled failure leaves the ledger"
    assert bridge.stats.dead_lettered == 1


def test_a_ledger_outage_pauses_everything_stops_commits_and_resumes_without_redispatching(
    world: dict[str, Any],
) -> None:
    bridge, consumer, ledger = world["bridge"], world["consumer"], world["ledger"]
    consumer.add(T, 0, 5)
    consumer.assign((T, 0))
    spin(bridge)
    finish(world, 0)
    ledger.down = True
    spin(bridge)
    assert (T, 0) in consumer.paused
    commits_before = len(consumer.commits)
    time.sleep(0.5)  # longer than the redispatch timeout
    spin(bridge, 5)
    assert len(consumer.commits) == commits_before
    ledger.down = False
    deadline = time.monotonic() + 5
    while bridge._outage_since is not None and time.monotonic() < deadline:
        spin(bridge)
    assert bridge._outage_since is None
    spin(bridge)
    assert (T, 0) not in consumer.paused
    assert consumer.committed_offsets[(T, 0)] == 1
    assert bridge.stats.redispatched == 0, "time in the outage is no sign of a lost message"


def test_a_record_with_no_sign_of_life_is_dispatched_again_as_a_new_attempt(world: dict[str, Any]) -> None:
    bridge, consumer, ledger, broker = world["bridge"], world["consumer"], world["ledger"], world["broker"]
    consumer.add(T, 0, 2)
    consumer.assign((T, 0))
    spin(bridge)
    epoch = bridge.owned[(T, 0)].state.epoch
    ledger.start(KEYS, Try(1, epoch, 1, 0, "beating"), "worker")  # offset 1 started and beats; 0 was lost
    beats = Beats(running=[(1, "beating", registration_json(epoch, 1, 0, "beating", "worker"))])
    deadline = time.monotonic() + 3
    while bridge.stats.redispatched == 0 and time.monotonic() < deadline:
        ledger.beat({KEYS: beats})
        spin(bridge)
    assert bridge.stats.redispatched == 1
    lane = bridge.owned[(T, 0)].lane
    messages = [dramatiq.Message.decode(m) for m in broker.queues[lane].queue]
    copies = [m.options["kdb"] for m in messages if m.options["kdb"]["o"] == 0]
    assert [c.get("a", 1) for c in copies] == [1, 2]
    assert ledger.start(KEYS, Try(0, epoch, 1, 0, "late"), "worker")[0] == "superseded"


def test_a_record_too_large_for_the_task_broker_goes_to_the_dead_letter_topic(world: dict[str, Any]) -> None:
    bridge, consumer, dead, broker = world["bridge"], world["consumer"], world["dead"], world["broker"]
    consumer.add(T, 0, 1, _value=b"x" * (9 * 1024 * 1024))
    consumer.assign((T, 0))
    spin(bridge)
    assert dead.sent == [(f"{T}.dlq", 0)]
    assert broker.queues[bridge.owned[(T, 0)].lane].qsize() == 0
    dead.ack(0)
    spin(bridge)
    assert consumer.committed_offsets[(T, 0)] == 1


def test_a_revoke_commits_what_is_done_and_a_lost_partition_commits_nothing(world: dict[str, Any]) -> None:
    bridge, consumer = world["bridge"], world["consumer"]
    consumer.add(T, 0, 4)
    consumer.add(T, 1, 4)
    consumer.assign((T, 0), (T, 1))
    spin(bridge)
    for offset in (0, 1):
        finish(world, offset)
        finish(world, offset, partition=1)
    bridge.settings = bridge.settings.model_copy(update={"drain_timeout": 0.05, "commit_interval": 60})
    bridge._next_commit = time.monotonic() + 60
    before = consumer.committed_offsets.get((T, 1))
    consumer.revoke((T, 0))
    consumer.lose((T, 1))
    spin(bridge, 1)
    assert consumer.commits[-1] == {(T, 0): 2}
    assert consumer.committed_offsets.get((T, 1)) == before
    assert bridge.owned == {}


def test_lifecycle_hooks_run_on_assign_and_revoke_and_their_errors_are_contained(world: dict[str, Any]) -> None:
    from bridge import on_partitions_assigned, on_partitions_revoked

    bridge, consumer = world["bridge"], world["consumer"]
    calls: list[tuple[str, str, int, str]] = []

    @on_partitions_assigned
    def started(topic: str, partition: int, group: str) -> None:
        calls.append(("assigned", topic, partition, group))
        raise RuntimeError("a broken hook must not stop the bridge")

    @on_partitions_revoked
    def stopped(topic: str, partition: int, group: str) -> None:
        calls.append(("revoked", topic, partition, group))

    bridge.settings = bridge.settings.model_copy(update={"drain_timeout": 0.05})
    consumer.assign((T, 0))
    spin(bridge)
    consumer.revoke((T, 0))
    spin(bridge)
    assert calls == [("assigned", T, 0, GROUP), ("revoked", T, 0, GROUP)]
