"""The worker's batcher: starts wait for their verdict, ends do not, and what piles up while a
write is in flight goes out together."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence

import pytest

from bridge.errors import LedgerUnavailable
from bridge.keys import PartitionKeys
from bridge.ledger import End, StartResult, Try
from bridge.worker.batcher import Batcher

A, B = PartitionKeys("g", "a", 0), PartitionKeys("g", "b", 1)


class FakeLedger:
    """Answers every start with ``run``; the first write blocks until released."""

    def __init__(self) -> None:
        self.writes: list[tuple[dict[PartitionKeys, list[int]], dict[PartitionKeys, list[int]]]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.failing: set[int] = set()

    def start_and_finish_many(
        self,
        starts: Mapping[PartitionKeys, Sequence[tuple[Try, str]]],
        ends: Mapping[PartitionKeys, Sequence[End]],
        worker: str,
        live: float = 15.0,
    ) -> dict[PartitionKeys, list[tuple[StartResult, int]]]:
        self.writes.append(({k: [c.offset for c, _ in v] for k, v in starts.items()},
                            {k: [e.copy.offset for e in v] for k, v in ends.items()}))
        self.entered.set()
        assert self.release.wait(10)
        if len(self.writes) in self.failing:
            raise LedgerUnavailable("ledger down")
        return {k: [("run", c.retries + 1) for c, _ in v] for k, v in starts.items()}


def wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


def copy(offset: int) -> Try:
    return Try(offset, 1, 1, 0, f"t{offset}")


def batcher(ledger: FakeLedger, failures: list[str] | None = None) -> Batcher:
    sink = failures if failures is not None else []
    return Batcher(ledger, "host:1", 15.0, sink.append)  # type: ignore[arg-type]


def test_starts_asked_while_a_write_is_in_flight_go_out_together_and_each_gets_its_own_answer() -> None:
    ledger = FakeLedger()
    writer = batcher(ledger)
    answers: dict[int, tuple[StartResult, int]] = {}

    def start(keys: PartitionKeys, offset: int) -> None:
        answers[offset] = writer.start(keys, copy(offset), "host:1:7")

    first = threading.Thread(target=start, args=(A, 0))
    first.start()
    assert ledger.entered.wait(10)
    later = [threading.Thread(target=start, args=(A if i % 2 else B, i)) for i in range(1, 6)]
    for thread in later:
        thread.start()
    writer.finish(A, End(copy(9), "done"))
    wait_for(lambda: writer.pending() == (5, 1))
    ledger.release.set()
    for thread in [first, *later]:
        thread.join(10)
    writer.close()
    assert answers == {i: ("run", 1) for i in range(6)}
    assert len(ledger.writes) == 2
    second_starts, second_ends = ledger.writes[1]
    assert sorted(second_starts[A]) == [1, 3, 5] and sorted(second_starts[B]) == [2, 4]
    assert second_ends == {A: [9]}


def test_a_failed_write_fails_its_starts_and_keeps_its_ends_for_the_next() -> None:
    ledger = FakeLedger()
    ledger.failing = {2}
    failures: list[str] = []
    writer = batcher(ledger, failures)
    writer.finish(A, End(copy(0), "done"))
    assert ledger.entered.wait(10)
    raised: list[BaseException] = []

    def start() -> None:
        try:
            writer.start(A, copy(2), "host:1:7")
        except LedgerUnavailable as e:
            raised.append(e)

    starting = threading.Thread(target=start)
    starting.start()
    writer.finish(A, End(copy(1), "done"))
    wait_for(lambda: writer.pending() == (1, 1))
    ledger.release.set()
    starting.join(10)
    writer.close()
    assert len(raised) == 1, "the start of the failed write fails in its caller"
    assert failures == ["finish"]
    assert [ends for _, ends in ledger.writes] == [{A: [0]}, {A: [1]}, {A: [1]}], "the end went out again"
    assert [starts for starts, _ in ledger.writes] == [{}, {A: [2]}, {}], "the failed start was not repeated"


def test_close_writes_pending_ends_and_a_later_call_starts_the_thread_again() -> None:
    ledger = FakeLedger()
    ledger.release.set()
    writer = batcher(ledger)
    writer.finish(A, End(copy(1), "done"))
    writer.close()
    assert ledger.writes[-1][1] == {A: [1]}
    assert writer.start(B, copy(2), "host:1:7") == ("run", 1)
    writer.close()


class EchoLedger:
    """Answers each start with its own offset as the retry count, after a short pause."""

    def __init__(self) -> None:
        self.writes = 0

    def start_and_finish_many(
        self,
        starts: Mapping[PartitionKeys, Sequence[tuple[Try, str]]],
        ends: Mapping[PartitionKeys, Sequence[End]],
        worker: str,
        live: float = 15.0,
    ) -> dict[PartitionKeys, list[tuple[StartResult, int]]]:
        self.writes += 1
        time.sleep(0.0005)
        return {k: [("run", c.offset) for c, _ in v] for k, v in starts.items()}


def test_threads_asking_again_and_again_each_get_the_answer_to_their_own_start() -> None:
    # A thread reuses one event for all its waits, and one handed the writer's role is woken
    # through it too: no wake-up may hand it an answer meant for another start.
    ledger = EchoLedger()
    writer = Batcher(ledger, "host:1", 15.0, lambda _: None)  # type: ignore[arg-type]
    wrong: list[tuple[int, tuple[StartResult, int]]] = []

    def ask(thread: int) -> None:
        for n in range(150):
            offset = thread * 1000 + n
            answer = writer.start(A if n % 2 else B, copy(offset), f"host:1:{thread}")
            if answer != ("run", offset):
                wrong.append((offset, answer))
            if n % 3 == 0:
                writer.finish(A, End(copy(offset), "done"))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    writer.close()
    assert wrong == []
    assert ledger.writes < 8 * 150, "starts asked during a write went out together"


def test_an_end_that_comes_while_the_flusher_lingers_is_written_at_its_deadline_without_a_start() -> None:
    ledger = FakeLedger()
    ledger.release.set()
    writer = batcher(ledger)
    writer.finish(A, End(copy(1), "done"))  # wakes the idle flusher, which lingers
    assert writer.start(B, copy(2), "host:1:7") == ("run", 1)  # takes end 1 along
    writer.finish(A, End(copy(3), "done"))  # the flusher is not woken for it
    wait_for(lambda: any(ends == {A: [3]} for _, ends in ledger.writes))
    writer.finish(A, End(copy(4), "done"))  # the flusher went idle again: woken at once
    wait_for(lambda: any(ends == {A: [4]} for _, ends in ledger.writes))
    writer.close()
    written = [offset for _, ends in ledger.writes for offset in ends.get(A, [])]
    assert sorted(written) == [1, 3, 4]


def test_a_start_that_gives_up_waiting_is_not_handed_the_writers_role(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before the fix the start that timed out stayed queued; the write in flight handed it the
    # writer's role, and since its thread had gone, no start in the process was answered again.
    monkeypatch.setattr("bridge.worker.batcher._START_WAIT", 0.2)
    ledger = FakeLedger()
    writer = batcher(ledger)
    answers: dict[int, tuple[StartResult, int]] = {}
    first = threading.Thread(target=lambda: answers.setdefault(0, writer.start(A, copy(0), "host:1:1")))
    first.start()
    assert ledger.entered.wait(10)
    with pytest.raises(LedgerUnavailable, match=r"a\[0\]@1: no answer"):
        writer.start(A, copy(1), "host:1:2")
    assert writer.pending() == (0, 0)
    ledger.release.set()
    first.join(10)
    assert writer.start(B, copy(2), "host:1:3") == ("run", 1)
    assert answers == {0: ("run", 1)}
    assert [starts for starts, _ in ledger.writes] == [{A: [0]}, {B: [2]}]
