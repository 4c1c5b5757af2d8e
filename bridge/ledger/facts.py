"""What the ledger's calls answer: plain values, shared by the bridge and the workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

StartResult = Literal["run", "fenced", "done", "superseded", "wait", "duplicate"]

START_CODES: dict[int, StartResult] = {
    0: "fenced",
    1: "run",
    2: "done",
    3: "superseded",
    4: "wait",
    5: "duplicate",
}


@dataclass(frozen=True, slots=True)
class Progress:
    """What the ledger knows about a span of offsets of one partition."""

    done: list[int]
    failed: dict[int, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Stuck:
    """A record given up because its workers kept dying while running it: the failure detail the
    ledger recorded, and the record staged behind it (to put on its lane now), if any."""

    detail: dict[str, Any]
    successor: int | None


@dataclass(frozen=True, slots=True)
class Stale:
    """The answer about records that showed no progress: done or failed meanwhile, given up as
    stuck, or to be dispatched again under the attempt number given."""

    progress: Progress
    again: dict[int, int]
    stuck: dict[int, Stuck] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Handover:
    """What a new owner reads before it dispatches."""

    #: Offsets of older epochs whose copies are running now.
    running: list[int]
    done: set[int]
    failed: dict[int, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Finished:
    """The answer to a finish: the start verdict of the next record, if one was tried.

    ``parked`` is the verdict of the successor parked in the finishing process; ``staged`` and
    ``body`` are the record the bridge had staged behind the finished one (its encoded message),
    started unless ``staged`` says otherwise; ``retries`` is the retry count the started record
    continues with.
    """

    parked: StartResult | None = None
    staged: StartResult | None = None
    body: bytes | None = None
    retries: int = 0


@dataclass(frozen=True, slots=True)
class Try:
    """One copy of a record as the scripts identify it."""

    offset: int
    epoch: int
    attempt: int
    retries: int
    token: str


@dataclass(slots=True)
class Beats:
    """Signs of life of one worker process for one partition."""

    #: (offset, token, registration JSON) of each copy running.
    running: list[tuple[int, str, str]] = field(default_factory=list)
    #: Offsets of records parked.
    parked: list[int] = field(default_factory=list)




@dataclass(frozen=True, slots=True)
class End:
    """The end of one try, as a worker reports it: ``done``, ``failed`` (final, with its detail) or
    ``retry`` (dramatiq holds the next try for ``delay_ms``)."""

    copy: Try
    outcome: Literal["done", "failed", "retry"]
    detail: dict[str, Any] = field(default_factory=dict)
    delay_ms: int = 0
