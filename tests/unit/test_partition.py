"""PartitionState: the done prefix, gaps, and what each ordering mode lets run."""

from __future__ import annotations

import pytest

from bridge.partition import PartitionState


def deliver(state: PartitionState, offsets: list[int], key: bytes | None = None) -> None:
    for offset in offsets:
        state.deliver(offset, key, {"o": offset})


def test_out_of_order_completion_commits_only_the_contiguous_done_prefix() -> None:
    state = PartitionState(ordering="none", epoch=1, start_offset=10)
    deliver(state, list(range(10, 20)))
    state.take_ready(100)
    assert state.committable() == 10
    state.mark_done([13, 14])
    assert state.committable() == 10
    state.mark_done([10])
    assert state.committable() == 11
    state.mark_done([11, 12])
    assert state.committable() == 15
    state.mark_done([15, 16, 17, 18, 19])
    assert state.committable() == 20
    assert state.idle


def test_gaps_in_delivered_offsets_never_stall_the_commit() -> None:
    state = PartitionState(ordering="none", epoch=1, start_offset=100)
    deliver(state, [100, 103, 104, 110])
    state.take_ready(10)
    state.mark_done([100, 103])
    assert state.committable() == 104
    state.mark_done([110])
    assert state.committable() == 104
    state.mark_done([104])
    assert state.committable() == 111


def test_commit_never_passes_a_hole_even_when_everything_after_it_is_done() -> None:
    state = PartitionState(ordering="none", epoch=1, start_offset=0)
    deliver(state, list(range(0, 50)))
    state.take_ready(100)
    state.mark_done([o for o in range(50) if o != 7])
    assert state.committable() == 7
    assert state.open == 1


def test_repeated_and_unknown_done_facts_are_ignored() -> None:
    state = PartitionState(ordering="none", epoch=1, start_offset=0)
    deliver(state, [0, 1])
    state.take_ready(10)
    assert state.mark_done([0, 0, 99, -5]) == 1
    assert state.mark_done([0]) == 0
    assert state.open == 1
    assert state.committable() == 1


def test_partition_mode_dispatches_one_record_at_a_time_in_offset_order() -> None:
    state = PartitionState(ordering="partition", epoch=1, start_offset=0)
    deliver(state, [0, 1, 2], key=b"a")
    deliver(state, [3], key=b"b")
    order = []
    while not state.idle:
        taken = state.take_ready(100)
        assert len(taken) == 1
        assert state.take_ready(100) == []
        order.append(taken[0].offset)
        state.mark_done([taken[0].offset])
    assert order == [0, 1, 2, 3]


def test_key_mode_runs_keys_in_parallel_but_each_key_in_order() -> None:
    state = PartitionState(ordering="key", epoch=1, start_offset=0)
    for offset, key in enumerate([b"a", b"b", b"a", b"c", b"b", b"a"]):
        state.deliver(offset, key, {})
    first = [e.offset for e in state.take_ready(100)]
    assert first == [0, 1, 3]
    state.mark_done([1])
    assert [e.offset for e in state.take_ready(100)] == [4]
    state.mark_done([0])
    assert [e.offset for e in state.take_ready(100)] == [2]
    state.mark_done([2, 3, 4])
    assert [e.offset for e in state.take_ready(100)] == [5]


def test_key_mode_treats_records_without_key_as_one_key() -> None:
    state = PartitionState(ordering="key", epoch=1, start_offset=0)
    deliver(state, [0, 1, 2], key=None)
    assert [e.offset for e in state.take_ready(100)] == [0]


def test_none_mode_dispatches_everything_up_to_the_limit() -> None:
    state = PartitionState(ordering="none", epoch=1, start_offset=0)
    deliver(state, list(range(10)), key=b"same")
    assert [e.offset for e in state.take_ready(4)] == [0, 1, 2, 3]
    assert [e.offset for e in state.take_ready(100)] == [4, 5, 6, 7, 8, 9]
    assert state.dispatched_open == 10


def test_records_the_ledger_already_shows_done_are_not_dispatched_again() -> None:
    state = PartitionState(ordering="partition", epoch=2, start_offset=0, known_done=[1, 2])
    deliver(state, [0, 1, 2, 3])
    taken = state.take_ready(10)
    assert [e.offset for e in taken] == [0]
    state.mark_done([0])
    assert [e.offset for e in state.take_ready(10)] == [3]
    state.mark_done([3])
    assert state.committable() == 4


