"""The ack ledger in Redis: done facts per offset, the records running, epochs, lanes."""

from .batches import BatchEnd
from .client import Ledger, LedgerError
from .connection import connect
from .facts import Beats, End, Finished, Handover, Progress, Stale, StartResult, Stuck, Try

__all__ = [
    "BatchEnd",
    "Beats",
    "End",
    "Finished",
    "Handover",
    "Ledger",
    "LedgerError",
    "Progress",
    "Stale",
    "StartResult",
    "Stuck",
    "Try",
    "connect",
]
