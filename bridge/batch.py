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

    ``failed`` maps each failed :class:`~bridge.Record` (or its offset) to its error: an exception
    or a message. Records not named succeeded. dramatiq's retry policy applies to the failed
    records only: a retry carries just them, and after the final attempt each goes to the
    dead-letter topic with its own error. In a batch of several partitions (``batch_by="topic"``)
    an offset that two of its partitions share names neither: name the record. Naming a record
    that is not in the batch raises ``ValueError`` in the worker (the whole batch then counts as
    failed).
    """

    def __init__(self, failed: Mapping[Any, BaseException | str]) -> None:
        #: (partition, or None when only the offset was given; offset; error)
        self._named: list[tuple[int | None, int, BaseException | str]] = []
        for record, error in failed.items():
            offset = getattr(record, "offset", record)
            if not isinstance(offset, int) or isinstance(offset, bool):
                raise TypeError(f"BatchFailed: {record!r} is neither a Record nor an offset")
            partition = getattr(record, "partition", None)
            self._named.append((partition if isinstance(partition, int) else None, offset, error))
        if not self._named:
            raise ValueError("BatchFailed names no failed record; return normally when all succeeded")
        #: offset -> error of each record named.
        self.failed: dict[int, BaseException | str] = {offset: error for _, offset, error in self._named}
        offsets = sorted(self.failed)
        named = ", ".join(str(o) for o in offsets[:10])
        more = f" and {len(offsets) - 10} more" if len(offsets) > 10 else ""
        super().__init__(f"{len(self._named)} record(s) of the batch failed: offsets {named}{more}")

    def resolve(self, records: Sequence[Any]) -> dict[tuple[int, int], BaseException | str]:
        """The records named, as (partition, offset), among the batch's ``records``.

        Raises:
          ValueError: a named record is not in the batch, or an offset names records of two
            partitions.
        """
        by_offset: dict[int, list[int]] = {}
        for record in records:
            by_offset.setdefault(record.offset, []).append(record.partition)
        found: dict[tuple[int, int], BaseException | str] = {}
        unknown: list[str] = []
        for partition, offset, error in self._named:
            partitions = by_offset.get(offset, [])
            if partition is not None:
                partitions = [p for p in partitions if p == partition]
            if not partitions:
                unknown.append(str(offset) if partition is None else f"{partition}@{offset}")
            elif len(partitions) > 1:
                raise ValueError(f"BatchFailed names offset {offset}, which partitions {sorted(partitions)} share; "
                                 "name the Record instead")
            else:
                found[(partitions[0], offset)] = error
        if unknown:
            raise ValueError(f"BatchFailed names offsets {sorted(unknown)[:10]} that are not in the batch")
        return found

    def detail(self, offset: int) -> dict[str, str]:
        """The error of the record at ``offset``, as the ledger stores it."""
        return self.describe(self.failed[offset])

    @staticmethod
    def describe(error: BaseException | str) -> dict[str, str]:
        """A record's error as the ledger stores it."""
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
