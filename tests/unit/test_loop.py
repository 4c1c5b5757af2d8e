"""The bridge's loop against a scripted consumer, a fakeredis ledger, a StubBroker and a manual
clock: nothing here waits for time to pass.

Workers are played by the test: it writes done facts and failures into the ledger as the
middleware would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dramatiq
import fakeredis
import pytest
import redis
from dramatiq.brokers.stub import StubBroker

from bridge import LedgerUnavailable, Record, kafka_handler
from bridge.bridge import Bridge
from bridge.clock import ManualClock
from bridge.deadletter import Outcome
from bridge.errors import KafkaAccessDenied
from bridge.keys import PartitionKeys
from bridge.ledger import Beats, Ledger, Try
from bridge.protocol import registration_json
from bridge.registry import handlers_by_topic
from bridge.settings import load_settings
from tests.unit.fake_kafka import FakeConsumer

T = "orders"
GROUP = "g"
KEYS = PartitionKeys(GROUP, T, 0)


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


@dataclass
class World:
    bridge: Bridge
    consumer: FakeConsumer
    ledger: SwitchableLedger
    dead: FakeDeadLetters
    broker: StubBroker
    clock: ManualClock
    #: Every consumer the bridge made, the first one first.
    consumers: list[FakeConsumer]

    def spin(self, rounds: int = 3, step: float = 0.01) -> None:
        for _ in range(rounds):
            self.bridge.poll_once()
            self.clock.advance(step)

    def finish(self, offset: int, outcome: str = "done", partition: int = 0, **detail: Any) -> None:
        """A worker finished ``offset`` under the partition's current epoch."""
        owned = self.bridge.partitions.get(T, partition)
        assert owned is not None
        keys = PartitionKeys(GROUP, T, partition)
        copy = Try(offset, owned.state.epoch, 1, 0, f"w{offset}")
        self.ledger.finish(keys, copy, outcome, detail=detail or None)  # type: ignore[arg-type]


class Unannounced(fakeredis.FakeRedis):
    """A ledger Redis without pub/sub: announcements reach a listener thread at a moment of their
    own, so here every round reads every partition, as the bridge does while unsubscribed
    (test_completions covers the announcements)."""

    def pubsub(self, **kwargs: Any) -> Any:
        raise redis.ConnectionError("no pub/sub in the loop's tests")


def make_world(stub_broker: StubBroker, **settings: Any) -> World:
    @kafka_handler(T, ordering="none")
    @dramatiq.actor
    def handle(record: Record) -> None: ...

    consumers: list[FakeConsumer] = []

    def factory(config: dict[str, Any]) -> FakeConsumer:
        consumer = FakeConsumer(config)
        consumer.add(T, 0, 0)
        consumers.append(consumer)
        return consumer

    ledger = SwitchableLedger(Unannounced(decode_responses=True))
    dead = FakeDeadLetters()
    clock = ManualClock()
    options = {"group_id": GROUP, "commit_interval": 0.001, "progress_interval": 0, "redispatch_timeout": 60,
               "http_port": 0, **settings}
    bridge = Bridge(load_settings(**options), handlers_by_topic(), ledger=ledger, consumer_factory=factory,
                    dead_letters=dead, clock=clock)  # type: ignore[arg-type]
    assert bridge.start()
    return World(bridge, consumers[0], ledger, dead, stub_broker, clock, consumers)


@pytest.fixture
def world(stub_broker: StubBroker) -> Iterator[World]:
    yield make_world(stub_broker)


def test_the_commit_covers_only_the_done_prefix_and_moves_forward_only(world: World) -> None:
    world.consumer.add(T, 0, 10)
    world.consumer.grant((T, 0))
    world.spin()
    assert world.bridge.stats.dispatched == 10
    for offset in (0, 1, 3, 4):
        world.finish(offset)
    world.spin()
    assert world.consumer.committed_offsets[(T, 0)] == 2
    for offset in (2, 5, 6, 7, 8, 9):
        world.finish(offset)
    world.spin()
    assert world.consumer.committed_offsets[(T, 0)] == 10
    # The start position is committed first, so a restart never re-applies offset_reset.
    assert [c[(T, 0)] for c in world.consumer.commits] == [0, 2, 10]


