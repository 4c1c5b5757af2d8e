"""The handler registry and the partition lifecycle hooks."""

from __future__ import annotations

import pytest

from bridge.registry import Registry
from tests.unit.parts import T, handler


def test_a_topic_or_an_actor_registers_once() -> None:
    registry = Registry()
    first = handler()
    registry.add(first)
    assert registry.by_topic() == {T: first}
    assert registry.for_actor(first.name) is first
    with pytest.raises(ValueError, match="already a Kafka handler"):
        registry.add(first)
    with pytest.raises(ValueError, match=f"topic '{T}' already has a handler"):
        registry.add(handler(ordering="key"))


def test_hooks_run_in_order_and_a_failing_hook_does_not_stop_the_others() -> None:
    registry = Registry()
    calls: list[str] = []

    def broken(topic: str, partition: int, group: str) -> None:
        calls.append("broken")
        raise RuntimeError("boom")

    registry.add_hook("assigned", broken)
    registry.add_hook("assigned", lambda t, p, g: calls.append(f"{t}[{p}] {g}"))
    registry.run_hooks("assigned", T, 2, "g")
    registry.run_hooks("revoked", T, 2, "g")
    assert calls == ["broken", f"{T}[2] g"]
    registry.clear()
    assert registry.by_topic() == {}
