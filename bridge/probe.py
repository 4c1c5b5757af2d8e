"""Test-only instrumentation: an event log of what the bridge did, and crash points.

Both are off unless their setting is given (``BRIDGE_EVENT_LOG``, ``BRIDGE_CRASH_AT``,
``BRIDGE_UNSAFE_COMMIT_AT_DISPATCH``); the bridge then holds no probe at all and pays one ``None``
check per call site. They exist so that the reliability suite can record a history and inject
faults at exact points; never turn them on in production.
"""

from __future__ import annotations

import json
import os
import time
from typing import IO, Any

#: Exit code of a process stopped at a crash point.
CRASH_EXIT_CODE = 86

CRASH_POINTS = ("after-enqueue", "after-done", "after-commit", "in-revoke")


class Probe:
    def __init__(self, event_log: str | None, crash_at: str | None) -> None:
        self._log: IO[str] | None = open(event_log, "a", buffering=1) if event_log else None  # noqa: SIM115
        self._crash_point: str | None = None
        self._crash_countdown = 0
        if crash_at:
            point, _, count = crash_at.partition(":")
            self._crash_point = point
            self._crash_countdown = int(count or "1")

    @classmethod
    def from_settings(cls, event_log: str | None, crash_at: str | None) -> Probe | None:
        return cls(event_log, crash_at) if event_log or crash_at else None

    def event(self, kind: str, **fields: Any) -> None:
        if self._log is not None:
            self._log.write(json.dumps({"ms": int(time.time() * 1000), "pid": os.getpid(), "ev": kind, **fields}))
            self._log.write("\n")

    def point(self, name: str) -> None:
        """Exit at once, without any cleanup, at the configured occurrence of ``name``."""
        if name != self._crash_point:
            return
        self._crash_countdown -= 1
        if self._crash_countdown <= 0:
            self.event("crash", point=name)
            os._exit(CRASH_EXIT_CODE)
