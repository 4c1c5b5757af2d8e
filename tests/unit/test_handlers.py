"""@kafka_handler: registration, validation errors naming the option, the actor stays usable."""

from __future__ import annotations

from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from bridge import HandlerError, Record, kafka_handler
from bridge.record import envelope
from bridge.registry import handlers_by_topic


def test_the_decorated_actor_is_returned_unchanged_and_still_callable(stub_broker: StubBroker) -> None:
    @dramatiq.actor
    def plain(x: int) -> int:
        return x * 2

    registered = kafka_handler(["a", "b"], ordering="key")(plain)
    assert registered is plain
    assert plain(21) == 42
    plain.send(1)
    assert stub_broker.queues["default"].qsize() == 1
    assert set(handlers_by_topic()) == {"a", "b"}
    assert handlers_by_topic()["a"].ordering == "key"


def test_a_bridge_envelope_is_decoded_when_the_actor_is_called_directly(stub_broker: StubBroker) -> None:
    seen: list[Any] = []

    @kafka_handler("t", key_codec="text", value_codec="json")
    @dramatiq.actor
    def handle(record: Record) -> None:
        seen.append(record)

    handle(envelope("t", 1, 2, b"k", b'{"x": 1}', None, None))
    assert seen == [Record("t", 1, 2, "k", {"x": 1}, (), None)]


def test_a_second_handler_for_the_same_topic_is_an_error(stub_broker: StubBroker) -> None:
    @kafka_handler("orders")
    @dramatiq.actor
    def first(record: Record) -> None: ...

    with pytest.raises(HandlerError, match="'orders' already has a handler"):

        @kafka_handler(["other", "orders"])
        @dramatiq.actor
        def second(record: Record) -> None: ...

    assert set(handlers_by_topic()) == {"orders"}


def test_decorating_a_plain_function_explains_the_decorator_order(stub_broker: StubBroker) -> None:
    with pytest.raises(HandlerError, match=r"above @dramatiq\.actor"):
        kafka_handler("t")(lambda record: None)  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"ordering": "global"}, "ordering"),
        ({"message_format": "raw"}, "message_format"),
        ({"value_codec": "pickle"}, "value_codec"),
        ({"key_codec": "avro"}, "key_codec"),
        ({"offset_reset": "none"}, "offset_reset"),
        ({"window": 0}, "window"),
        ({"max_redispatches": -1}, "handle.*max_redispatches=-1"),
        ({"max_redispatches": 2.5}, "max_redispatches"),
        ({"max_redispatches": True}, "max_redispatches"),
    ],
)
def test_an_invalid_option_is_an_error_naming_it(stub_broker: StubBroker, options: dict[str, Any], named: str) -> None:
    with pytest.raises(HandlerError, match=named):

        @kafka_handler("t", **options)
        @dramatiq.actor
        def handle(record: Record) -> None: ...


def test_max_redispatches_defaults_to_three_and_none_never_gives_up(stub_broker: StubBroker) -> None:
    @kafka_handler("a")
    @dramatiq.actor
    def first(record: Record) -> None: ...

    @kafka_handler("b", max_redispatches=None)
    @dramatiq.actor
    def second(record: Record) -> None: ...

    found = handlers_by_topic()
    assert (found["a"].max_redispatches, found["b"].max_redispatches) == (3, None)


@pytest.mark.parametrize("topics", [[], ["bad topic"], ["a", "a"], [".."]])
def test_invalid_topic_lists_are_errors(stub_broker: StubBroker, topics: list[str]) -> None:
    with pytest.raises(HandlerError, match="topics"):

        @kafka_handler(topics)
        @dramatiq.actor
        def handle(record: Record) -> None: ...