def test_a_final_failure_holds_the_commit_until_its_dead_letter_is_acknowledged(world: World) -> None:
    world.consumer.add(T, 0, 3)
    world.consumer.grant((T, 0))
    world.spin()
    world.finish(0)
    world.finish(1, "failed", error={"type": "ValueError", "message": "x"}, attempts=3)
    world.finish(2)
    world.spin()
    assert world.dead.sent == [(f"{T}.dlq", 1)]
    assert world.consumer.committed_offsets[(T, 0)] == 1
    world.dead.ack(1, error="Broker: Topic authorization failed")
    world.spin()
    assert world.consumer.committed_offsets[(T, 0)] == 1, "a failed dead-letter write must not move the commit"
    assert world.dead.sent == [(f"{T}.dlq", 1)], "the write is retried after its backoff, not at once"
    world.spin(rounds=1, step=2.1)  # the first retry is due 2 s later
    world.spin()
    assert world.dead.sent == [(f"{T}.dlq", 1), (f"{T}.dlq", 1)]
    world.dead.ack(1)
    world.spin()
    assert world.consumer.committed_offsets[(T, 0)] == 3
    assert world.ledger.client.hlen(KEYS.failed) == 0, "the settled failure leaves the ledger"
    assert world.bridge.stats.dead_lettered == 1


def test_a_ledger_outage_pauses_everything_stops_commits_and_resumes_without_redispatching(
    stub_broker: StubBroker,
) -> None:
    world = make_world(stub_broker, redispatch_timeout=2.0)
    world.consumer.add(T, 0, 5)
    world.consumer.grant((T, 0))
    world.spin()
    world.finish(0)
    world.ledger.down = True
    # The fake outage leaves pub/sub up, so only the once-a-second read of every busy partition
    # (or another ledger call) meets it; a real outage breaks the subscription too.
    world.spin(rounds=3, step=0.5)
    assert world.bridge.flow.outage_since is not None
    assert (T, 0) in world.consumer.paused
    commits_before = len(world.consumer.commits)
    world.spin(rounds=6, step=0.5)  # longer than the re-dispatch timeout
    assert len(world.consumer.commits) == commits_before
    world.ledger.down = False
    for _ in range(100):  # until the outage's backoff lets the next round try again
        world.spin(rounds=1, step=0.05)
        if world.bridge.flow.outage_since is None:
            break
    world.spin()
    assert world.bridge.flow.outage_since is None
    assert (T, 0) not in world.consumer.paused
    assert world.consumer.committed_offsets[(T, 0)] == 1
    assert world.bridge.stats.redispatched == 0, "time in the outage is no sign of a lost message"


def test_a_record_with_no_sign_of_life_is_dispatched_again_as_a_new_attempt(world: World) -> None:
    world.consumer.add(T, 0, 2)
    world.consumer.grant((T, 0))
    world.spin()
    owned = world.bridge.partitions.get(T, 0)
    assert owned is not None
    epoch = owned.state.epoch
    # Offset 1 started and beats; offset 0 was lost.
    world.ledger.start(KEYS, Try(1, epoch, 1, 0, "beating"), "worker")
    world.ledger.beat({KEYS: Beats(running=[(1, "beating", registration_json(epoch, 1, 0, "beating", "worker"))])})
    world.spin(rounds=1, step=61.0)  # past the bridge's re-dispatch timeout (60 s)
    world.spin()
    assert world.bridge.stats.redispatched == 1
    lane = world.broker.queues[owned.lane]
    messages = [dramatiq.Message.decode(m) for m in lane.queue]
    copies = [m.options["kdb"] for m in messages if m.options["kdb"]["o"] == 0]
    assert [c.get("a", 1) for c in copies] == [1, 2]
    assert world.ledger.start(KEYS, Try(0, epoch, 1, 0, "late"), "worker")[0] == "superseded"


