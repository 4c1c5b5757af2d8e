"""The ack ledger's scripts against fakeredis with Lua: idempotent, fenced, pruned."""

from __future__ import annotations

from bridge.keys import PartitionKeys
from bridge.ledger import Ledger, staged_value

P = PartitionKeys("group", "orders", 3)


def test_finishing_the_same_offset_twice_records_one_done_fact(ledger: Ledger) -> None:
    assert ledger.start(P, 10, 1, "w") == "run"
    ledger.finish(P, 10, "done")
    ledger.finish(P, 10, "done")
    assert ledger.done_from(P, 0) == {10}
    assert ledger.running(P) == {}


def test_a_start_with_an_older_epoch_is_fenced_and_leaves_no_trace(ledger: Ledger) -> None:
    assert ledger.bump_epochs({P: -1}) == [1]
    assert ledger.bump_epochs({P: -1}) == [2]
    assert ledger.start(P, 5, 1, "w") == "fenced"
    assert ledger.running(P) == {}
    assert ledger.start(P, 5, 2, "w") == "run"
    assert list(ledger.running(P)) == [5]


def test_a_done_offset_is_not_started_again(ledger: Ledger) -> None:
    ledger.finish(P, 7, "done")
    assert ledger.start(P, 7, 1, "w") == "done"


def test_a_scheduled_retry_is_not_done_and_not_running(ledger: Ledger) -> None:
    ledger.start(P, 3, 0, "w")
    ledger.finish(P, 3, "retry")
    assert ledger.done_from(P, 0) == set()
    assert ledger.running(P) == {}
    assert ledger.progress(P, range(0, 11)).failed == {}


def test_a_final_failure_is_reported_until_the_bridge_settles_it(ledger: Ledger) -> None:
    ledger.finish(P, 4, "failed", {"error": {"type": "ValueError", "message": "bad"}, "attempts": 3})
    progress = ledger.progress(P, range(0, 11))
    assert progress.done == []
    assert progress.failed == {4: {"error": {"type": "ValueError", "message": "bad"}, "attempts": 3}}
    ledger.settle(P, [4])
    progress = ledger.progress(P, range(0, 11))
    assert progress.done == [4]
    assert progress.failed == {}


def test_a_failure_after_success_does_not_undo_the_done_fact(ledger: Ledger) -> None:
    ledger.finish(P, 4, "done")
    ledger.finish(P, 4, "failed", {"error": {}})
    progress = ledger.progress(P, range(0, 11))
    assert progress.done == [4]
    assert progress.failed == {}


def test_progress_reads_only_the_requested_span(ledger: Ledger) -> None:
    for offset in (1, 5, 9, 12):
        ledger.finish(P, offset, "done")
    ledger.finish(P, 20, "failed", {})
    progress = ledger.progress(P, range(5, 13))
    assert progress.done == [5, 9, 12]
    assert progress.failed == {}


def test_pruning_drops_facts_below_the_committed_offset(ledger: Ledger) -> None:
    for offset in range(10):
        ledger.finish(P, offset, "done")
    ledger.finish(P, 3, "failed", {})
    ledger.finish(P, 15, "failed", {})
    ledger.prune({P: 8})
    assert ledger.done_from(P, 0) == {8, 9}
    assert set(ledger.progress(P, range(0, 101)).failed) == {15}


def test_partition_keys_share_one_cluster_hash_tag() -> None:
    keys = PartitionKeys("my{group}", "orders", 3)
    tags = {k[k.index("{") + 1 : k.index("}")] for k in (keys.epoch, keys.done, keys.failed, keys.running)}
    assert len(tags) == 1
    assert "{" not in next(iter(tags))


def test_a_record_waits_until_its_predecessor_is_done_or_finally_failed(ledger: Ledger) -> None:
    assert ledger.start(P, 11, 0, "w", prev=10) == "wait"
    assert ledger.running(P) == {}, "a waiting record is not running"
    ledger.finish(P, 10, "retry")
    assert ledger.start(P, 11, 0, "w", prev=10) == "wait", "a retry is not a final state"
    ledger.finish(P, 10, "failed", {"error": {"type": "E"}})
    assert ledger.start(P, 11, 0, "w", prev=10) == "run"
    ledger.finish(P, 11, "done")
    assert ledger.start(P, 12, 0, "w", prev=11) == "run"


def test_a_predecessor_below_the_floor_counts_as_done_after_pruning(ledger: Ledger) -> None:
    ledger.bump_epochs({P: 5})
    assert ledger.start(P, 5, 1, "w", prev=4) == "run", "the assignment started past it"
    ledger.finish(P, 5, "done")
    ledger.prune({P: 6})
    assert ledger.done_from(P, 0) == set()
    assert ledger.start(P, 6, 1, "w", prev=5) == "run"


