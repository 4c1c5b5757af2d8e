"""Completions: the ledger's final states into the partitions' windows."""

from __future__ import annotations

from bridge.completions import Completions, reason_of
from bridge.ledger import Progress
from bridge.owned import Partitions
from bridge.stats import Stats
from tests.unit.parts import RecordingRouter, T, deliver, ledger, owned


def completions() -> tuple[Completions, RecordingRouter, Stats]:
    router, stats = RecordingRouter(), Stats()
    return Completions(ledger(), Partitions(), router, stats, None), router, stats  # type: ignore[arg-type]


def test_done_facts_mark_records_done_and_count_them_once() -> None:
    room, _, stats = completions()
    partition = owned(epoch=5)
    deliver(partition, 0, 1, 2)
    partition.state.take_ready(10)
    room.apply(partition, Progress([0, 2, 2, 9], {}), 1.0)
    assert partition.state.committable() == 1
    assert stats.by_topic[("done", T)] == 2


def test_a_failure_of_the_current_epoch_goes_to_the_dead_letter_room() -> None:
    room, router, _ = completions()
    partition = owned(epoch=5)
    deliver(partition, 0, 1)
    partition.state.take_ready(10)
    room.apply(partition, Progress([], {1: {"error": {"type": "DecodeError"}, "e": 5}}), 1.0)
    assert [(o, r) for o, r, _ in router.failed] == [(1, "undecodable")]


def test_a_failure_of_an_older_epoch_is_ignored_for_a_record_this_owner_dispatched_again() -> None:
    room, router, _ = completions()
    partition = owned(epoch=5)
    deliver(partition, 0, 1)
    partition.state.take_ready(1)  # 0 dispatched by this owner, 1 not yet
    failures = {0: {"error": {"type": "E"}, "e": 4}, 1: {"error": {"type": "E"}, "e": 4}}
    room.apply(partition, Progress([], failures), 1.0)
    assert [o for o, _, _ in router.failed] == [1], "0 waits for this owner's own copy"


def test_a_later_success_cancels_a_pending_dead_letter() -> None:
    room, _, _ = completions()
    partition = owned(epoch=5)
    deliver(partition, 0)
    partition.state.take_ready(1)
    room.apply(partition, Progress([], {0: {"error": {"type": "E"}, "e": 5}}), 1.0)
    assert 0 in partition.letters.failing
    room.apply(partition, Progress([0], {}), 2.0)
    assert partition.letters.failing == {} and partition.state.idle


def test_the_reason_of_a_failure_comes_from_its_detail() -> None:
    assert reason_of({"reason": "too-large"}) == "too-large"
    assert reason_of({"error": {"type": "DecodeError"}}) == "undecodable"
    assert reason_of({"error": {"type": "ValueError"}}) == "final-failure"
