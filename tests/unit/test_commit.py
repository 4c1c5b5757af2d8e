"""Commits: one past the done prefix, confirmed before they count, never backwards."""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from bridge.clock import ManualClock
from bridge.commit import Committer
from bridge.errors import FatalError
from bridge.metrics import Metrics
from bridge.owned import Partitions
from bridge.stats import Stats
from tests.unit.fake_kafka import FakeConsumer
from tests.unit.parts import T, deliver, ledger, owned, settings


def committer(
    clock: ManualClock | None = None, metrics: Metrics | None = None, **overrides: Any
) -> tuple[Committer, FakeConsumer, Partitions, list[FatalError]]:
    partitions, halted = Partitions(), []
    metrics = metrics or Metrics(Stats())
    room = Committer(settings(**overrides), ledger(), partitions, clock or ManualClock(), metrics.stats, metrics,
                     None, halted.append)
    consumer = FakeConsumer({"on_commit": room.on_commit})
    room.consumer = consumer
    return room, consumer, partitions, halted


def test_the_target_is_one_past_the_done_prefix_and_nothing_for_a_fenced_partition() -> None:
    room, _, partitions, _ = committer()
    partition = owned()
    partitions.add(partition)
    deliver(partition, 0, 1, 2, 5)
    partition.state.mark_done([0, 1, 5])
    assert room.target(partition) == 2
    partition.assignment.fenced = True
    assert room.target(partition) is None


def test_when_every_record_is_done_the_consumer_position_is_committed_past_transaction_markers() -> None:
    room, consumer, partitions, _ = committer()
    partition = owned()
    partitions.add(partition)
    deliver(partition, 0, 1)
    partition.state.mark_done([0, 1])
    consumer.positions[(T, 0)] = 4  # 2 and 3 are markers
    assert room.target(partition) == 4


def test_an_asynchronous_commit_counts_once_kafka_confirmed_it_and_is_not_repeated() -> None:
    room, consumer, partitions, _ = committer()
    partition = owned()
    partitions.add(partition)
    deliver(partition, 0, 1)
    partition.state.mark_done([0])
    room.commit(partitions, asynchronous=True)
    room.commit(partitions, asynchronous=True)
    assert consumer.commits == [{(T, 0): 1}], "asked once"
    assert partition.marks.confirmed == -1, "not confirmed yet"
    consumer.consume(1, 0)  # serves the commit report
    assert partition.marks.confirmed == 1


def test_commits_a_replaced_consumer_never_answered_do_not_time_the_new_consumers() -> None:
    clock, metrics = ManualClock(), Metrics(Stats())
    room, old, partitions, _ = committer(clock=clock, metrics=metrics)
    partition = owned()
    partitions.add(partition)
    deliver(partition, 0, 1)
    partition.state.mark_done([0])
    room.commit(partitions, asynchronous=True)
    assert old.commits, "sent; its answer would come with a poll of the old consumer, which never comes"
    room.new_client()  # the consumer was replaced
    new = room.consumer = FakeConsumer({"on_commit": room.on_commit})
    clock.advance(120)
    partition.state.mark_done([1])
    partition.marks.requested = partition.marks.confirmed
    room.commit(partitions, asynchronous=True)
    clock.advance(0.25)
    new.consume(1, 0)  # serves the commit report
    timed = {s.name.rsplit("_", 1)[-1]: s.value for s in metrics.commit_duration.collect()[0].samples}
    assert (timed["count"], timed["sum"]) == (1, 0.25), "timed from its own request"


def test_a_failed_commit_is_asked_again_and_a_refused_one_stops_the_bridge() -> None:
    room, _, partitions, halted = committer()
    partition = owned()
    partitions.add(partition)
    partition.marks.requested = 5
    room.on_commit(KafkaError(KafkaError.REQUEST_TIMED_OUT, "slow"), [TopicPartition(T, 0, 5)])
    assert partition.marks.requested == partition.marks.confirmed
    room.on_commit(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED, "denied"), [TopicPartition(T, 0, 5)])
    assert len(halted) == 1 and halted[0].exit_code == 6


def test_the_ledger_is_pruned_below_a_confirmed_commit_but_not_while_it_is_away() -> None:
    room, _, partitions, _ = committer()
    partition = owned()
    partitions.add(partition)
    partition.marks.confirmed = 3
    room.ledger_away = True
    room.prune()
    assert partition.marks.pruned == -1
    room.ledger_away = False
    room.prune()
    assert partition.marks.pruned == 3