def test_the_floor_follows_the_committed_offset_of_a_new_assignment_even_backwards(ledger: Ledger) -> None:
    ledger.bump_epochs({P: 50})
    ledger.prune({P: 60})
    ledger.bump_epochs({P: 20})  # the group's offsets were reset by an operator
    assert ledger.start(P, 31, 2, "w", prev=30) == "wait"


def test_completions_hand_out_each_final_state_once_with_failure_details(ledger: Ledger) -> None:
    ledger.finish(P, 1, "done")
    ledger.finish(P, 2, "retry")
    ledger.finish(P, 3, "failed", {"error": {"type": "Boom"}})
    other = PartitionKeys("group", "orders", 4)
    first = ledger.completions([P, other])
    assert first[P].done == [1]
    assert first[P].failed == {3: {"error": {"type": "Boom"}}}
    assert other not in first
    assert ledger.completions([P]) == {}
    assert ledger.start(P, 1, 0, "w") == "done"
    assert ledger.completions([P])[P].done == [1], "a skipped duplicate announces the done fact again"


def test_progress_reads_done_and_failed_facts_of_chosen_offsets(ledger: Ledger) -> None:
    ledger.finish(P, 1, "done")
    ledger.finish(P, 3, "failed", {"error": {"type": "Boom"}})
    progress = ledger.progress(P, [1, 2, 3])
    assert progress.done == [1]
    assert progress.failed == {3: {"error": {"type": "Boom"}}}


def test_a_staged_record_is_started_by_its_predecessors_finish_in_one_round_trip(ledger: Ledger) -> None:
    ledger.bump_epochs({P: 0})
    late = ledger.stage({P: [(0, staged_value(1, 1, 1, b'{"m": 1}')), (1, staged_value(2, 1, 1, b'{"m": 2}'))]})
    assert late == {P: []}, "both predecessors are unfinished"
    assert ledger.start(P, 0, 1, "w") == "run"
    verdict, body = ledger.finish(P, 0, "done", handoff=True, worker="w")
    assert (verdict, body) == ("run", b'{"m": 1}')
    assert list(ledger.running(P)) == [1], "the successor's start is recorded"
    assert ledger.finish(P, 1, "retry", handoff=True, worker="w") == (None, None), "a retry is not final"
    assert ledger.finish(P, 1, "done", handoff=True, worker="w") == ("run", b'{"m": 2}')


def test_staging_behind_a_finished_record_sends_the_record_to_the_lane(ledger: Ledger) -> None:
    ledger.bump_epochs({P: 0})
    ledger.finish(P, 4, "done")
    ledger.finish(P, 5, "failed", {"error": {"type": "E"}})
    late = ledger.stage({P: [(4, staged_value(5, 1, 1, b"{}")), (5, staged_value(6, 1, 1, b"{}")),
                             (6, staged_value(7, 1, 1, b"{}"))]})
    assert late == {P: [0, 1]}


def test_a_staged_record_done_already_is_skipped_for_the_next_one(ledger: Ledger) -> None:
    ledger.bump_epochs({P: 0})
    ledger.stage({P: [(0, staged_value(1, 1, 1, b"one")), (1, staged_value(2, 1, 1, b"two"))]})
    ledger.finish(P, 1, "done")  # a copy of 1 finished elsewhere
    assert ledger.finish(P, 0, "done", handoff=True, worker="w") == ("run", b"two")


def test_a_staged_record_of_an_older_epoch_is_fenced_and_staging_is_cleared_by_a_new_epoch(ledger: Ledger) -> None:
    ledger.bump_epochs({P: 0})
    ledger.stage({P: [(0, staged_value(1, 1, 1, b"one"))]})
    ledger.bump_epochs({P: 0})
    assert ledger.finish(P, 0, "done", handoff=True, worker="w") == (None, None)
    ledger.stage({P: [(3, staged_value(4, 1, 1, b"four"))]})
    ledger.client.incr(P.epoch)
    assert ledger.finish(P, 3, "done", handoff=True, worker="w") == ("fenced", b"four")


def test_a_second_copy_of_a_running_attempt_does_not_start_unless_the_first_is_dead_or_retried(
    ledger: Ledger,
) -> None:
    assert ledger.start(P, 9, 0, "w1") == "run"
    assert ledger.start(P, 9, 0, "w2") == "superseded", "the first copy is alive"
    assert ledger.start(P, 9, 0, "w2", retries=1) == "run", "dramatiq's retry of a failed try"
    assert ledger.start(P, 9, 0, "w3", retries=1, live=0.0) == "run", "the copy's worker shows no sign of life"
    assert ledger.start(P, 9, 0, "w4", attempt=2) == "run", "a new attempt from the bridge"
