"""Assignments: epochs, handovers, revokes, and the ledger's own losses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from dramatiq.brokers.stub import StubBroker

import bridge.assignments as assignments_module
from bridge.assignments import RETIRED_PARTITION_TTL, Assignments
from bridge.clock import ManualClock
from bridge.errors import FatalError, LedgerUnavailable
from bridge.flow import Flow
from bridge.ledger import Ledger, Try
from bridge.owned import Owned, Partitions
from bridge.registry import Registry
from bridge.stats import Stats
from tests.unit.fake_kafka import FakeConsumer
from tests.unit.parts import GROUP, RecordingRouter, T, deliver, handler, ledger, settings


@dataclass
class RecordingCommitter:
    commits: list[list[str]] = field(default_factory=list)

    def commit(self, partitions: Any, *, asynchronous: bool, in_rebalance: bool = False) -> None:
        self.commits.append([p.where for p in partitions])


@dataclass
class Room:
    assignments: Assignments
    consumer: FakeConsumer
    partitions: Partitions
    ledger: Ledger
    committer: RecordingCommitter
    router: RecordingRouter
    clock: ManualClock
    halted: list[FatalError]

    def assign(self, *partitions: int) -> None:
        self.assignments.on_assign(self.consumer, [TopicPartition(T, p) for p in partitions])

    def owned(self, partition: int = 0) -> Owned:
        found = self.partitions.get(T, partition)
        assert found is not None
        return found


def room(store: Ledger | None = None, ordering: str = "partition", **overrides: Any) -> Room:
    store = store or ledger()
    consumer, partitions, clock, halted = FakeConsumer({}), Partitions(), ManualClock(), []
    flow = Flow(consumer, settings(**overrides), partitions)
    committer, router = RecordingCommitter(), RecordingRouter()
    assignments = Assignments(
        settings(**overrides), {T: handler(StubBroker(), ordering)}, store, partitions, flow, committer,  # type: ignore[arg-type]
        router, Stats(), None, Registry(), halted.append, clock.monotonic,  # type: ignore[arg-type]
    )
    return Room(assignments, consumer, partitions, store, committer, router, clock, halted)


def test_an_assignment_starts_a_higher_epoch_registers_the_lane_and_starts_at_the_commit() -> None:
    r = room()
    r.consumer.committed_offsets[(T, 0)] = 7
    r.ledger.client.set(f"kdb:{{{GROUP}|{T}|0}}:epoch", 10**15)
    r.assign(0)
    owned = r.owned()
    assert owned.state.epoch == 10**15 + 1
    assert owned.start_offset == 7 and r.consumer.positions[(T, 0)] == 7
    assert r.ledger.lanes() == {owned.lane: T}


def test_partitions_assigned_while_the_ledger_is_away_stay_paused_until_their_epoch_is_recorded() -> None:
    store = ledger()

    class Away(Ledger):
        def bump_epochs(self, partitions: Any) -> list[int]:
            raise LedgerUnavailable("away")

    r = room(Away(store.client))
    r.assign(0)
    owned = r.owned()
    assert owned.assignment.needs_setup and owned.paused and not owned.active
    assert r.assignments.joined
    r2 = room(store)
    r2.assign(0)
    assert r2.owned().active is False, "handing over until checked"


def test_the_new_owner_waits_for_a_live_record_of_an_older_epoch_in_ordered_modes() -> None:
    store = ledger()
    r = room(store, handover_timeout=30)
    r.assign(0)
    owned = r.owned()
    old = owned.state.epoch
    store.start(owned.keys, Try(4, old, 1, 0, "older"), "w")  # started before the next assignment
    r.assignments.on_revoke(r.consumer, [TopicPartition(T, 0)])
    r.assign(0)
    owned = r.owned()
    r.assignments.check_handovers(r.clock.monotonic())
    assert owned.assignment.handing_over, "waits while 4 runs"
    store.finish(owned.keys, Try(4, old, 1, 0, "older"), "done")
    r.assignments.check_handovers(r.clock.monotonic())
    assert not owned.assignment.handing_over
    assert owned.state.known_done == {4}


def test_a_failure_the_old_owner_did_not_dead_letter_is_adopted_not_run_again() -> None:
    store = ledger()
    r = room(store)
    r.assign(0)
    owned = r.owned()
    store.finish(owned.keys, Try(1, owned.state.epoch - 1, 1, 0, "old"), "failed", detail={"error": {"type": "E"}})
    r.assignments.check_handovers(r.clock.monotonic())
    assert set(owned.letters.adopted) == {1}, "dead-lettered when it arrives"


def test_a_revoke_drains_commits_and_lets_the_partitions_keys_expire() -> None:
    r = room()
    drained: list[list[str]] = []
    r.assignments.drain = lambda partitions: drained.append([p.where for p in partitions])
    r.assign(0, 1)
    r.assignments.on_revoke(r.consumer, [TopicPartition(T, 0)])
    assert drained == [[f"{T}[0]"]] and r.committer.commits == [[f"{T}[0]"]]
    assert (T, 0) not in r.partitions and (T, 1) in r.partitions
    assert 0 < r.ledger.client.ttl(f"kdb:{{{GROUP}|{T}|0}}:epoch") <= RETIRED_PARTITION_TTL


def test_a_lost_partition_is_dropped_without_a_commit() -> None:
    r = room()
    r.assign(0)
    r.assignments.on_lost(r.consumer, [TopicPartition(T, 0)])
    assert len(r.partitions) == 0 and r.committer.commits == []


def test_a_partition_whose_epoch_the_ledger_lost_starts_a_new_one_and_dispatches_again_in_order() -> None:
    store = ledger()
    r = room(store, heartbeat_interval=1.0)
    r.assign(0)
    owned = r.owned()
    owned.assignment.handing_over = False
    deliver(owned, 0, 1, 2)
    owned.state.take_ready(3)
    before = owned.state.epoch
    store.client.flushall()
    r.assignments.upkeep()
    assert owned.state.epoch > before
    assert owned.assignment.handing_over and owned.assignment.handover_after == r.clock.monotonic() + 3.0
    assert owned.state.dispatched_open == 0
    again = owned.state.take_ready(10)
    assert [(e.offset, e.prev) for e in again] == [(0, -1), (1, 0), (2, 1)], "again from the first, in order"
    assert store.lanes() == {owned.lane: T}, "lanes registered again"


def test_a_partition_whose_epoch_went_back_starts_a_new_one_above_both_and_dispatches_again() -> None:
    # A Redis primary that dies before its replica has the last writes: the promoted replica
    # shows the epoch before this bridge's bump.
    store = ledger()
    r = room(store)
    r.assign(0)
    owned = r.owned()
    owned.assignment.handing_over = False
    deliver(owned, 0, 1)
    owned.state.take_ready(2)
    ours = owned.state.epoch
    store.client.set(owned.keys.epoch, ours - 5)
    r.assignments.upkeep()
    assert owned.state.epoch > ours
    assert store.epochs([owned.keys]) == [owned.state.epoch]
    assert [e.offset for e in owned.state.take_ready(10)] == [0, 1], "again from the first, in order"


def test_a_partition_whose_ledger_keys_moved_to_another_redis_primary_starts_a_new_epoch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A failover may lose the last writes (replication is asynchronous): what runs again must run
    # under a new epoch, not as a same-epoch replay behind records that already ran.
    where = {"primary": "10.0.0.1:7000"}
    monkeypatch.setattr(assignments_module, "home", lambda client, key: where["primary"])
    store = ledger()
    r = room(store)
    r.assign(0)
    owned = r.owned()
    owned.assignment.handing_over = False
    deliver(owned, 0, 1)
    owned.state.take_ready(2)
    ours = owned.state.epoch
    r.assignments.upkeep()
    assert owned.state.epoch == ours, "the same primary: nothing to do"
    where["primary"] = "10.0.0.2:7000"
    r.assignments.upkeep()
    assert owned.state.epoch > ours
    assert owned.assignment.handing_over, "waits for records of the old epoch still running"
    assert [e.offset for e in owned.state.take_ready(10)] == [0, 1], "again from the first, in order"
    r.assignments.upkeep()
    assert store.epochs([owned.keys]) == [owned.state.epoch], "restarted once"


def test_a_partition_the_ledger_shows_with_a_newer_owner_is_fenced() -> None:
    store = ledger()
    r = room(store)
    r.assign(0)
    owned = r.owned()
    store.client.set(owned.keys.epoch, owned.state.epoch + 1)
    r.assignments.upkeep()
    assert owned.assignment.fenced and not owned.active
