"""Arguments and replies of the scripts that take many records of one partition in one call."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from ..keys import PartitionKeys
from ..protocol import failure_json
from .facts import End, Try

#: Records per call: Lua unpacks a script's arguments on a bounded stack.
CHUNK = 500


def pairs(flat: Sequence[Any]) -> dict[int, dict[str, Any]]:
    """A flat reply of offsets and JSON details, as a dict."""
    return {int(flat[i]): json.loads(flat[i + 1]) for i in range(0, len(flat), 2)}


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
