"""Giving up records whose workers keep dying (max_redispatches), in the ledger's scripts against
fakeredis with Lua: each death counted once, the give-up fenced against every older copy."""

from __future__ import annotations

import json
import time
from typing import Any

from bridge.keys import PartitionKeys
from bridge.ledger import Beats, Ledger, Stale, Try
from bridge.protocol import registration_json, staged_value

P = PartitionKeys("group", "orders", 0)


def bump(ledger: Ledger, committed: int = 0) -> int:
    return ledger.bump_epochs({P: (committed, 0)})[0]


def start(ledger: Ledger, offset: int, epoch: int, token: str, *, attempt: int = 1, retries: int = 0,
          prev: int = -1, live: float = 15.0) -> str:
    return ledger.start(P, Try(offset, epoch, attempt, retries, token), "w1", prev, live=live)[0]


def die(ledger: Ledger, offset: int) -> None:
    """The worker running ``offset`` stopped: its last sign of life was 100 s ago."""
    entry = json.loads(ledger.client.hget(P.running, offset))
    ledger.client.hset(P.running, offset, json.dumps({**entry, "t": ledger.time_ms() - 100_000}))


def stale(ledger: Ledger, offset: int, epoch: int, limit: int | None, timeout: float = 60.0) -> Stale:
    return ledger.stale({P: [offset]}, timeout, {P: (limit, epoch)})[P]


def deaths(ledger: Ledger, offset: int) -> int:
    return int(ledger.client.hget(P.died, offset) or 0)


def failure(ledger: Ledger, offset: int) -> dict[str, Any]:
    return dict(json.loads(ledger.client.hget(P.failed, offset)))


def test_a_record_whose_worker_dies_each_run_is_given_up_after_max_redispatches_reruns(ledger: Ledger) -> None:
    e = bump(ledger)
    attempts = []
    for attempt in (1, 2, 3):
        assert start(ledger, 5, e, f"run{attempt}", attempt=attempt) == "run"
        die(ledger, 5)
        answer = stale(ledger, 5, e, limit=2)
        attempts.append((answer.again, sorted(answer.stuck)))
    assert attempts == [({5: 2}, []), ({5: 3}, []), ({}, [5])], "two re-runs allowed, the third death gives up"
    detail = stale(ledger, 5, e, limit=2).progress.failed[5]
    assert detail == failure(ledger, 5)
    assert (detail["reason"], detail["attempts"], detail["e"], detail["error"]["type"]) == ("stuck", 3, e, "Stuck")
    assert "3 runs ended without a sign of life" in detail["error"]["message"]
    assert "max_redispatches=2" in detail["error"]["message"]
    assert "last sign of life 100.0s before it was given up, on worker w1" in detail["error"]["message"]
    assert 0 < ledger.time_ms() - detail["last_seen_ms"] < 101_000


def test_a_death_is_counted_once_however_often_the_bridge_looks_at_it(ledger: Ledger) -> None:
    e = bump(ledger)
    start(ledger, 5, e, "run1")
    die(ledger, 5)
    # The copy dispatched again never starts (no worker is up): the same death is seen each time.
    for expected in (2, 3, 4):
        assert stale(ledger, 5, e, limit=1, timeout=0.0).again == {5: expected}
    assert deaths(ledger, 5) == 1
    assert ledger.running(P)[5]["s"] == "dead"
    assert start(ledger, 5, e, "run4", attempt=4) == "run", "the copy that takes over counts no second death"
    assert deaths(ledger, 5) == 1


def test_deaths_count_when_the_task_broker_runs_the_record_again_by_itself(ledger: Ledger) -> None:
    e = bump(ledger)
    start(ledger, 5, e, "first")
    # dramatiq's Redis broker hands a dead worker's unacknowledged message out again: same attempt.
    assert start(ledger, 5, e, "again", live=0.0) == "run"
    assert deaths(ledger, 5) == 1
    assert stale(ledger, 5, e, limit=0).stuck == {}, "never given up while a copy of it runs"
    die(ledger, 5)
    answer = stale(ledger, 5, e, limit=0, timeout=1000.0)
    assert sorted(answer.stuck) == [5], "its last copy died: given up before it looked silent for the timeout"
    assert deaths(ledger, 5) == 2
    assert start(ledger, 5, e, "late", live=0.0) == "superseded"


