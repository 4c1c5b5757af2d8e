"""The handlers' actors on a ``StubBroker`` for the time of a test.

The handler module creates its broker (Redis, RabbitMQ) at import and its actors are bound to it.
The kit binds every actor of that broker to a :class:`KitBroker` instead, with the module's own
middleware (Retries with its options, TimeLimit, the team's own middleware), the ledger middleware
on an in-memory ledger, and an :class:`Observer` that records each run; on exit it binds them back.
Nothing connects to the module's broker meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import dramatiq
import dramatiq.broker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Middleware

from ..batch import RECORDS
from ..codecs import DecodeError
from ..protocol import OPTION
from ..record import Record, is_envelope, open_envelope, raw_parts
from ..registry import Handler, Registry
from ..worker import LedgerMiddleware, batches, install
from .results import History, Outcome, Run

logger = logging.getLogger("bridge.testing")

#: Middleware instances whose ``after_process_boot`` ran in this process: it starts threads
#: (TimeLimit's), which can start only once, and a worker process boots once too.
_booted: weakref.WeakSet[Middleware] = weakref.WeakSet()


class KitBroker(StubBroker):
    """A ``StubBroker`` that shortens delays (retry backoff, ``Retry(delay=...)``, a delayed
    ``send_with_options``) to at most ``max_delay_ms``, and remembers the delay each worker thread
    asked for last, so that a run can report the backoff dramatiq chose."""

    def __init__(self, middleware: list[Middleware], max_delay_ms: int) -> None:
        super().__init__(middleware)
        self.max_delay_ms = max_delay_ms
        self._asked = threading.local()

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        if delay is not None:
            self._asked.delay = delay
            delay = min(delay, self.max_delay_ms)
        return super().enqueue(message, delay=delay)

    def take_asked_delay(self) -> int | None:
        delay: int | None = getattr(self._asked, "delay", None)
        self._asked.delay = None
        return delay

    def idle(self) -> bool:
        """No message waits in any queue or delay queue, and none is being processed."""
        return all(queue.unfinished_tasks == 0 for queue in list(self.queues.values()))


@dataclass(frozen=True)
class _Call:
    """A batch handler's call going on in this thread."""

    records: tuple[Record, ...]
    raw_keys: list[bytes | None]
    attempt: int
    started: float
    running: batches.Running


class Observer(Middleware):
    """Records every run of a handler. Placed right after the ledger middleware: its
    ``before_process_message`` sees only records the ledger let start, and its
    ``after_process_message`` (dramatiq calls those in reverse order) runs after Retries decided
    and before the ledger lets the next record of the partition (key) start."""

    def __init__(self, history: History, handlers: Registry, max_json_depth: int) -> None:
        self._history = history
        self._handlers = handlers
        self._depth = max_json_depth
        self._local = threading.local()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self._local.run = None
        handler = self._handlers.for_actor(message.actor_name)
        if handler is None or OPTION not in message.options or not is_envelope(message.args, message.kwargs):
            return
        if handler.batch is not None:
            self._begin_batch(message)
            return
        env = message.args[0]
        try:
            record = open_envelope(env, handler.key_codec, handler.value_codec, self._depth)
        except DecodeError:
            return  # failed by the ledger middleware already; it never reaches the actor
        attempt = int(message.options.get("retries", 0) or 0) + 1
        started = self._history.started(f"{record.topic}[{record.partition}]@{record.offset}")
        self._local.run = (record, raw_parts(env)[0], attempt, started)

    def _begin_batch(self, message: Any) -> None:
        """A batch the ledger middleware let start: the records that reach the actor."""
        running = batches.current()
        if running is None or running.message_id != message.message_id:
            return
        raw = {(int(e["p"]), int(e["o"])): raw_parts(e)[0] for e in message.args[0][RECORDS]}
        records = tuple(running.records)
        attempt = int(message.options.get("retries", 0) or 0) + 1
        started = self._history.started(f"{records[0].topic}[{records[0].partition}]@{records[0].offset}")
        self._local.run = _Call(records, [raw.get((r.partition, r.offset)) for r in records], attempt, started,
                                running)

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        finished = time.monotonic()
        begun, self._local.run = getattr(self._local, "run", None), None
        asked = broker.take_asked_delay() if isinstance(broker, KitBroker) else None
        if begun is None:
            if exception is not None and message.failed:
                self._history.failed(message.actor_name, exception)
            return
        if isinstance(begun, _Call):
            self._end_batch(message, begun, exception, asked, finished)
            return
        record, raw_key, attempt, started = begun
        outcome, backoff = _outcome(message, exception, asked)
        self._history.add(Run(record, message.actor_name, attempt, outcome, exception, backoff, started, finished,
                              raw_key))

    def _end_batch(self, message: Any, call: _Call, exception: BaseException | None, asked: int | None,
                   finished: float) -> None:
        running = call.running
        # BatchFailed fails only the records it names, each with its own error.
        named = running.named if exception is not None and exception is running.partial else None
        for record, raw_key in zip(call.records, call.raw_keys, strict=True):
            error = exception
            if named is not None:
                own = named.get((record.partition, record.offset))
                error = None if own is None else own if isinstance(own, BaseException) else exception
            outcome, backoff = _outcome(message, error, asked)
            self._history.add(Run(record, message.actor_name, call.attempt, outcome, error, backoff, call.started,
                                  finished, raw_key, call.records))

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if getattr(self._local, "run", None) is not None:
            self._local.run = None
            self._history.stopped()


