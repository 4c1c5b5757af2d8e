"""What the testing kit says when a test goes wrong: records that did not finish in time, final
failures under ``fail_fast``, and runs that broke a handler's ordering guarantee."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..registry import Handler
from .kafka import FedMessage
from .results import DeadLetter, Run


class KitError(Exception):
    """The kit cannot do what it was asked (no handler for a topic, a kit already running, ...)."""

    __module__ = "bridge.testing"


class NotFinished(AssertionError):
    """``run()`` timed out before every fed record was committed."""

    __module__ = "bridge.testing"


class DeadLettered(AssertionError):
    """``run(fail_fast=True)``: a record failed for good (it went, or would go, to its dead-letter
    topic). Raised from the handler's own exception when there is one."""

    __module__ = "bridge.testing"


def _key(message: FedMessage) -> str:
    return repr(message.raw_key)


def not_finished(
    seconds: float,
    logs: Mapping[tuple[str, int], Sequence[FedMessage]],
    committed: Mapping[tuple[str, int], int],
    runs: Sequence[Run],
    running: Mapping[int, tuple[str, float]],
    idle: bool,
) -> str:
    """Which records are not done, what ran of them, and what runs now."""
    lines = [f"not every fed record was committed after {seconds:.1f}s:"]
    now = time.monotonic()
    busy = {where: now - since for where, since in running.values()}
    for tp, log in sorted(logs.items()):
        done = committed.get(tp, 0)
        if done >= len(log):
            continue
        lines.append(f"  {tp[0]}[{tp[1]}]: committed {max(done, 0)} of {len(log)}")
        for message in log[max(done, 0):][:10]:
            where = f"{tp[0]}[{tp[1]}]@{message.offset_number}"
            tries = [r for r in runs if r.where == where]
            parts = []
            if tries:
                last = tries[-1]
                error = f" ({type(last.error).__name__}: {last.error})" if last.error is not None else ""
                parts.append(f"ran {len(tries)} time(s), last {last.outcome}{error}")
                if last.outcome == "failed" and where not in busy:
                    parts.append("its offset waits for its dead letter")
            if where in busy:
                parts.append(f"running for {busy[where]:.1f}s now")
            text = f"    @{message.offset_number} key {_key(message)}: {', '.join(parts) or 'not started'}"
            lines.append(text)
        if len(log) - max(done, 0) > 10:
            lines.append(f"    ... and {len(log) - max(done, 0) - 10} more")
    if not idle and all(committed.get(tp, 0) >= len(log) for tp, log in logs.items()):
        lines.append("  every fed record is committed, but messages its handlers sent still wait in the broker")
    lines.append("  (a handler that does not return, retries that outlast the timeout, or records of the same "
                 "partition or key waiting behind one of those)")
    return "\n".join(lines)


def final_failures(runs: Sequence[Run], letters: Sequence[DeadLetter],
                   others: Sequence[tuple[str, BaseException]]) -> tuple[str, BaseException | None]:
    """The text of :class:`DeadLettered` and the exception to chain it to; empty text: none."""
    lines: list[str] = []
    cause: BaseException | None = None
    failed = {r.where: r for r in runs if r.outcome == "failed"}
    for run in failed.values():
        lines.append(f"  {run.where} key={run.record.key!r}: {run.actor} failed on attempt {run.attempt}: "
                     f"{type(run.error).__name__}: {run.error}")
        cause = cause or run.error
    for letter in letters:
        if letter.where not in failed:
            lines.append(f"  {letter.where}: {letter.reason}: {letter.error_type}: {letter.error_message}")
    for actor, error in others:
        lines.append(f"  actor {actor} (not a Kafka record) failed: {type(error).__name__}: {error}")
        cause = cause or error
    if not lines:
        return "", None
    head = (f"{len(lines)} record(s) or message(s) failed for good; pass fail_fast=False to run() when a test "
            "expects that:")
    return "\n".join([head, *lines]), cause


def order_violations(handler: Handler, runs: Sequence[Run]) -> list[str]:
    """Runs of one partition (``partition`` mode) or one key of a partition (``key`` mode) that
    overlapped in time or started out of offset order. ``none`` mode promises no order."""
    if handler.ordering == "none":
        return []
    groups: dict[tuple[Any, ...], list[Run]] = {}
    for run in sorted(runs, key=lambda r: r.started):
        group = (run.partition,) if handler.ordering == "partition" else (run.partition, run.raw_key)
        groups.setdefault(group, []).append(run)
    found = []
    for group_runs in groups.values():
        for before, after in itertools.pairwise(group_runs):
            if after.batch and after.batch is before.batch:
                continue  # records of one batch call
            if after.started < before.finished:
                found.append(f"{after!r} started while {before!r} was running")
            if after.offset < before.offset:
                found.append(f"{after!r} started after {before!r}, a later offset")
    return found