def test_scheduled_retries_and_live_copies_are_no_deaths(ledger: Ledger) -> None:
    e = bump(ledger)
    start(ledger, 5, e, "a")
    ledger.finish(P, Try(5, e, 1, 1, "a"), "retry", delay_ms=0)
    time.sleep(0.01)
    assert start(ledger, 5, e, "b", retries=1, live=0.0) == "run", "the retry's own copy"
    assert start(ledger, 5, e, "c", retries=1) == "duplicate", "a live copy is waited for"
    assert deaths(ledger, 5) == 0
    assert stale(ledger, 5, e, limit=0).stuck == {}


def test_no_limit_never_gives_up(ledger: Ledger) -> None:
    e = bump(ledger)
    for attempt in range(1, 6):
        start(ledger, 5, e, f"run{attempt}", attempt=attempt)
        die(ledger, 5)
        assert stale(ledger, 5, e, limit=None).again == {5: attempt + 1}
    assert deaths(ledger, 5) == 5


def test_no_older_copy_runs_or_settles_a_record_given_up(ledger: Ledger) -> None:
    e = bump(ledger)
    start(ledger, 5, e, "zombie")
    die(ledger, 5)
    assert stale(ledger, 5, e, limit=0).stuck
    recorded = failure(ledger, 5)
    assert start(ledger, 5, e, "queued", live=0.0) == "superseded", "a copy still in the task broker"
    ledger.finish(P, Try(5, e, 1, 0, "zombie"), "failed", detail={"error": {"type": "Late"}})
    assert failure(ledger, 5) == recorded, "the zombie's own failure changes nothing"
    ledger.finish(P, Try(5, e, 1, 0, "zombie"), "retry", delay_ms=1000)
    assert 5 not in ledger.running(P), "nor does its retry: it is alive nowhere"
    assert P not in ledger.completions([P]), "nothing new for the bridge to dead-letter"
    ledger.settle(P, [5])
    assert start(ledger, 5, e, "queued", live=0.0) == "done"
    ledger.prune({P: 6})
    assert not ledger.client.hexists(P.died, 5)
    # dramatiq hands a dead worker's message out again long after the commit passed it.
    assert start(ledger, 5, e, "very-late", live=0.0) == "done", "below the committed offset nothing runs again"
    assert ledger.start_and_finish_many({P: [(Try(5, e, 1, 0, "batch"), "w2")]}, {}, "w2")[P] == [("done", 0)]


def test_a_zombie_that_shows_life_again_runs_on_and_holds_its_successor(ledger: Ledger) -> None:
    e = bump(ledger)
    start(ledger, 5, e, "zombie")
    die(ledger, 5)
    stale(ledger, 5, e, limit=3)
    assert ledger.running(P)[5]["s"] == "dead"
    ledger.beat({P: Beats(running=[(5, "zombie", registration_json(e, 1, 0, "zombie", "w1"))])})
    assert ledger.running(P)[5]["s"] == "run"
    assert start(ledger, 5, e, "next", attempt=2) == "duplicate", "the new copy waits for the live one"


def test_giving_up_hands_back_the_successor_staged_behind_and_releases_it(ledger: Ledger) -> None:
    e = bump(ledger)
    ledger.stage({P: e}, {P: [(5, staged_value(6, e, 1, b"body"))]}, 15.0)
    start(ledger, 5, e, "zombie")
    die(ledger, 5)
    answer = stale(ledger, 5, e, limit=0)
    assert answer.stuck[5].successor == 6
    assert ledger.client.hlen(P.staged) == 0, "no finish will hand it over: the bridge puts it on the lane"
    assert start(ledger, 6, e, "six", prev=5) == "run", "a record given up releases its successor"


def test_a_bridge_with_a_newer_owner_gives_nothing_up(ledger: Ledger) -> None:
    e = bump(ledger)
    start(ledger, 5, e, "zombie")
    die(ledger, 5)
    bump(ledger)
    answer = stale(ledger, 5, e, limit=0)
    assert answer.stuck == {}
    assert not ledger.client.hexists(P.failed, 5)
