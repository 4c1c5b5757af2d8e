"""The test handlers in a worker process whose wall clock is off by ``KDB_TEST_CLOCK_OFFSET_S``
seconds (negative: behind), as on a host whose clock drifted. Everything in the process that reads
the wall clock from Python sees the offset; the monotonic clock and Redis's clock are untouched."""

from __future__ import annotations

import os
import time

_offset = float(os.environ["KDB_TEST_CLOCK_OFFSET_S"])
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + _offset
time.time_ns = lambda: _time_ns() + int(_offset * 1e9)

from tests.support.bridge_actors import record_event  # noqa: E402

__all__ = ["record_event"]
