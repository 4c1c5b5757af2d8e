"""Completions: the ledger's final states into the partitions' windows."""

from __future__ import annotations

from bridge.completions import Completions, reason_of
from bridge.finishes import Announcements
from bridge.ledger import Progress
from bridge.owned import Partitions
from bridge.stats import Stats
from tests.support.waiting import wait_until
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


def test_a_round_reads_the_partitions_announced_and_a_sweep_reads_the_rest() -> None:
    store = ledger()
    announcements = Announcements(store.client, sweep=3600)
    partitions = Partitions()
    room = Completions(store, partitions, RecordingRouter(), Stats(), None, announcements)  # type: ignore[arg-type]
    loud, quiet = owned(0, epoch=5), owned(1, epoch=5)
    for p in (loud, quiet):
        partitions.add(p)
        deliver(p, 0)
        p.state.take_ready(1)
    try:
        room.read(0.0)  # not subscribed yet: reads every partition, as without announcements
        wait_until(lambda: announcements.take(1.0) is not None, 10, message="never subscribed")
        store.client.rpush(quiet.keys.fresh, "0")  # recorded without an announcement
        store.client.rpush(loud.keys.fresh, "0")
        store.client.publish(loud.keys.finished_channel, "0")
        wait_until(lambda: (room.read(2.0), loud.state.idle)[1], 10, message="the announced one was not read")
        assert not quiet.state.idle, "a partition nobody announced waits for the sweep"
        room.read(3601.0)  # the sweep
        assert quiet.state.idle
    finally:
        announcements.close()
