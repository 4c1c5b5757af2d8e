"""Arguments and replies of the scripts that take many records of one partition in one call."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..keys import PartitionKeys
from ..protocol import failure_json
from .facts import End, Progress, Stale, Stuck, Try

#: Records per call: Lua unpacks a script's arguments on a bounded stack.
CHUNK = 500


def pairs(flat: Sequence[Any]) -> dict[int, dict[str, Any]]:
    """A flat reply of offsets and JSON details, as a dict."""
    return {int(flat[i]): json.loads(flat[i + 1]) for i in range(0, len(flat), 2)}


def stale_args(
    keys: PartitionKeys, offsets: Sequence[int], timeout: float, limit: int | None, epoch: int, live: float
) -> list[Any]:
    """``stale.lua``'s arguments for one partition."""
    return [int(timeout * 1000), -1 if limit is None else limit, epoch, keys.finished_channel, int(live * 1000),
            *offsets]


def stale_answer(reply: Sequence[Any]) -> Stale:
    """``stale.lua``'s reply: done offsets, (offset, detail) pairs, (offset, attempt) pairs and
    (offset, detail, successor or -1) triples."""
    done, failed, again, stuck = reply
    numbers = [int(v) for v in again]
    given_up = {
        int(stuck[i]): Stuck(json.loads(stuck[i + 1]), int(stuck[i + 2]) if int(stuck[i + 2]) >= 0 else None)
        for i in range(0, len(stuck), 3)
    }
    return Stale(Progress([int(o) for o in done], pairs(failed)), dict(zip(numbers[::2], numbers[1::2], strict=True)),
                 given_up)


def many_calls(
    keys: PartitionKeys, ends: Sequence[End], starts: Sequence[tuple[Try, str]], worker: str, live: float
) -> Iterator[tuple[list[Any], int]]:
    """``many.lua`` calls for one partition: the arguments of each and how many starts it asks."""
    for n in range(0, max(len(ends), len(starts)), CHUNK):
        some_ends, some_starts = ends[n : n + CHUNK], starts[n : n + CHUNK]
        args: list[Any] = [keys.finished_channel, worker, int(live * 1000), len(some_ends)]
        for end in some_ends:
            copy = end.copy
            detail = failure_json(copy.epoch, end.detail) if end.outcome == "failed" else ""
            args += [copy.offset, end.outcome, copy.epoch, copy.attempt, copy.retries, copy.token, detail,
                     end.delay_ms]
        for copy, by in some_starts:
            args += [copy.offset, copy.epoch, copy.attempt, copy.retries, copy.token, by]
        yield args, len(some_starts)


@dataclass(frozen=True, slots=True)
class BatchEnd:
    """The end of one try of a batch (``lua/batch.lua``): the copy registered under its first
    offset, the offsets that succeeded, the ones that failed for good with their details, and,
    when dramatiq retries the rest, the first offset of the retry and its delay."""

    copy: Try
    done: Sequence[int] = ()
    failed: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    next: int = -1
    delay_ms: int = 0


def batch_args(keys: PartitionKeys, end: BatchEnd, worker: str) -> list[Any]:
    copy = end.copy
    args: list[Any] = [copy.offset, copy.epoch, copy.attempt, copy.retries, copy.token, worker,
                       keys.finished_channel, end.next, end.delay_ms, len(end.done), len(end.failed), *end.done]
    for offset, detail in sorted(end.failed.items()):
        args += [offset, failure_json(copy.epoch, detail)]
    return args
