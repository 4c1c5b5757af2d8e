"""Liveness and readiness of the bridge process, judged from the view the main loop publishes."""

from __future__ import annotations

from dataclasses import dataclass

from .metrics import View


@dataclass(frozen=True, slots=True)
class Thresholds:
    #: Seconds without a poll of Kafka after which the bridge is not alive.
    stall_timeout: float
    #: Seconds the oldest unfinished record may be in flight before the bridge is not alive (0: off).
    max_record_age: float
    #: Seconds of a ledger / task broker outage after which the bridge is not ready.
    outage_timeout: float


def liveness(view: View, now: float, limits: Thresholds) -> str | None:
    """None when alive, else why not. A restart is the cure for what this reports."""
    if view.last_poll is None:
        return None  # still starting: connecting and joining are covered by readiness
    stalled = now - view.last_poll
    if stalled > limits.stall_timeout:
        return (
            f"the main loop has not polled Kafka for {stalled:.0f}s "
            f"(BRIDGE_HEALTH_STALL_TIMEOUT={limits.stall_timeout:g})"
        )
    if limits.max_record_age > 0:
        oldest = view.oldest_unfinished_age()
        if oldest is not None and oldest > limits.max_record_age:
            return (
                f"the oldest unfinished record was dispatched {oldest:.0f}s ago "
                f"(BRIDGE_HEALTH_MAX_RECORD_AGE={limits.max_record_age:g})"
            )
    return None


def readiness(view: View, now: float, limits: Thresholds) -> str | None:
    """None when ready, else why not."""
    if not view.joined:
        return "not yet a member of the consumer group"
    if view.outage_since is not None:
        down = now - view.outage_since
        if down > limits.outage_timeout:
            return (
                f"the ledger or task broker has not answered for {down:.0f}s "
                f"(BRIDGE_HEALTH_OUTAGE_TIMEOUT={limits.outage_timeout:g})"
            )
    return liveness(view, now, limits)
