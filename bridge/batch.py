"""Batch handlers: what a batch message carries, and how a handler reports partial failure.

A batch handler's actor takes ``list[Record]``; one dramatiq message carries the records of one
batch (by default a contiguous run of one partition's delivered records). The message's single
argument is a batch envelope, ``{"kdb": 1, "b": [record envelope, ...]}``, in offset order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .record import ENVELOPE_MARK, ENVELOPE_VERSION
from .registry import BatchBy, BatchOptions

__all__ = ["BatchBy", "BatchFailed", "BatchOptions", "batch_envelope", "is_batch_envelope"]

#: The batch envelope's list of record envelopes.
RECORDS = "b"


class BatchFailed(Exception):
    """Raised by a batch handler when some of its records failed and the rest succeeded.

    ``failed`` maps the offset of each failed record (or the :class:`~bridge.Record` itself) to
    its error: an exception or a message. Records not named succeeded. dramatiq's retry policy
    applies to the failed records only: a retry carries just them, and after the final attempt
    each goes to the dead-letter topic with its own error. Naming a record that is not in the
    batch raises ``ValueError`` in the worker (the whole batch then counts as failed).
    """

    def __init__(self, failed: Mapping[Any, BaseException | str]) -> None:
        offsets: dict[int, BaseException | str] = {}
        for record, error in failed.items():
            offset = getattr(record, "offset", record)
            if not isinstance(offset, int) or isinstance(offset, bool):
                raise TypeError(f"BatchFailed: {record!r} is neither a Record nor an offset")
            offsets[offset] = error
        if not offsets:
            raise ValueError("BatchFailed names no failed record; return normally when all succeeded")
        self.failed = offsets
        named = ", ".join(str(o) for o in sorted(offsets)[:10])
        more = f" and {len(offsets) - 10} more" if len(offsets) > 10 else ""
        super().__init__(f"{len(offsets)} record(s) of the batch failed: offsets {named}{more}")

    def detail(self, offset: int) -> dict[str, str]:
        """The error of the record at ``offset``, as the ledger stores it."""
        error = self.failed[offset]
        if isinstance(error, BaseException):
            return {"type": type(error).__name__, "message": str(error)[:2000]}
        return {"type": "BatchFailed", "message": str(error)[:2000]}


def batch_envelope(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The single argument of a batch message: the record envelopes, in offset order."""
    return {ENVELOPE_MARK: ENVELOPE_VERSION, RECORDS: list(records)}


def is_batch_envelope(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    return (
        not kwargs
        and len(args) == 1
        and isinstance(args[0], dict)
        and ENVELOPE_MARK in args[0]
        and isinstance(args[0].get(RECORDS), list)
    )
