"""The ack ledger's scripts against fakeredis with Lua: idempotent, fenced, pruned."""

from __future__ import annotations

from bridge.keys import PartitionKeys
from bridge.ledger import Ledger

P = PartitionKeys("group", "orders", 3)


def test_finishing_the_same_offset_twice_records_one_done_fact(ledger: Ledger) -> None:
    assert ledger.start(P, 10, 1, "w") == "run"
    ledger.finish(P, 10, "done")
    ledger.finish(P, 10, "done")
    assert ledger.done_from(P, 0) == {10}
    assert ledger.running(P) == {}


def test_a_start_with_an_older_epoch_is_fenced_and_leaves_no_trace(ledger: Ledger) -> None:
    assert ledger.bump_epochs([P]) == [1]
    assert ledger.bump_epochs([P]) == [2]
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
    assert ledger.progress({P: (0, 10)})[P].failed == {}


def test_a_final_failure_is_reported_until_the_bridge_settles_it(ledger: Ledger) -> None:
    ledger.finish(P, 4, "failed", {"error": {"type": "ValueError", "message": "bad"}, "attempts": 3})
    progress = ledger.progress({P: (0, 10)})[P]
    assert progress.done == []
    assert progress.failed == {4: {"error": {"type": "ValueError", "message": "bad"}, "attempts": 3}}
    ledger.settle(P, [4])
    progress = ledger.progress({P: (0, 10)})[P]
    assert progress.done == [4]
    assert progress.failed == {}


def test_a_failure_after_success_does_not_undo_the_done_fact(ledger: Ledger) -> None:
    ledger.finish(P, 4, "done")
    ledger.finish(P, 4, "failed", {"error": {}})
    progress = ledger.progress({P: (0, 10)})[P]
    assert progress.done == [4]
    assert progress.failed == {}


def test_progress_reads_only_the_requested_span(ledger: Ledger) -> None:
    for offset in (1, 5, 9, 12):
        ledger.finish(P, offset, "done")
    ledger.finish(P, 20, "failed", {})
    progress = ledger.progress({P: (5, 12)})[P]
    assert progress.done == [5, 9, 12]
    assert progress.failed == {}


def test_pruning_drops_facts_below_the_committed_offset(ledger: Ledger) -> None:
    for offset in range(10):
        ledger.finish(P, offset, "done")
    ledger.finish(P, 3, "failed", {})
    ledger.finish(P, 15, "failed", {})
    ledger.prune({P: 8})
    assert ledger.done_from(P, 0) == {8, 9}
    assert set(ledger.progress({P: (0, 100)})[P].failed) == {15}


def test_partition_keys_share_one_cluster_hash_tag() -> None:
    keys = PartitionKeys("my{group}", "orders", 3)
    tags = {k[k.index("{") + 1 : k.index("}")] for k in (keys.epoch, keys.done, keys.failed, keys.running)}
    assert len(tags) == 1
    assert "{" not in next(iter(tags))
