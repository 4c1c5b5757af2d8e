"""The ack ledger's scripts against fakeredis with Lua: idempotent, fenced, one clock, pruned."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from bridge.keys import PartitionKeys
from bridge.ledger import Beats, Finished, Ledger, StartResult, Try
from bridge.protocol import registration_json, staged_value

P = PartitionKeys("group", "orders", 3)


def copy(offset: int, epoch: int = 1, attempt: int = 1, retries: int = 0, token: str = "") -> Try:
    return Try(offset, epoch, attempt, retries, token or f"t{offset}.{epoch}.{attempt}.{retries}")


def start(
    ledger: Ledger,
    offset: int,
    epoch: int = 1,
    *,
    attempt: int = 1,
    retries: int = 0,
    token: str = "",
    prev: int = -1,
    live: float = 15.0,
) -> StartResult:
    return ledger.start(P, copy(offset, epoch, attempt, retries, token), "w", prev, live=live)[0]


def finish(
    ledger: Ledger,
    offset: int,
    outcome: Literal["done", "failed", "retry"] = "done",
    epoch: int = 1,
    *,
    attempt: int = 1,
    retries: int = 0,
    token: str = "",
    detail: dict[str, Any] | None = None,
    delay_ms: int = 0,
    handoff: bool = False,
    parked: Try | None = None,
) -> Finished:
    return ledger.finish(
        P,
        copy(offset, epoch, attempt, retries, token),
        outcome,
        detail=detail,
        delay_ms=delay_ms,
        worker="w",
        handoff=handoff,
        successor_token="next",
        parked=parked,
    )


def failed(ledger: Ledger) -> dict[int, dict[str, Any]]:
    return {int(k): json.loads(v) for k, v in ledger.client.hgetall(P.failed).items()}


def test_finishing_the_same_offset_twice_records_one_done_fact(ledger: Ledger) -> None:
    assert start(ledger, 10) == "run"
    finish(ledger, 10)
    finish(ledger, 10)
    assert ledger.done_from(P, 0) == {10}
    assert ledger.running(P) == {}


def test_a_start_with_an_older_epoch_is_fenced_and_leaves_no_trace(ledger: Ledger) -> None:
    first, second = ledger.bump_epochs({P: (-1, 0)}), ledger.bump_epochs({P: (-1, 0)})
    assert second[0] > first[0]
    assert start(ledger, 5, first[0]) == "fenced"
    assert ledger.running(P) == {}
    assert start(ledger, 5, second[0]) == "run"
    assert list(ledger.running(P)) == [5]


def test_epochs_never_go_backwards_even_after_the_ledger_lost_them(ledger: Ledger) -> None:
    clock = ledger.time_ms()
    (before,) = ledger.bump_epochs({P: (-1, 0)})
    assert before >= clock, "the Redis clock is the base of every epoch"
    ledger.client.flushall()
    time.sleep(0.002)
    (after,) = ledger.bump_epochs({P: (-1, 0)})
    assert after > before, "a lost epoch starts again from the clock, past every earlier one"
    (hinted,) = ledger.bump_epochs({P: (-1, after + 10**9)})
    assert hinted == after + 10**9 + 1, "the owner's last known epoch is a floor too"


def test_a_done_offset_is_not_started_again(ledger: Ledger) -> None:
    finish(ledger, 7)
    assert start(ledger, 7) == "done"


def test_a_scheduled_retry_stays_alive_until_its_eta_and_keeps_its_retry_count(ledger: Ledger) -> None:
    assert start(ledger, 3, token="a") == "run"
    finish(ledger, 3, "retry", token="a", retries=1, delay_ms=60_000)
    assert ledger.done_from(P, 0) == set()
    assert failed(ledger) == {}
    assert ledger.running(P)[3]["s"] == "retry"
    assert ledger.stale({P: [3]}, timeout=1.0)[P].again == {}, "held in the delay queue, it is alive"
    assert start(ledger, 3, retries=0, token="old") == "superseded", "an older try does not run"
    verdict, retries = ledger.start(P, copy(3, attempt=2, token="new"), "w")
    assert (verdict, retries) == ("run", 1), "a re-dispatched copy takes over the retry count"


def test_a_retry_whose_eta_passed_without_a_sign_of_life_is_dispatched_again(ledger: Ledger) -> None:
    start(ledger, 3, token="a")
    finish(ledger, 3, "retry", token="a", retries=1, delay_ms=0)
    time.sleep(0.02)
    assert ledger.stale({P: [3]}, timeout=0.01)[P].again == {3: 2}
    assert start(ledger, 3, retries=1, token="late") == "superseded", "the lost retry turned up: attempt 1 < 2"


def test_the_retry_copy_itself_runs_with_its_count(ledger: Ledger) -> None:
    start(ledger, 3, token="a")
    finish(ledger, 3, "retry", token="a", retries=1, delay_ms=10)
    assert ledger.start(P, copy(3, retries=1, token="b"), "w") == ("run", 1)


def test_a_final_failure_is_reported_until_the_bridge_settles_it(ledger: Ledger) -> None:
    detail = {"error": {"type": "ValueError", "message": "bad"}, "attempts": 3}
    finish(ledger, 4, "failed", detail=detail)
    answer = ledger.stale({P: [4]}, timeout=100)[P].progress
    assert answer.done == []
    assert answer.failed == {4: {**detail, "e": 1}}
    ledger.settle(P, [4])
    assert ledger.stale({P: [4]}, timeout=100)[P].progress.done == [4]
    assert failed(ledger) == {}


def test_a_failure_after_success_does_not_undo_the_done_fact(ledger: Ledger) -> None:
    finish(ledger, 4)
    finish(ledger, 4, "failed", detail={"error": {}})
    assert ledger.done_from(P, 0) == {4}
    assert failed(ledger) == {}


def test_the_final_failure_of_a_superseded_copy_is_not_recorded(ledger: Ledger) -> None:
    start(ledger, 4, token="a")
    assert ledger.stale({P: [4]}, timeout=-1)[P].again == {4: 2}
    assert start(ledger, 4, attempt=2, token="b", live=0.0) == "run", "copy a looks dead"
    finish(ledger, 4, "failed", token="a", detail={"error": {"type": "Old"}})
    assert failed(ledger) == {}, "the newer copy decides"
    finish(ledger, 4, "failed", attempt=2, token="b", detail={"error": {"type": "New"}})
    assert failed(ledger)[4]["error"] == {"type": "New"}


def test_within_one_epoch_the_first_failure_detail_stays_and_a_newer_epoch_replaces_it(ledger: Ledger) -> None:
    finish(ledger, 4, "failed", detail={"error": {"type": "First"}})
    finish(ledger, 4, "failed", detail={"error": {"type": "Again"}})
    assert failed(ledger)[4]["error"] == {"type": "First"}
    finish(ledger, 4, "failed", epoch=2, detail={"error": {"type": "Newer"}})
    assert failed(ledger)[4] == {"error": {"type": "Newer"}, "e": 2}


def test_pruning_drops_facts_below_the_committed_offset(ledger: Ledger) -> None:
    for offset in range(10):
        finish(ledger, offset)
    finish(ledger, 3, "failed", detail={})
    finish(ledger, 15, "failed", detail={})
    start(ledger, 2, token="dead")
    start(ledger, 12)
    ledger.prune({P: 8})
    assert ledger.done_from(P, 0) == {8, 9}
    assert set(failed(ledger)) == {15}
    assert set(ledger.running(P)) == {12}


def test_partition_keys_share_one_cluster_hash_tag() -> None:
    keys = PartitionKeys("my{group}", "orders", 3)
    tags = {k[k.index("{") + 1 : k.index("}")] for k in keys.script_keys}
    assert len(tags) == 1
    assert "{" not in next(iter(tags))


def test_a_record_waits_until_its_predecessor_is_done_or_finally_failed(ledger: Ledger) -> None:
    assert start(ledger, 11, prev=10) == "wait"
    assert ledger.running(P) == {}, "a waiting record is not running"
    start(ledger, 10, token="ten")
    finish(ledger, 10, "retry", token="ten", retries=1, delay_ms=100)
    assert start(ledger, 11, prev=10) == "wait", "a retry is not a final state"
    finish(ledger, 10, "failed", retries=1, detail={"error": {"type": "E"}})
    assert start(ledger, 11, prev=10) == "run"
    finish(ledger, 11)
    assert start(ledger, 12, prev=11) == "run"


def test_a_failure_of_an_older_epoch_never_releases_a_record_of_a_newer_one(ledger: Ledger) -> None:
    finish(ledger, 5, "failed", epoch=1, detail={"error": {"type": "E"}})
    assert start(ledger, 6, epoch=2, prev=5) == "wait", "the new owner runs 5 again first"
    late = ledger.stage({P: 2}, {P: [(5, staged_value(6, 2, 1, b"{}"))]}, 15.0)
    assert late == {P: []}, "staged behind 5, not put on the lane"
    assert start(ledger, 5, epoch=2, token="again") == "run", "an older failure does not stop a newer copy"
    result = finish(ledger, 5, "failed", epoch=2, token="again", detail={"error": {"type": "E"}}, handoff=True)
    assert (result.staged, result.body) == ("run", b"{}")


def test_a_done_predecessor_releases_nothing_while_a_copy_of_it_still_runs(ledger: Ledger) -> None:
    assert start(ledger, 5, epoch=1, token="old") == "run"
    ledger.client.set(P.epoch, 2)
    assert start(ledger, 5, epoch=2, token="new", live=60) == "duplicate", "the older copy is alive"
    ledger.client.hdel(P.running, 5)
    assert start(ledger, 5, epoch=2, token="new") == "run"
    finish(ledger, 5, epoch=1, token="old")  # the older copy ends: done, but the newer one runs
    assert start(ledger, 6, epoch=2, prev=5) == "wait"
    finish(ledger, 5, epoch=2, token="new")
    assert start(ledger, 6, epoch=2, prev=5) == "run"


def test_a_predecessor_below_the_floor_counts_as_done_after_pruning(ledger: Ledger) -> None:
    (epoch,) = ledger.bump_epochs({P: (5, 0)})
    assert start(ledger, 5, epoch, prev=4) == "run", "the assignment started past it"
    finish(ledger, 5, epoch=epoch)
    ledger.prune({P: 6})
    assert ledger.done_from(P, 0) == set()
    assert start(ledger, 6, epoch, prev=5) == "run"


def test_the_floor_follows_the_committed_offset_of_a_new_assignment_even_backwards(ledger: Ledger) -> None:
    ledger.bump_epochs({P: (50, 0)})
    ledger.prune({P: 60})
    (epoch,) = ledger.bump_epochs({P: (20, 0)})  # the group's offsets were reset by an operator
    assert start(ledger, 31, epoch, prev=30) == "wait"


def test_completions_hand_out_each_final_state_once_with_failure_details(ledger: Ledger) -> None:
    finish(ledger, 1)
    start(ledger, 2, token="two")
    finish(ledger, 2, "retry", token="two", retries=1, delay_ms=5)
    finish(ledger, 3, "failed", detail={"error": {"type": "Boom"}})
    other = PartitionKeys("group", "orders", 4)
    first = ledger.completions([P, other])
    assert first[P].done == [1]
    assert first[P].failed == {3: {"error": {"type": "Boom"}, "e": 1}}
    assert other not in first
    assert ledger.completions([P]) == {}
    assert start(ledger, 1) == "done"
    assert ledger.completions([P])[P].done == [1], "a skipped duplicate announces the done fact again"


def test_a_staged_record_is_started_by_its_predecessors_finish_in_one_round_trip(ledger: Ledger) -> None:
    (e,) = ledger.bump_epochs({P: (0, 0)})
    staged = [(0, staged_value(1, e, 1, b'{"m": 1}')), (1, staged_value(2, e, 1, b'{"m": 2}'))]
    assert ledger.stage({P: e}, {P: staged}, 15.0) == {P: []}, "both predecessors are unfinished"
    assert start(ledger, 0, e, token="zero") == "run"
    result = finish(ledger, 0, epoch=e, token="zero", handoff=True)
    assert (result.staged, result.body) == ("run", b'{"m": 1}')
    assert ledger.running(P)[1]["k"] == "next", "the successor's start is recorded under the token given"
    assert finish(ledger, 1, "retry", e, token="next", retries=1, delay_ms=5, handoff=True) == Finished()
    result = finish(ledger, 1, epoch=e, token="next", retries=1, handoff=True)
    assert (result.staged, result.body) == ("run", b'{"m": 2}')


def test_staging_behind_a_finished_record_sends_the_record_to_the_lane(ledger: Ledger) -> None:
    (e,) = ledger.bump_epochs({P: (0, 0)})
    finish(ledger, 4, epoch=e)
    finish(ledger, 5, "failed", epoch=e, detail={"error": {"type": "E"}})
    staged = [(4, staged_value(5, e, 1, b"{}")), (5, staged_value(6, e, 1, b"{}")), (6, staged_value(7, e, 1, b"{}"))]
    assert ledger.stage({P: e}, {P: staged}, 15.0) == {P: [0, 1]}


def test_a_staged_record_done_already_is_skipped_for_the_next_one(ledger: Ledger) -> None:
    (e,) = ledger.bump_epochs({P: (0, 0)})
    ledger.stage({P: e}, {P: [(0, staged_value(1, e, 1, b"one")), (1, staged_value(2, e, 1, b"two"))]}, 15.0)
    finish(ledger, 1, epoch=e)  # a copy of 1 finished elsewhere
    result = finish(ledger, 0, epoch=e, handoff=True)
    assert (result.staged, result.body) == ("run", b"two")


def test_a_staged_record_of_an_older_epoch_is_fenced_and_staging_is_cleared_by_a_new_epoch(ledger: Ledger) -> None:
    (e,) = ledger.bump_epochs({P: (0, 0)})
    ledger.stage({P: e}, {P: [(0, staged_value(1, e, 1, b"one"))]}, 15.0)
    (e2,) = ledger.bump_epochs({P: (0, 0)})
    assert finish(ledger, 0, epoch=e2, handoff=True).body is None
    ledger.stage({P: e2}, {P: [(3, staged_value(4, e2, 1, b"four"))]}, 15.0)
    ledger.client.incr(P.epoch)
    result = finish(ledger, 3, epoch=e2, handoff=True)
    assert (result.staged, result.body) == ("fenced", b"four")


def test_staging_for_a_partition_with_a_newer_owner_stages_nothing(ledger: Ledger) -> None:
    (e,) = ledger.bump_epochs({P: (0, 0)})
    ledger.bump_epochs({P: (0, 0)})
    assert ledger.stage({P: e}, {P: [(0, staged_value(1, e, 1, b"x"))]}, 15.0) == {P: [0]}
    assert ledger.client.hlen(P.staged) == 0


def test_a_finish_whose_parked_successor_is_outdated_still_hands_over_the_staged_one(ledger: Ledger) -> None:
    (e,) = ledger.bump_epochs({P: (0, 0)})
    ledger.stage({P: e}, {P: [(0, staged_value(1, e, 2, b"current"))]}, 15.0)
    ledger.client.hset(P.attempts, 1, 2)
    start(ledger, 0, e, token="zero")
    result = finish(ledger, 0, epoch=e, token="zero", handoff=True, parked=copy(1, e, attempt=1, token="older"))
    assert result.parked == "superseded"
    assert (result.staged, result.body) == ("run", b"current")


def test_a_second_copy_of_a_running_record_waits_unless_the_first_is_dead_retried_or_older(ledger: Ledger) -> None:
    assert start(ledger, 9, token="a") == "run"
    assert start(ledger, 9, token="b") == "duplicate", "the first copy is alive: this one waits for it"
    assert start(ledger, 9, token="c", live=0.0) == "run", "the first copy's worker shows no sign of life"
    assert start(ledger, 9, attempt=2, token="d", live=60) == "duplicate", "a newer attempt waits for a live copy"
    assert start(ledger, 9, attempt=2, token="d", live=0.0) == "run"
    assert start(ledger, 9, token="e", live=0.0) == "superseded", "attempt 1 is older than the registered 2"


def test_a_copy_whose_start_was_recorded_for_it_runs_but_is_still_fenced_and_checked(ledger: Ledger) -> None:
    (e,) = ledger.bump_epochs({P: (0, 0)})
    ledger.stage({P: e}, {P: [(0, staged_value(1, e, 1, b"x"))]}, 15.0)
    start(ledger, 0, e, token="zero")
    finish(ledger, 0, epoch=e, token="zero", handoff=True)
    assert start(ledger, 1, e, token="next", prev=0) == "run", "its own registration does not hold it back"
    finish(ledger, 1, epoch=e, token="next")
    assert start(ledger, 1, e, token="next", prev=0) == "done", "but a finished record does not run again"
    ledger.bump_epochs({P: (0, 0)})
    assert start(ledger, 2, e, token="x") == "fenced"


def test_a_heartbeat_refreshes_only_its_own_registration_and_restores_a_lost_one(ledger: Ledger) -> None:
    start(ledger, 1, token="mine")
    start(ledger, 2, token="theirs")
    before = ledger.running(P)
    time.sleep(0.01)
    ledger.beat({P: Beats(running=[(1, "mine", registration_json(1, 1, 0, "mine", "w")),
                                    (2, "stale", registration_json(1, 1, 0, "stale", "w"))], parked=[7])})
    after = ledger.running(P)
    assert after[1]["t"] > before[1]["t"]
    assert after[2] == before[2]
    assert ledger.client.hexists(P.beats, 7)
    ledger.client.delete(P.running)
    ledger.beat({P: Beats(running=[(1, "mine", registration_json(1, 1, 0, "mine", "w"))])})
    assert ledger.running(P)[1]["k"] == "mine", "a registration the ledger lost comes back"
    finish(ledger, 3)
    ledger.beat({P: Beats(running=[(3, "late", registration_json(1, 1, 0, "late", "w"))])})
    assert 3 not in ledger.running(P), "a finished record is not registered again"


def test_stale_numbers_new_attempts_only_for_records_without_a_sign_of_life(ledger: Ledger) -> None:
    start(ledger, 1)
    ledger.client.hset(P.beats, 2, ledger.time_ms())
    finish(ledger, 3)
    answer = ledger.stale({P: [1, 2, 3, 4]}, timeout=60)[P]
    assert answer.progress.done == [3]
    assert answer.again == {4: 2}
    assert ledger.stale({P: [4]}, timeout=60)[P].again == {4: 3}


def test_handover_names_live_copies_of_older_epochs_and_the_final_states_from_the_start(ledger: Ledger) -> None:
    start(ledger, 1, epoch=1, token="alive")
    start(ledger, 2, epoch=1, token="dead", live=15.0)
    ledger.client.hset(P.running, 2, json.dumps({"e": 1, "a": 1, "r": 0, "k": "dead", "t": 0, "s": "run"}))
    finish(ledger, 3)
    finish(ledger, 8)
    finish(ledger, 9, "failed", detail={"error": {"type": "E"}})
    (e,) = ledger.bump_epochs({P: (4, 0)})
    found = ledger.handover({P: (e, 4)}, live=15.0)[P]
    assert found.running == [1]
    assert found.done == {8}
    assert found.failed == {9: {"error": {"type": "E"}, "e": 1}}


def test_a_failure_the_bridge_decides_releases_the_waiting_successor(ledger: Ledger) -> None:
    (e,) = ledger.bump_epochs({P: (0, 0)})
    assert start(ledger, 6, e, prev=5) == "wait"
    ledger.fail({P: [(5, e, {"error": {"type": "RecordTooLarge"}, "reason": "too-large"})]})
    assert start(ledger, 6, e, prev=5) == "run"
    assert failed(ledger)[5]["reason"] == "too-large"


def test_retired_partitions_expire_unless_a_new_owner_bumps_them(ledger: Ledger) -> None:
    ledger.bump_epochs({P: (0, 0)})
    finish(ledger, 1)
    ledger.retire([P], 60)
    assert 0 < ledger.client.ttl(P.epoch) <= 60
    assert 0 < ledger.client.ttl(P.done) <= 60
    ledger.bump_epochs({P: (0, 0)})
    assert ledger.client.ttl(P.epoch) == -1
    assert ledger.client.ttl(P.done) == -1


def test_lanes_not_registered_for_a_while_leave_the_registry(ledger: Ledger) -> None:
    ledger.open_lanes({"kdb.g.orders.0": "orders", "kdb.g.orders.1": "orders"})
    # Wide margins: a loaded machine can stall a test for a good part of a second.
    time.sleep(2.0)
    ledger.open_lanes({"kdb.g.orders.1": "orders"})
    assert ledger.forget_lanes(1000) == ["kdb.g.orders.0"]
    assert ledger.lanes() == {"kdb.g.orders.1": "orders"}
