"""Starts and ends written in one batch decide and leave exactly what the same calls made one by
one would: ``many.lua`` against ``start.lua`` and ``finish.lua``, on fakeredis with Lua."""

from __future__ import annotations

import json
from typing import Any, Literal

import fakeredis
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.keys import PartitionKeys
from bridge.ledger import End, Ledger, Try

P = PartitionKeys("group", "orders", 3)
Outcome = Literal["done", "failed", "retry"]

copies = st.builds(
    Try,
    offset=st.integers(0, 3),
    epoch=st.integers(1, 2),
    attempt=st.integers(1, 2),
    retries=st.integers(0, 1),
    token=st.sampled_from(["a", "b", "c"]),
)
ends = st.builds(
    End,
    copy=copies,
    outcome=st.sampled_from(["done", "failed", "retry"]),
    detail=st.just({"error": {"type": "E", "message": "m"}}),
    delay_ms=st.sampled_from([0, 60_000]),
)
# What the ledger holds before: records started, ended or dispatched again one by one.
history = st.lists(
    st.one_of(
        st.tuples(st.just("start"), copies),
        st.tuples(st.just("end"), ends),
        st.tuples(st.just("again"), st.integers(0, 3)),
    ),
    max_size=8,
)


def fresh_ledger() -> Ledger:
    ledger = Ledger(fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True))
    ledger.client.set(P.epoch, 2)
    return ledger


def replay(ledger: Ledger, steps: list[tuple[str, Any]]) -> None:
    for kind, what in steps:
        if kind == "start":
            ledger.start(P, what, "w")
        elif kind == "end":
            ledger.finish(P, what.copy, what.outcome, detail=what.detail, delay_ms=what.delay_ms, worker="w")
        else:  # the bridge numbered a new attempt (stale.lua), without a clock in the way
            ledger.client.hsetnx(P.attempts, what, 1)
            ledger.client.hincrby(P.attempts, what, 1)


def state(ledger: Ledger) -> dict[str, Any]:
    """What the bridge and later starts read. Registration times are the clock's; after a success
    a copy's registration no longer matters (one by one keeps another copy's, a batch drops it)."""
    done = ledger.done_from(P, 0)
    running = {
        o: {k: v for k, v in json.loads(raw).items() if k != "t"}
        for o, raw in ledger.client.hgetall(P.running).items()
        if int(o) not in done
    }
    return {
        "done": done,
        "failed": ledger.client.hgetall(P.failed),
        "running": running,
        "attempts": ledger.client.hgetall(P.attempts),
        "fresh": ledger.client.lrange(P.fresh, 0, -1),
    }


@settings(max_examples=300, deadline=None)
@given(before=history, batch_ends=st.lists(ends, max_size=5), batch_starts=st.lists(copies, max_size=5))
def test_a_batch_decides_and_writes_what_the_same_calls_one_by_one_would(
    before: list[tuple[str, Any]], batch_ends: list[End], batch_starts: list[Try]
) -> None:
    alone, together = fresh_ledger(), fresh_ledger()
    replay(alone, before)
    replay(together, before)

    for end in batch_ends:
        alone.finish(P, end.copy, end.outcome, detail=end.detail, delay_ms=end.delay_ms, worker="w")
    one_by_one = [alone.start(P, c, "w") for c in batch_starts]
    answers = together.start_and_finish_many({P: [(c, "w") for c in batch_starts]}, {P: batch_ends}, "w")

    assert answers.get(P, []) == one_by_one
    assert state(together) == state(alone)


def test_a_large_batch_is_split_into_calls_lua_can_take() -> None:
    ledger = fresh_ledger()
    starts = [(Try(o, 2, 1, 0, f"k{o}"), "w") for o in range(1200)]
    answers = ledger.start_and_finish_many({P: starts}, {}, "w")
    assert answers[P] == [("run", 0)] * 1200
    ended = [End(c, "done") for c, _ in starts]
    ledger.start_and_finish_many({}, {P: ended}, "w")
    assert ledger.done_from(P, 0) == set(range(1200))
    assert ledger.running(P) == {}
