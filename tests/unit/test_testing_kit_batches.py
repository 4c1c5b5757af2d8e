"""bridge.testing with batch handlers (tests/unit/kit_batches.py): fed records run as batches through
the real loop and worker, and ran(), processed(), batches() and the dead letters report per record."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bridge.testing import DeadLettered, KafkaTestKit
from tests.unit import kit_batches

MODULE = "tests.unit.kit_batches"


@pytest.fixture
def kit() -> Iterator[KafkaTestKit]:
    kit_batches.reset()
    with KafkaTestKit(MODULE) as started:
        yield started


def test_fed_records_run_as_batches_in_offset_order_and_each_record_reports_its_own_run(
    kit: KafkaTestKit,
) -> None:
    for n in range(7):
        kit.feed("clicks", {"n": n})
    kit.run()
    assert kit_batches.calls == [[(0, 0), (0, 1), (0, 2)], [(0, 3), (0, 4), (0, 5)], [(0, 6)]]
    assert [[r.offset for r in call] for call in kit.batches("clicks")] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [(r.offset, r.attempt, r.outcome) for r in kit.ran("clicks")] == [(o, 1, "done") for o in range(7)]
    assert [r.value["n"] for r in kit.processed("clicks")] == list(range(7))
    first = kit.ran("clicks")[0]
    assert [r.offset for r in first.batch] == [0, 1, 2], "a run knows the records of its call"
    assert kit.order_violations("clicks") == [], "records of one call are one run for the order check"
    assert kit.committed("clicks") == {0: 7}
    assert kit.dead_letters() == []


def test_a_record_a_batch_names_as_failed_is_retried_alone_then_dead_lettered_with_its_own_error(
    kit: KafkaTestKit,
) -> None:
    kit.feed("clicks", {"n": 0})
    kit.feed("clicks", {"n": 1, "fail": True})
    kit.feed("clicks", {"n": 2})
    with pytest.raises(DeadLettered, match=r"clicks\[0\]@1") as raised:
        kit.run()
    assert isinstance(raised.value.__cause__, ValueError), "chained to the record's own error"
    assert kit_batches.calls == [[(0, 0), (0, 1), (0, 2)], [(0, 1)]]
    assert [(r.offset, r.attempt, r.outcome) for r in kit.ran("clicks")] == [
        (0, 1, "done"), (1, 1, "retried"), (2, 1, "done"), (1, 2, "failed")
    ]
    failed = kit.ran("clicks")[-1]
    assert str(failed.error) == "click 1 is malformed" and failed.backoff_ms is None
    assert [r.offset for r in kit.processed("clicks")] == [0, 2]
    (letter,) = kit.dead_letters("clicks")
    assert (letter.offset, letter.reason, letter.attempts) == (1, "final-failure", 2)
    assert (letter.error_type, letter.error_message) == ("ValueError", "click 1 is malformed")
    assert kit.committed("clicks") == {0: 3}


def test_a_topic_batch_handler_gets_records_of_several_partitions_in_one_call(kit: KafkaTestKit) -> None:
    for partition in (2, 0, 1):
        kit.feed("pings", b"ping", partition=partition)
    kit.feed("pings", b"ping", partition=0)
    kit.run()
    (call,) = kit.batches("pings")
    assert sorted((r.partition, r.offset) for r in call) == [(0, 0), (0, 1), (1, 0), (2, 0)]
    assert [r.offset for r in call if r.partition == 0] == [0, 1], "a partition's records stay in order"
    assert kit.batches("pings", partition=1) == [call]
    assert kit.committed("pings") == {0: 2, 1: 1, 2: 1}
