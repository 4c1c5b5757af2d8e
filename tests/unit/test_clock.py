"""The loop's clock and interval timers."""

from __future__ import annotations

from bridge.clock import Every, ManualClock


def test_an_interval_timer_fires_at_once_then_once_per_interval() -> None:
    timer = Every(1.0)
    assert timer.due(10.0)
    assert not timer.due(10.5)
    assert timer.due(11.0)
    assert not timer.due(11.9)


def test_an_interval_of_zero_never_fires_and_a_reset_counts_from_then() -> None:
    assert not Every(0).due(10.0)
    timer = Every(5.0, first=float("inf"))
    assert not timer.due(100.0)
    timer.reset(100.0)
    assert not timer.due(104.0)
    assert timer.due(105.0)


def test_a_manual_clock_moves_only_when_told_and_sleeping_moves_it() -> None:
    clock = ManualClock(start=3.0)
    assert clock.monotonic() == 3.0
    clock.sleep(0.5)
    clock.advance(1.5)
    clock.advance(-4.0)
    assert clock.monotonic() == 5.0, "never backwards"
