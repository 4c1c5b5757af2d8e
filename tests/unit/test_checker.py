"""The history checker on synthetic histories: it accepts good ones and names each violation."""

from __future__ import annotations

from tests.support.checker import CommitSample, HandlerEvent, Produced, check

T = "t"


def produced(n: int) -> list[Produced]:
    return [Produced(T, 0, o, str(o % 2)) for o in range(n)]


def run(offsets: list[int], *, start_ms: int = 0, epoch: int = 1, pid: int = 1) -> list[HandlerEvent]:
    events = []
    ms = start_ms
    for o in offsets:
        events.append(HandlerEvent("S", T, 0, o, str(o % 2), pid, epoch, ms))
        events.append(HandlerEvent("E", T, 0, o, str(o % 2), pid, epoch, ms + 1, "ok"))
        ms += 10
    return events


def samples(*points: tuple[int, int]) -> list[CommitSample]:
    return [CommitSample(ms, T, 0, offset) for ms, offset in points]


def test_a_good_history_has_no_violations() -> None:
    verdict = check(produced(5), run([0, 1, 2, 3, 4]), samples((15, 2), (100, 5)),
                    final_committed={(T, 0): 5}, ordering="partition")
    assert verdict.ok, verdict.violations
    assert (verdict.produced, verdict.processed, verdict.duplicates) == (5, 5, 0)


def test_a_record_committed_past_but_never_processed_is_lost() -> None:
    verdict = check(produced(5), run([0, 1, 3, 4]), samples((100, 5)), final_committed={(T, 0): 5},
                    ordering="none")
    assert verdict.violations.keys() == {"I1 no loss", "I2 commit never ahead"}
    assert verdict.lost == ["t[0]@2 committed past but never processed"]


def test_a_dead_lettered_record_is_not_lost() -> None:
    verdict = check(produced(3), run([0, 2]), samples((100, 3)), final_committed={(T, 0): 3},
                    ordering="none", dead_lettered=[(T, 0, 1)])
    assert verdict.ok, verdict.violations


def test_a_commit_ahead_of_an_unfinished_record_is_reported() -> None:
    # @1 finishes at 11 ms, but the commit already covered it at 5 ms.
    verdict = check(produced(2), run([0, 1]), samples((5, 2)), final_committed={(T, 0): 2}, ordering="none")
    assert verdict.commit_ahead == ["t[0] committed 2 at 5 before @1 was done"]


def test_a_reorder_inside_one_run_is_reported_but_a_replay_in_a_new_epoch_is_not() -> None:
    reordered = check(produced(3), run([0, 2, 1]), samples((100, 3)), final_committed={(T, 0): 3},
                      ordering="partition")
    assert reordered.order == ["t[0] epoch 1: @1 started after @2"]
    replayed = check(produced(3), run([0, 1, 2]) + run([1, 2], start_ms=50, epoch=2),
                     samples((5, 0), (100, 3)), final_committed={(T, 0): 3}, ordering="partition")
    assert replayed.order == []
    assert replayed.duplicates == 2
    assert replayed.ok, replayed.violations


def test_overlapping_starts_in_one_partition_are_reported_unless_the_runner_was_killed() -> None:
    events = [
        HandlerEvent("S", T, 0, 0, "0", 7, 1, 0),
        HandlerEvent("S", T, 0, 1, "1", 8, 1, 5),
        HandlerEvent("E", T, 0, 1, "1", 8, 1, 6, "ok"),
        HandlerEvent("S", T, 0, 0, "0", 8, 2, 7),
        HandlerEvent("E", T, 0, 0, "0", 8, 2, 8, "ok"),
    ]
    verdict = check(produced(2), events, [], final_committed={(T, 0): 2}, ordering="partition")
    assert verdict.overlaps == ["t[0]@1 started while @0 ran (pid 7)"]
    assert check(produced(2), events, [], final_committed={(T, 0): 2}, ordering="partition",
                 killed_pids=[7]).overlaps == []


def call(offsets: list[int], token: str, *, ms: int, pid: int = 1, ended: bool = True) -> list[HandlerEvent]:
    """One batch call: its records start together and end together, sharing the call's token."""
    events = [HandlerEvent("S", T, 0, o, str(o % 2), pid, 1, ms, "", token) for o in offsets]
    if ended:
        events += [HandlerEvent("E", T, 0, o, str(o % 2), pid, 1, ms + 5, "ok", token) for o in offsets]
    return events


def test_the_records_of_a_batch_call_start_together_and_count_as_one_run() -> None:
    events = call([0, 1, 2, 3], "a", ms=0) + call([4, 5, 6, 7], "b", ms=10)
    verdict = check(produced(8), events, samples((100, 8)), final_committed={(T, 0): 8}, ordering="partition")
    assert verdict.ok, verdict.violations
    overlapping = call([0, 1], "a", ms=0, ended=False) + call([2, 3], "b", ms=2)
    assert check(produced(4), overlapping, [], final_committed={(T, 0): 4}, ordering="partition").overlaps == [
        "t[0]@2 started while @1 ran (pid 1)"
    ]


def test_a_killed_batch_call_may_be_repeated_from_its_first_offset_but_no_call_goes_back_further() -> None:
    killed = call([0, 1], "a", ms=0) + call([2, 3, 4], "b", ms=10, pid=7, ended=False)
    rerun = killed + call([2, 3, 4], "c", ms=20, pid=8)
    verdict = check(produced(5), rerun, [], final_committed={(T, 0): 5}, ordering="partition", killed_pids=[7])
    assert verdict.ok, verdict.violations
    back = killed + call([1, 2, 3, 4], "c", ms=20, pid=8)
    assert check(produced(5), back, [], final_committed={(T, 0): 5}, ordering="partition",
                 killed_pids=[7]).order == ["t[0] epoch 1: @1 started after @4"]
    # Killed after the call returned, before the ledger heard of it: the whole call runs again.
    returned = call([0, 1], "a", ms=0) + call([2, 3, 4], "b", ms=10, pid=7) + call([2, 3, 4], "c", ms=20, pid=8)
    assert check(produced(5), returned, [], final_committed={(T, 0): 5}, ordering="partition",
                 killed_pids=[7]).order == []
    after_success = call([0, 1, 2], "a", ms=0) + call([1, 2], "b", ms=10)
    assert check(produced(3), after_success, [], final_committed={(T, 0): 3},
                 ordering="partition").order == ["t[0] epoch 1: @1 started after @2"]


def test_a_commit_regression_is_reported() -> None:
    verdict = check(produced(3), run([0, 1, 2]), samples((50, 3), (60, 1), (70, 3)),
                    final_committed={(T, 0): 3}, ordering="none")
    assert verdict.commit_regressions == ["t[0] committed 1 after 3 at 60"]


def test_a_duplicate_of_already_committed_work_is_outside_the_window() -> None:
    events = run([0, 1, 2]) + run([0], start_ms=80, epoch=2)
    verdict = check(produced(3), events, samples((50, 3)), final_committed={(T, 0): 3}, ordering="none")
    assert verdict.duplicates_outside_window == ["t[0]@0 ran again at 80 after the commit reached 3"]


def test_a_final_commit_short_of_the_end_is_reported_after_a_graceful_end() -> None:
    verdict = check(produced(3), run([0, 1, 2]), samples((50, 2)), final_committed={(T, 0): 2}, ordering="none")
    assert verdict.final_commit == ["t[0] committed 2, last record 2"]
