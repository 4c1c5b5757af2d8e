"""The test handlers as the workers of a later release run them: they know protocol version 3."""

from __future__ import annotations

from bridge import protocol

protocol.KNOWN_VERSIONS = protocol.KNOWN_VERSIONS | {3}

from tests.support.bridge_actors import record_event  # noqa: E402

__all__ = ["record_event"]
