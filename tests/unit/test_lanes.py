"""BRIDGE_LANES: which dramatiq queue carries a partition's records."""

from __future__ import annotations

import fakeredis
import pytest
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker

from bridge.errors import ConfigurationError
from bridge.keys import lane_name, topic_lane_name
from bridge.lanes import check, lane_of, layout
from bridge.registry import Ordering
from tests.unit.parts import GROUP, T, handler


def redis_broker() -> RedisBroker:
    return RedisBroker(client=fakeredis.FakeRedis())


@pytest.mark.parametrize("ordering", ["partition", "key", "none"])
def test_auto_shares_one_queue_per_topic_on_the_redis_broker_in_every_mode(ordering: Ordering) -> None:
    h = handler(redis_broker(), ordering)
    assert layout("auto", h) == "topic"
    assert {lane_of(GROUP, "auto", h, T, p) for p in range(8)} == {topic_lane_name(GROUP, T)}


def test_auto_keeps_a_queue_per_partition_for_ordered_handlers_on_other_brokers() -> None:
    ordered, unordered = handler(StubBroker(), "partition"), handler(StubBroker(), "none")
    assert [lane_of(GROUP, "auto", ordered, T, p) for p in range(2)] == [lane_name(GROUP, T, 0), lane_name(GROUP, T, 1)]
    assert lane_of(GROUP, "auto", unordered, T, 1) == topic_lane_name(GROUP, T)


def test_partition_gives_every_partition_its_own_queue_on_any_broker() -> None:
    h = handler(redis_broker(), "none")
    assert lane_of(GROUP, "partition", h, T, 3) == lane_name(GROUP, T, 3) == f"kdb.{GROUP}.{T}.3"


def test_topic_is_refused_for_an_ordered_handler_whose_broker_cannot_share_a_queue() -> None:
    check("topic", [handler(redis_broker(), "partition"), handler(StubBroker(), "none")])
    check("auto", [handler(StubBroker(), "key")])
    with pytest.raises(ConfigurationError, match=r"BRIDGE_LANES=topic: handler handle_key \(key ordering\) runs on "
                                                 r"StubBroker"):
        check("topic", [handler(StubBroker(), "key")])


def test_a_topic_queue_is_never_the_queue_of_a_partition_of_another_topic() -> None:
    # Topic names may hold dots and digits: "orders.1" must not meet partition 1 of "orders".
    assert topic_lane_name(GROUP, "orders.1") != lane_name(GROUP, "orders", 1)
    assert topic_lane_name(GROUP, "orders") not in {lane_name(GROUP, "orders", p) for p in range(100)}
    assert topic_lane_name(GROUP, "a.all") != topic_lane_name(GROUP, "a")