def test_a_done_fact_for_an_undispatched_record_skips_it() -> None:
    state = PartitionState(ordering="partition", epoch=2, start_offset=0)
    deliver(state, [0, 1, 2])
    assert state.mark_done([0, 1]) == 2
    assert [e.offset for e in state.take_ready(10)] == [2]


def test_offsets_must_be_delivered_in_increasing_order() -> None:
    state = PartitionState(ordering="none", epoch=1)
    deliver(state, [5])
    with pytest.raises(ValueError, match="out of order"):
        state.deliver(5, None, {})


@pytest.mark.parametrize("ordering", ["partition", "key", "none"])
def test_a_record_put_back_after_a_failed_dispatch_goes_out_again_first(ordering: str) -> None:
    state = PartitionState(ordering=ordering, epoch=1, start_offset=0)  # type: ignore[arg-type]
    deliver(state, [0, 1, 2], key=b"k")
    taken = state.take_ready(10)
    for entry in reversed(taken):
        state.undispatch(entry)
    assert state.dispatched_open == 0
    again = state.take_ready(10)
    assert [e.offset for e in again] == [e.offset for e in taken]
    assert again[0].offset == 0


def test_offsets_10_to_19_finishing_in_three_batches_commit_11_then_20() -> None:
    state = PartitionState(ordering="none", epoch=1, start_offset=10)
    deliver(state, list(range(10, 20)))
    state.take_ready(100)
    commits = []
    for batch in ([13, 14], [10], [11, 12, 15, 16, 17, 18, 19]):
        state.mark_done(batch)
        commits.append(state.committable())
    assert commits == [10, 11, 20]


def test_partition_mode_pipelines_up_to_the_depth_each_record_naming_its_predecessor() -> None:
    state = PartitionState(ordering="partition", epoch=1, start_offset=0, depth=3)
    deliver(state, [0, 1, 2, 3, 4])
    taken = state.take_ready(10)
    assert [(e.offset, e.prev) for e in taken] == [(0, -1), (1, 0), (2, 1)]
    assert state.take_ready(10) == [], "the depth is reached"
    state.mark_done([0])
    assert [(e.offset, e.prev) for e in state.take_ready(10)] == [(3, 2)]
    state.mark_done([1, 2, 3])
    assert [(e.offset, e.prev) for e in state.take_ready(10)] == [(4, 3)]


def test_key_mode_chains_records_per_key_and_restarts_the_chain_of_an_idle_key() -> None:
    state = PartitionState(ordering="key", epoch=1, start_offset=0, depth=2)
    for offset, key in enumerate([b"a", b"b", b"a", b"a", b"b"]):
        state.deliver(offset, key, {})
    taken = state.take_ready(10)
    assert sorted((e.offset, e.prev) for e in taken) == [(0, -1), (1, -1), (2, 0), (4, 1)]
    state.mark_done([0, 2])
    assert [(e.offset, e.prev) for e in state.take_ready(10)] == [(3, 2)]
    state.mark_done([1, 3, 4])
    state.deliver(5, b"a", {})
    assert [(e.offset, e.prev) for e in state.take_ready(10)] == [(5, -1)], "nothing of key a is unfinished"


def test_a_final_failure_frees_its_slot_and_stays_the_predecessor_of_the_next() -> None:
    state = PartitionState(ordering="partition", epoch=1, start_offset=0, depth=1)
    deliver(state, [0, 1])
    (first,) = state.take_ready(10)
    state.release(first)  # final failure: the worker treats the failed offset as finished
    assert [(e.offset, e.prev) for e in state.take_ready(10)] == [(1, 0)]


def test_undispatching_restores_the_chain() -> None:
    state = PartitionState(ordering="partition", epoch=1, start_offset=0, depth=4)
    deliver(state, [0, 1, 2])
    taken = state.take_ready(10)
    for entry in reversed(taken[1:]):
        state.undispatch(entry)
    assert [(e.offset, e.prev) for e in state.take_ready(10)] == [(1, 0), (2, 1)]
