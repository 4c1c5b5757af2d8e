"""bridge.testing: a handler module's records through the real loop, middleware and a dramatiq
worker on a StubBroker, with what ran, in which order, and what was dead-lettered.

The module under test is tests/unit/kit_shop.py, written as a team would write one (its own Redis
broker, which nothing may reach). Nothing here waits for time to pass except the timeout test.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator

import dramatiq
import dramatiq.broker
import pytest

from bridge import Record
from bridge.handlers import handler_of
from bridge.registry import clear_registry
from bridge.testing import DeadLettered, KafkaTestKit, KitError, NotFinished, Run, encode
from bridge.testing.report import order_violations
from tests.unit import kit_shop

SHOP = "tests.unit.kit_shop"


@pytest.fixture
def kit() -> Iterator[KafkaTestKit]:
    kit_shop.reset()
    with KafkaTestKit(SHOP) as started:
        yield started
    kit_shop.release.set()


def test_records_of_one_key_run_one_at_a_time_in_offset_order_while_a_retry_holds_the_next_back(
    kit: KafkaTestKit,
) -> None:
    kit.feed("steps", {"n": 1, "fail": 2}, key="a")
    kit.feed("steps", {"n": 1}, key="b")
    kit.feed("steps", {"n": 2}, key="a")
    kit.feed("steps", {"n": 2}, key="b")
    kit.feed("steps", {"n": 3}, key="a")
    result = kit.run()
    # The second record of "a" starts only after the first one's third attempt succeeded.
    assert [(r.offset, r.attempt, r.outcome) for r in kit.ran("steps", key="a")] == [
        (0, 1, "retried"), (0, 2, "retried"), (0, 3, "done"), (2, 1, "done"), (4, 1, "done")
    ]
    assert [n for key, n in kit_shop.done if key == "a"] == [1, 2, 3]
    assert [n for key, n in kit_shop.done if key == "b"] == [1, 2]
    assert kit.order_violations("steps") == []
    assert kit.committed("steps") == {0: 5}
    assert len(result.ran) == 7
    # dramatiq's backoff comes from the actor's options (60 s doubling); run() returned within its
    # 10 s timeout, so nobody waited for it.
    backoffs = [r.backoff_ms for r in kit.ran("steps", key="a") if r.outcome == "retried"]
    assert all(b is not None and b >= 30_000 for b in backoffs), backoffs


def test_a_record_that_keeps_failing_is_dead_lettered_with_its_reason_error_and_original_bytes(
    kit: KafkaTestKit,
) -> None:
    kit.feed("steps", b'{"n": 7, "fail": 9}', key="k", headers=[("trace", b"t-1"), ("trace", "t-2")], partition=1)
    kit.feed("steps", {"n": 8}, key="k", partition=1)
    result = kit.run(fail_fast=False)
    assert [(r.offset, r.attempt, r.outcome) for r in kit.ran("steps")] == [
        (0, 1, "retried"), (0, 2, "retried"), (0, 3, "failed"), (1, 1, "done")
    ]
    (letter,) = kit.dead_letters("steps")
    assert result.dead_letters == (letter,)
    assert (letter.dead_letter_topic, letter.topic, letter.partition, letter.offset) == ("steps.dlq", "steps", 1, 0)
    assert letter.reason == "final-failure"
    assert (letter.error_type, letter.error_message) == ("ValueError", "step 7 failed on attempt 3")
    assert letter.attempts == 3
    assert letter.handler == "step"
    assert (letter.key, letter.value) == (b"k", b'{"n": 7, "fail": 9}')
    assert letter.headers[:2] == (("trace", b"t-1"), ("trace", b"t-2")), "the record's own headers come first"
    assert kit_shop.done == [("k", 8)]
    assert kit.committed("steps") == {1: 2}


def test_fail_fast_raises_from_the_handlers_exception_once_everything_is_committed(kit: KafkaTestKit) -> None:
    kit.feed("steps", {"n": 1, "fail": 5}, key="a")
    with pytest.raises(DeadLettered, match=r"steps\[0\]@0 key='a': step failed on attempt 3") as caught:
        kit.run()
    assert isinstance(caught.value.__cause__, ValueError)
    assert kit.committed("steps") == {0: 1}


def test_an_undecodable_value_never_reaches_the_handler_and_is_dead_lettered_as_undecodable(
    kit: KafkaTestKit,
) -> None:
    kit.feed("steps", b"{not json", key="a")
    kit.feed("steps", {"n": 2}, key="a")
    kit.run(fail_fast=False)
    assert [r.offset for r in kit.ran("steps")] == [1]
    (letter,) = kit.dead_letters()
    assert (letter.offset, letter.reason, letter.error_type) == (0, "undecodable", "DecodeError")
    assert letter.value == b"{not json"
    assert kit.committed("steps") == {0: 2}


def test_a_record_over_the_size_limit_is_dead_lettered_as_too_large_before_any_worker_sees_it() -> None:
    kit_shop.reset()
    with KafkaTestKit(SHOP, max_message_bytes=1024) as kit:
        kit.feed("lines", "x" * 2000)
        kit.feed("lines", "small")
        kit.run(fail_fast=False)
        assert [letter.reason for letter in kit.dead_letters("lines")] == ["too-large"]
        assert [r.value for r in kit.processed("lines")] == ["small"]


def test_records_of_a_partition_run_in_offset_order_and_each_partition_commits_its_own_offset(
    kit: KafkaTestKit,
) -> None:
    for i in range(6):
        kit.feed("lines", f"p0-{i}", partition=0)
        kit.feed("lines", f"p1-{i}", partition=1, headers={"seq": str(i)})
    kit.run()
    assert [r.value for r in kit.processed("lines", partition=0)] == [f"p0-{i}" for i in range(6)]
    assert [r.header("seq") for r in kit.processed("lines", partition=1)] == [str(i).encode() for i in range(6)]
    assert kit.order_violations("lines") == []
    assert kit.committed("lines") == {0: 6, 1: 6}


def test_a_value_format_handler_gets_the_value_and_an_error_it_throws_is_not_retried(kit: KafkaTestKit) -> None:
    kit.feed("events", {"kind": "signup"})
    kit.feed("events", {"no": "kind"})
    kit.run(fail_fast=False)
    assert kit_shop.done == [("event", (0, "signup"))]
    # ordering="none": the two may run in either order.
    assert sorted((r.offset, r.attempt, r.outcome) for r in kit.ran("events")) == [(0, 1, "done"), (1, 1, "failed")]
    (letter,) = kit.dead_letters("events")
    assert (letter.dead_letter_topic, letter.error_type) == ("events-bad", "KeyError")


def test_messages_a_handler_sends_run_before_run_returns_and_their_failures_fail_fast(kit: KafkaTestKit) -> None:
    kit.feed("lines", "hello", headers={"notify": "yes"})
    kit.feed("lines", "unwelcome", headers={"notify": "yes"})
    with pytest.raises(DeadLettered, match=r"actor notify .* RuntimeError: no notification for that"):
        kit.run()
    assert kit_shop.notified == ["hello"]
    assert kit.dead_letters() == [], "not a Kafka record: nothing to dead-letter"


def test_a_run_that_times_out_names_the_record_still_running_and_those_waiting_behind_it(kit: KafkaTestKit) -> None:
    kit.feed("steps", {"n": 1, "block": True}, key="a")
    kit.feed("steps", {"n": 2}, key="a")
    try:
        with pytest.raises(NotFinished) as caught:
            kit.run(timeout=0.5)
    finally:
        kit_shop.release.set()
    text = str(caught.value)
    assert "steps[0]: committed 0 of 2" in text
    assert "@0 key b'a': " in text and "running for" in text
    assert "@1 key b'a': not started" in text
    kit.run()
    assert kit_shop.done == [("a", 1), ("a", 2)]


def test_the_module_keeps_its_middleware_and_gets_its_broker_back_after_the_kit() -> None:
    kit_shop.reset()
    before = dramatiq.broker.global_broker
    with KafkaTestKit(SHOP) as kit:
        assert kit_shop.line.broker is kit.broker
        assert kit_shop.notify.broker is kit.broker, "every actor of the module's broker moves"
        assert dramatiq.get_broker() is kit.broker
        kit.feed("lines", "one")
        kit.run()
    assert kit_shop.counting.seen == 1
    assert kit_shop.line.broker is kit_shop.broker
    assert dramatiq.broker.global_broker is before


def test_handlers_are_found_from_their_actors_even_after_the_registry_was_cleared() -> None:
    clear_registry()
    assert handler_of(kit_shop.notify) is None
    step = handler_of(kit_shop.step)
    assert step is not None and step.ordering == "key"
    with KafkaTestKit(SHOP) as kit:
        assert set(kit.handlers) == {"steps", "lines", "events"}
        assert kit.handlers["steps"] is step


def test_feeding_a_topic_without_a_handler_or_starting_a_second_kit_is_refused(kit: KafkaTestKit) -> None:
    with pytest.raises(KitError, match="no handler for topic 'orders'; the handlers' topics: events, lines, steps"):
        kit.feed("orders", b"{}")
    with pytest.raises(KitError, match="another KafkaTestKit is running"), KafkaTestKit(SHOP):
        pass


def test_a_module_without_handlers_or_a_misspelt_setting_is_refused_by_name() -> None:
    with pytest.raises(KitError, match="no @kafka_handler actor found in json or its submodules"), KafkaTestKit("json"):
        pass
    with pytest.raises(KitError, match="not a bridge setting: windw"):
        KafkaTestKit(SHOP, windw=5)


def _run(offset: int, key: bytes, started: float, finished: float) -> Run:
    record = Record("steps", 0, offset, key.decode(), {}, ())
    return Run(record, "step", 1, "done", None, None, started, finished, key)


def test_the_order_check_reports_runs_of_one_key_that_overlap_or_go_back_in_offsets() -> None:
    step, events = handler_of(kit_shop.step), handler_of(kit_shop.event)
    assert step is not None and events is not None
    in_order = [_run(0, b"a", 0.0, 1.0), _run(1, b"b", 0.5, 1.5), _run(2, b"a", 1.0, 2.0)]
    assert order_violations(step, in_order) == []
    overlapping = [_run(0, b"a", 0.0, 1.0), _run(2, b"a", 0.9, 2.0)]
    assert order_violations(step, overlapping) == [
        "Run(steps[0]@2 key='a' attempt 1: done) started while Run(steps[0]@0 key='a' attempt 1: done) was running"
    ]
    backwards = [_run(2, b"a", 0.0, 1.0), _run(0, b"a", 1.0, 2.0)]
    assert len(order_violations(step, backwards)) == 1
    assert order_violations(events, overlapping) == [], "ordering='none' promises nothing"


def test_feed_sends_bytes_as_they_are_text_as_utf8_none_as_null_and_the_rest_as_json() -> None:
    assert encode(b"\xff") == b"\xff"
    assert encode("é") == "é".encode()
    assert encode(None) is None
    assert encode({"a": [1, 2]}) == b'{"a": [1, 2]}'
    assert encode(7) == b"7"


def test_without_fakeredis_lua_support_the_import_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lupa", None)
    monkeypatch.delitem(sys.modules, "bridge.testing")
    with pytest.raises(ImportError, match=r"pip install 'kafka-dramatiq-bridge\[testing\]'"):
        importlib.import_module("bridge.testing")