def test_a_record_too_large_for_the_task_broker_goes_to_the_dead_letter_topic(world: World) -> None:
    world.consumer.add(T, 0, 1, _value=b"x" * (9 * 1024 * 1024))
    world.consumer.grant((T, 0))
    world.spin()
    owned = world.bridge.partitions.get(T, 0)
    assert owned is not None
    assert world.dead.sent == [(f"{T}.dlq", 0)]
    assert world.broker.queues[owned.lane].qsize() == 0
    assert world.ledger.client.hexists(KEYS.failed, 0), "recorded in the ledger, so a successor starts at once"
    world.dead.ack(0)
    world.spin()
    assert world.consumer.committed_offsets[(T, 0)] == 1


def test_a_revoke_commits_what_is_done_and_a_lost_partition_commits_nothing(stub_broker: StubBroker) -> None:
    world = make_world(stub_broker, drain_timeout=0.05, commit_interval=60)
    world.consumer.add(T, 0, 4)
    world.consumer.add(T, 1, 4)
    world.consumer.grant((T, 0), (T, 1))
    world.spin()  # the first round commits the start positions; the next is 60 s away
    for offset in (0, 1):
        world.finish(offset)
        world.finish(offset, partition=1)
    before = world.consumer.committed_offsets.get((T, 1))
    world.consumer.take_back((T, 0))
    world.consumer.lose((T, 1))
    world.spin(rounds=1)
    assert world.consumer.commits[-1] == {(T, 0): 2}
    assert world.consumer.committed_offsets.get((T, 1)) == before
    assert len(world.bridge.partitions) == 0


def test_lifecycle_hooks_run_on_assign_and_revoke_and_their_errors_are_contained(stub_broker: StubBroker) -> None:
    from bridge import on_partitions_assigned, on_partitions_revoked

    calls: list[tuple[str, str, int, str]] = []

    @on_partitions_assigned
    def started(topic: str, partition: int, group: str) -> None:
        calls.append(("assigned", topic, partition, group))
        raise RuntimeError("a broken hook must not stop the bridge")

    @on_partitions_revoked
    def stopped(topic: str, partition: int, group: str) -> None:
        calls.append(("revoked", topic, partition, group))

    world = make_world(stub_broker, drain_timeout=0.05)
    world.consumer.grant((T, 0))
    world.spin()
    world.consumer.take_back((T, 0))
    world.spin()
    assert calls == [("assigned", T, 0, GROUP), ("revoked", T, 0, GROUP)]


def test_a_graceful_stop_takes_one_deadline_not_the_shutdown_and_then_the_drain_timeout(
    stub_broker: StubBroker,
) -> None:
    world = make_world(stub_broker, shutdown_timeout=7, drain_timeout=20)
    world.consumer.add(T, 0, 3)
    world.consumer.grant((T, 0))
    world.spin()
    world.finish(0)  # 1 and 2 run on and on
    began = world.clock.now
    world.bridge.stop()
    world.bridge.run()
    assert world.clock.now - began == pytest.approx(7, abs=0.1), "the revoke at close did not drain again"
    assert world.consumer.closed
    assert world.consumer.committed_offsets[(T, 0)] == 1


def test_a_refusal_after_assignment_commits_what_is_done_without_waiting_for_running_records(
    stub_broker: StubBroker,
) -> None:
    world = make_world(stub_broker, shutdown_timeout=30, drain_timeout=20, commit_interval=60)
    world.consumer.add(T, 0, 4)
    world.consumer.grant((T, 0))
    world.spin()
    world.finish(0)
    world.finish(1)  # 2 and 3 still run
    began = world.clock.now
    world.bridge.halt(KafkaAccessDenied("Kafka at k:9092 denied access to consumer group 'g'"))
    with pytest.raises(KafkaAccessDenied):
        world.bridge.run()
    assert world.clock.now - began < 0.1, "a refused bridge does not wait for running records"
    assert world.consumer.committed_offsets[(T, 0)] == 2, "finished work is committed, so it does not run again"


def test_the_status_is_published_on_its_own_timer_even_with_the_progress_line_off(stub_broker: StubBroker) -> None:
    world = make_world(stub_broker, progress_interval=0, status_interval=1.0)
    world.consumer.add(T, 0, 2)
    world.consumer.grant((T, 0))
    world.spin()
    status = world.ledger.client.hgetall(f"kdb:{{{GROUP}}}:status")
    assert set(status) == {f"{T}|0"}