def _outcome(message: Any, error: BaseException | None, asked: int | None) -> tuple[Outcome, int | None]:
    if error is None:
        return "done", None
    if message.failed:
        return "failed", None
    return "retried", asked


@dataclass
class Swap:
    """Actors bound to the kit's broker, and what to restore."""

    broker: KitBroker
    bindings: list[tuple[dramatiq.Actor[Any, Any], dramatiq.Broker]]
    previous_global: dramatiq.Broker | None

    def restore(self) -> None:
        for actor, original in self.bindings:
            actor.broker = original
        dramatiq.broker.global_broker = self.previous_global
        self.broker.flush_all()


def _kept(brokers: Iterable[dramatiq.Broker]) -> list[Middleware]:
    """The module's middleware, one of each type, without the ledger middleware (the kit brings
    its own) and Prometheus (it serves metrics on a fixed port)."""
    kept: list[Middleware] = []
    for broker in brokers:
        for middleware in broker.middleware:
            if isinstance(middleware, LedgerMiddleware) or type(middleware).__name__ == "Prometheus":
                continue
            if not any(type(m) is type(middleware) for m in kept):
                kept.append(middleware)
    return kept


def swap_in(handlers: Iterable[Handler], ledger: LedgerMiddleware, observer: Observer, max_delay_ms: int) -> Swap:
    """Bind every actor of the handlers' brokers to a new :class:`KitBroker` and make it the global
    broker."""
    originals: list[dramatiq.Broker] = []
    for handler in handlers:
        if not any(handler.actor.broker is b for b in originals):
            originals.append(handler.actor.broker)
    kept = _kept(originals)
    broker = KitBroker(kept, max_delay_ms)
    install(broker, ledger)
    broker.add_middleware(observer, after=LedgerMiddleware)
    for middleware in kept:
        if middleware not in _booted:
            _booted.add(middleware)
            try:
                middleware.after_process_boot(broker)
            except RuntimeError as e:  # booted by the test suite already (a thread starts only once)
                logger.debug("%r was booted already: %s", middleware, e)
    bindings: list[tuple[dramatiq.Actor[Any, Any], dramatiq.Broker]] = []
    for original in originals:
        for actor in list(original.actors.values()):
            bindings.append((actor, original))
            actor.broker = broker
            broker.declare_actor(actor)
    swap = Swap(broker, bindings, dramatiq.broker.global_broker)
    dramatiq.set_broker(broker)
    return swap
