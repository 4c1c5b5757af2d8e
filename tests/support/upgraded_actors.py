"""The test handlers as the workers of a later release run them: they know the next protocol version."""

from __future__ import annotations

from bridge import protocol

NEXT_VERSION = max(protocol.KNOWN_VERSIONS) + 1
protocol.KNOWN_VERSIONS = protocol.KNOWN_VERSIONS | {NEXT_VERSION}

from tests.support.bridge_actors import record_event  # noqa: E402

__all__ = ["record_event"]
