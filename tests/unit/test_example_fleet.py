"""The example fleet in tasks/ (orders, payments, audit), tested with bridge.testing the way a team
would test the module it passes to ``kafka-dramatiq-bridge run``.

The handlers keep their results in Redis (tasks/store.py); here that client is a fakeredis, and the
task broker and the ack ledger are the kit's.
"""

from __future__ import annotations

import fakeredis
import pytest

import tasks.store
from bridge.testing import KafkaTestKit
from bridge.testing.plugin import StartKit

pytest_plugins = ["bridge.testing"]


@pytest.fixture
def remembered(monkeypatch: pytest.MonkeyPatch) -> fakeredis.FakeRedis:
    """What the handlers remember (tasks.store), oldest first through :func:`lines`."""
    fake = fakeredis.FakeRedis()
    monkeypatch.setattr(tasks.store, "_client", lambda: fake)
    return fake


@pytest.fixture
def kit(kafka_kit: StartKit) -> KafkaTestKit:
    return kafka_kit("tasks")


def lines(store: fakeredis.FakeRedis, kind: str) -> list[str]:
    return [line.decode() for line in reversed(store.lrange(f"tasks:{kind}", 0, -1))]


def order(number: int, *items: tuple[int, float]) -> dict[str, object]:
    return {"id": number, "items": [{"sku": f"sku-{i}", "qty": qty, "price": price} for i, (qty, price) in
                                    enumerate(items)]}


def test_orders_of_one_customer_are_totalled_one_at_a_time_in_offset_order(
    kit: KafkaTestKit, remembered: fakeredis.FakeRedis
) -> None:
    kit.feed("orders", order(1, (2, 2.5)), key="customer-1")
    kit.feed("orders", order(2, (1, 10.0)), key="customer-2")
    kit.feed("orders", order(3, (1, 1.25), (2, 0.5)), key="customer-1")
    kit.feed("orders", order(4, (3, 1.0)), key="customer-2", partition=1)
    kit.feed("orders", order(5, (1, 4.0)), key="customer-1")
    kit.run()
    assert [r.value["id"] for r in kit.processed("orders", key="customer-1")] == [1, 3, 5]
    assert kit.order_violations("orders") == []
    assert sorted(lines(remembered, "orders")) == [
        "orders[0]@0 customer=customer-1 order=1 total=5.00",
        "orders[0]@1 customer=customer-2 order=2 total=10.00",
        "orders[0]@2 customer=customer-1 order=3 total=2.25",
        "orders[0]@3 customer=customer-1 order=5 total=4.00",
        "orders[1]@0 customer=customer-2 order=4 total=3.00",
    ]
    assert kit.committed("orders") == {0: 4, 1: 1}


def test_an_order_without_items_is_retried_three_times_then_dead_lettered_while_the_customers_next_order_waits(
    kit: KafkaTestKit, remembered: fakeredis.FakeRedis
) -> None:
    kit.feed("orders", {"id": 1}, key="customer-1")
    kit.feed("orders", order(2, (1, 3.0)), key="customer-1")
    kit.run(fail_fast=False)
    assert [(r.offset, r.attempt, r.outcome) for r in kit.ran("orders")] == [
        (0, 1, "retried"), (0, 2, "retried"), (0, 3, "retried"), (0, 4, "failed"), (1, 1, "done")
    ]
    # The actor's own backoff (min_backoff=200, max_backoff=2000 ms), computed but not waited for.
    backoffs = [r.backoff_ms or 0 for r in kit.ran("orders") if r.outcome == "retried"]
    assert all(100 <= b <= 2000 for b in backoffs), backoffs
    (letter,) = kit.dead_letters("orders")
    assert (letter.dead_letter_topic, letter.reason, letter.attempts) == ("orders.dlq", "final-failure", 4)
    assert (letter.error_type, letter.error_message) == ("KeyError", "'items'")
    assert letter.key == b"customer-1" and letter.value == b'{"id": 1}'
    assert lines(remembered, "orders") == ["orders[0]@1 customer=customer-1 order=2 total=3.00"]
    assert kit.committed("orders") == {0: 2}


def test_payments_of_a_partition_settle_in_offset_order_whatever_their_account(
    kit: KafkaTestKit, remembered: fakeredis.FakeRedis
) -> None:
    for account, amount in [("acct-1", "10.00"), ("acct-2", "5.50"), ("acct-1", "3.25"), ("acct-3", "1.00")]:
        kit.feed("payments", f"{account}:{amount}", key=account)
    kit.feed("payments", "acct-9:99.00", key="acct-9", partition=2)
    kit.run()
    assert [r.offset for r in kit.processed("payments", partition=0)] == [0, 1, 2, 3]
    assert kit.order_violations("payments") == []
    assert [line for line in lines(remembered, "payments") if line.startswith("payments[0]")] == [
        "payments[0]@0 account=acct-1 amount=10.00",
        "payments[0]@1 account=acct-2 amount=5.50",
        "payments[0]@2 account=acct-1 amount=3.25",
        "payments[0]@3 account=acct-3 amount=1.00",
    ]
    assert "payments[2]@0 account=acct-9 amount=99.00" in lines(remembered, "payments")
    assert kit.committed("payments") == {0: 4, 2: 1}


def test_a_payment_that_is_not_utf8_is_dead_lettered_as_undecodable_and_the_next_one_settles(
    kit: KafkaTestKit, remembered: fakeredis.FakeRedis
) -> None:
    kit.feed("payments", b"acct-1:\xff\xfe", key="acct-1")
    kit.feed("payments", "acct-1:2.00", key="acct-1")
    kit.run(fail_fast=False)
    assert [r.offset for r in kit.ran("payments")] == [1], "the undecodable one never reached the actor"
    (letter,) = kit.dead_letters("payments")
    assert (letter.offset, letter.reason, letter.error_type) == (0, "undecodable", "DecodeError")
    assert letter.value == b"acct-1:\xff\xfe"
    assert lines(remembered, "payments") == ["payments[0]@1 account=acct-1 amount=2.00"]


def test_an_audit_event_reaches_the_existing_actor_as_a_plain_dict_with_its_record_at_hand(
    kit: KafkaTestKit, remembered: fakeredis.FakeRedis
) -> None:
    kit.feed("audit-events", {"actor": "user-1", "action": "login"}, key="user-1", partition=1)
    kit.feed("audit-events", {"actor": "user-2", "action": "edit"}, key="user-2", partition=1)
    kit.run()
    assert [r.record.value for r in kit.ran("audit-events")] in (
        [{"actor": "user-1", "action": "login"}, {"actor": "user-2", "action": "edit"}],
        [{"actor": "user-2", "action": "edit"}, {"actor": "user-1", "action": "login"}],
    ), "ordering='none': either order"
    assert sorted(lines(remembered, "audit")) == [
        "audit-events[1]@0 actor=user-1 action=login",
        "audit-events[1]@1 actor=user-2 action=edit",
    ]
    assert kit.committed("audit-events") == {1: 2}


def test_an_audit_event_sent_by_other_code_without_kafka_is_remembered_without_a_position(
    remembered: fakeredis.FakeRedis,
) -> None:
    import tasks.audit

    tasks.audit.record_audit_event({"actor": "cron", "action": "purge"})
    assert lines(remembered, "audit") == ["direct actor=cron action=purge"]