def test_a_bridge_left_outside_its_group_while_kafka_answers_replaces_its_consumer_and_joins_again(
    stub_broker: StubBroker,
) -> None:
    # librdkafka rejoins by itself after a session timeout; a consumer that does not is replaced.
    world = make_world(stub_broker, rejoin_timeout=30)
    first = world.consumer
    first.add(T, 0, 4)
    first.grant((T, 0))
    world.spin()
    assert world.bridge.partitions.get(T, 0) is not None
    first.lose((T, 0))
    world.spin(rounds=1)
    assert len(world.bridge.partitions) == 0
    first.unreachable = True  # a broker outage: reconnecting is librdkafka's part, nothing is replaced
    world.clock.advance(40)
    world.spin()
    assert len(world.consumers) == 1
    first.unreachable = False
    world.clock.advance(5)
    world.spin()
    assert len(world.consumers) == 2 and first.closed and world.bridge.rejoin.replaced == 1
    second = world.consumers[1]
    assert second.is_subscribed(), "the new consumer joins the group"
    second.add(T, 0, 4)
    second.grant((T, 0))
    world.spin()
    assert world.bridge.partitions.get(T, 0) is not None and world.bridge.assignments.outside_since is None
    world.clock.advance(300)  # a member: nothing more is replaced
    world.spin()
    assert len(world.consumers) == 2


def test_a_bridge_replaces_its_consumer_once_per_loss(stub_broker: StubBroker) -> None:
    # With the consumer group protocol a member given no partition (more bridges than partitions)
    # hears no on_assign: after the one replacement it stays as it is, and only a new loss counts.
    world = make_world(stub_broker, rejoin_timeout=30)
    first = world.consumer
    first.add(T, 0, 4)
    first.grant((T, 0))
    world.spin()
    first.lose((T, 0))
    world.spin()
    for _ in range(5):
        world.clock.advance(60)
        world.spin()
    assert len(world.consumers) == 2 and world.bridge.rejoin.replaced == 1, "not every timeout"
    second = world.consumers[1]
    second.add(T, 0, 4)
    second.grant((T, 0))
    world.spin()
    second.lose((T, 0))
    world.spin()
    world.clock.advance(60)
    world.spin()
    assert len(world.consumers) == 3 and world.bridge.rejoin.replaced == 2, "a new loss"


def test_a_bridge_whose_consumer_joins_within_the_rejoin_timeout_keeps_it(stub_broker: StubBroker) -> None:
    world = make_world(stub_broker, rejoin_timeout=30)
    world.consumer.add(T, 0, 4)
    world.clock.advance(300)  # subscribed, not yet assigned: joining is librdkafka's part
    world.spin()
    world.consumer.grant((T, 0))
    world.spin()
    world.consumer.lose((T, 0))
    world.spin()
    world.clock.advance(29)
    world.consumer.grant((T, 0))  # librdkafka joined again by itself
    world.spin()
    world.clock.advance(60)
    world.spin()
    assert len(world.consumers) == 1 and world.bridge.rejoin.replaced == 0


def test_a_revoke_in_the_middle_of_a_batch_never_commits_past_records_the_bridge_did_not_see(
    stub_broker: StubBroker,
) -> None:
    # librdkafka counts a record in the position as it takes it into a batch; a rebalance met later
    # in the same batch runs the revoke before the bridge sees that record, and then drops it.
    world = make_world(stub_broker, drain_timeout=0.05, commit_interval=60)
    world.consumer.add(T, 0, 4)
    world.consumer.grant((T, 0))
    world.spin()
    for offset in range(4):
        world.finish(offset)
    world.spin()
    world.consumer.add(T, 0, 2)
    world.consumer.take_back_mid_batch((T, 0))
    world.spin(rounds=1)
    assert world.consumer.positions[(T, 0)] == 5, "the batch took offset 4"
    assert world.consumer.committed_offsets[(T, 0)] == 4, "the next owner must read offset 4 again"
    assert len(world.bridge.partitions) == 0
