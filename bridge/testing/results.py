"""What the testing kit observed: the runs of the handlers, the dead letters, one ``run()``'s result.

A :class:`Run` is one call of a handler's actor for one record (for a batch handler: one record
of a call), as the worker saw it: the :class:`~bridge.Record` it got, which attempt, how it
ended. :class:`History` collects them from
dramatiq's worker threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ..deadletter import HEADER_PREFIX
from ..record import Record
from .kafka import Produced

Outcome = Literal["done", "retried", "failed"]


def _where(topic: str, partition: int, offset: int) -> str:
    return f"{topic}[{partition}]@{offset}"


@dataclass(frozen=True, repr=False)
class Run:
    """One call of a handler for one record.

    ``attempt`` counts from 1 (dramatiq's retries + 1). ``outcome``: ``done`` (the actor returned),
    ``retried`` (it raised and dramatiq retries it) or ``failed`` (it raised and dramatiq gave up:
    the record goes to the dead-letter topic). ``backoff_ms`` is the delay dramatiq chose before
    the next attempt, which the kit shortens (see ``max_delay_ms``). ``started`` and ``finished``
    are ``time.monotonic()`` readings. For a batch handler each record of a call has its run, and
    ``batch`` holds every record of that call (empty for other handlers): the runs of one call
    share it, their times and their attempt; with :class:`~bridge.BatchFailed` only the records
    it named fail or are retried, each with its own error.
    """

    record: Record
    actor: str
    attempt: int
    outcome: Outcome
    error: BaseException | None
    backoff_ms: int | None
    started: float
    finished: float
    raw_key: bytes | None
    batch: tuple[Record, ...] = ()

    @property
    def topic(self) -> str:
        return self.record.topic

    @property
    def partition(self) -> int:
        return self.record.partition

    @property
    def offset(self) -> int:
        return self.record.offset

    @property
    def where(self) -> str:
        return _where(self.topic, self.partition, self.offset)

    def __repr__(self) -> str:
        ended = self.outcome if self.error is None else f"{self.outcome} {self.error!r}"
        return f"Run({self.where} key={self.record.key!r} attempt {self.attempt}: {ended})"


@dataclass(frozen=True, repr=False)
class DeadLetter:
    """A record the bridge wrote to a dead-letter topic: the original key, value and headers,
    followed by the bridge's ``kdb.*`` headers, which the fields below read.

    ``reason``: ``final-failure`` (the handler failed for good), ``undecodable`` (the key or value
    did not decode with the handler's codec; the handler never ran) or ``too-large``.
    """

    dead_letter_topic: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp: int | None

    @classmethod
    def of(cls, produced: Produced) -> DeadLetter:
        ours = {name[len(HEADER_PREFIX):]: (value or b"").decode() for name, value in produced.headers
                if name.startswith(HEADER_PREFIX)}
        return cls(produced.topic, ours.get("topic", ""), int(ours.get("partition", -1)),
                   int(ours.get("offset", -1)), produced.key, produced.value, produced.headers, produced.timestamp)

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name`` (``kdb.reason``, or one of the record's own)."""
        for header_name, value in reversed(self.headers):
            if header_name == name:
                return value
        return None

    def _text(self, name: str) -> str | None:
        value = self.header(HEADER_PREFIX + name)
        return None if value is None else value.decode()

    @property
    def reason(self) -> str:
        return self._text("reason") or ""

    @property
    def error_type(self) -> str | None:
        return self._text("error.type")

    @property
    def error_message(self) -> str | None:
        return self._text("error.message")

    @property
    def attempts(self) -> int | None:
        text = self._text("attempts")
        return None if text is None else int(text)

    @property
    def handler(self) -> str | None:
        return self._text("handler")

    @property
    def where(self) -> str:
        return _where(self.topic, self.partition, self.offset)

    def __repr__(self) -> str:
        error = f" {self.error_type}: {self.error_message}" if self.error_type else ""
        attempts = f" after {self.attempts} attempt(s)" if self.attempts else ""
        return f"DeadLetter({self.where} -> {self.dead_letter_topic}: {self.reason}{attempts}{error})"


@dataclass(frozen=True)
class Result:
    """What one :meth:`KafkaTestKit.run` call saw: the runs that started during it (in start order),
    the dead letters written during it, and the committed offsets when it returned."""

    ran: tuple[Run, ...]
    dead_letters: tuple[DeadLetter, ...]
    committed: Mapping[tuple[str, int], int]
    seconds: float


@dataclass
class History:
    """Runs collected from the worker threads. Thread-safe."""

    runs: list[Run] = field(default_factory=list)
    #: Thread id -> (where, started) of the runs going on now.
    running: dict[int, tuple[str, float]] = field(default_factory=dict)
    #: Final failures of actors that are not Kafka handlers (sent by a handler, for instance).
    other_failures: list[tuple[str, BaseException]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def started(self, where: str) -> float:
        now = time.monotonic()
        with self._lock:
            self.running[threading.get_ident()] = (where, now)
        return now

    def stopped(self) -> None:
        with self._lock:
            self.running.pop(threading.get_ident(), None)

    def add(self, run: Run) -> None:
        with self._lock:
            self.runs.append(run)
            self.running.pop(threading.get_ident(), None)

    def failed(self, actor: str, error: BaseException) -> None:
        with self._lock:
            self.other_failures.append((actor, error))

    def snapshot(self) -> tuple[list[Run], dict[int, tuple[str, float]], list[tuple[str, BaseException]]]:
        with self._lock:
            runs = sorted(self.runs, key=lambda r: r.started)
            return runs, dict(self.running), list(self.other_failures)
