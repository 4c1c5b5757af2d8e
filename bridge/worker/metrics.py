"""The worker's own metric: ledger calls that failed, exported by dramatiq's Prometheus middleware."""

from __future__ import annotations

import threading
from typing import Any

_counter: Any = None
_lock = threading.Lock()

OPERATIONS = ("start", "finish", "heartbeat")


def export_failures() -> Any:
    """The ledger failure counter, created on first use (after process boot, when dramatiq's
    Prometheus middleware has switched prometheus-client to multiprocess mode), with every label
    at 0; None without prometheus-client."""
    global _counter
    with _lock:
        if _counter is None:
            try:
                from prometheus_client import Counter
            except ImportError:  # pragma: no cover - a dependency; kept optional for slim fleets
                return None
            _counter = Counter(
                "kafka_dramatiq_bridge_worker_ledger_write_failures",
                "Ledger calls of a worker that failed: start (the message is retried), finish (the bridge "
                "dispatches the record again after BRIDGE_REDISPATCH_TIMEOUT), heartbeat.",
                ["operation"],
            )
            for operation in OPERATIONS:
                _counter.labels(operation)
        return _counter


def count_failure(operation: str) -> None:
    counter = export_failures()
    if counter is not None:
        counter.labels(operation).inc()
