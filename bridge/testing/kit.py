"""The testing kit: a handler module's records run through the real bridge, in one process.

:class:`KafkaTestKit` imports the module as ``kafka-dramatiq-bridge run`` and ``dramatiq`` would,
binds its actors to a ``StubBroker`` (:mod:`.broker`), starts a ``dramatiq.Worker`` on it with the
ledger middleware on fakeredis, and drives the bridge's own loop (:class:`bridge.bridge.Bridge`)
over a scripted consumer (:mod:`.kafka`). The test feeds records and calls :meth:`run`; the loop
dispatches them on their lanes, the worker runs the actors, dramatiq retries them, the bridge
writes dead letters and commits.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType, TracebackType
from typing import Any

import dramatiq
import fakeredis

from ..bridge import Bridge
from ..deadletter import DeadLetters
from ..handlers import handler_of
from ..ledger import Ledger
from ..record import Record
from ..registry import Handler, Registry
from ..settings import Settings, load_settings
from ..worker import LedgerMiddleware
from .broker import KitBroker, Observer, Swap, swap_in
from .kafka import MemoryProducer, ScriptedConsumer
from .report import DeadLettered, KitError, NotFinished, final_failures, not_finished, order_violations
from .results import DeadLetter, History, Result, Run

logger = logging.getLogger("bridge.testing")

#: Settings the kit gives the bridge unless the test passes its own: commits and rechecks often,
#: stops fast, talks to no Kafka admin API.
DEFAULTS: dict[str, Any] = {
    "group_id": "kit",
    "commit_interval": 0.01,
    "progress_interval": 0,
    "create_dead_letter_topics": False,
    "shutdown_timeout": 2.0,
    "drain_timeout": 2.0,
    "park_recheck_interval": 0.05,
    "lane_refresh_interval": 0.1,
    "http_port": 0,
}

_active = threading.Lock()
_UNSET: Any = object()

Value = Any
HeaderValue = bytes | str | None


def encode(value: Value) -> bytes | None:
    """Bytes as they are, ``str`` as UTF-8, ``None`` as a null (a tombstone), anything else as JSON."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()


def _headers(headers: Mapping[str, HeaderValue] | Iterable[tuple[str, HeaderValue]] | None,
             ) -> list[tuple[str, bytes | None]] | None:
    if headers is None:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return [(name, value.encode() if isinstance(value, str) else value) for name, value in pairs]


def find_handlers(modules: Sequence[str | ModuleType]) -> dict[str, Handler]:
    """Import ``modules`` and return topic -> handler of every ``@kafka_handler`` actor defined in
    them or their submodules, or imported into them."""
    found: dict[str, Handler] = {}
    names = []
    for module in modules:
        name = module if isinstance(module, str) else module.__name__
        importlib.import_module(name)
        names.append(name)
    for loaded, module_object in list(sys.modules.items()):
        if module_object is None or not any(loaded == n or loaded.startswith(n + ".") for n in names):
            continue
        for value in list(vars(module_object).values()):
            handler = handler_of(value) if isinstance(value, dramatiq.Actor) else None
            if handler is None:
                continue
            for topic in handler.topics:
                if topic in found and found[topic] is not handler:
                    raise KitError(f"topic {topic!r} has two handlers: {found[topic].name!r} and {handler.name!r}")
                found[topic] = handler
    if not found:
        raise KitError(f"no @kafka_handler actor found in {', '.join(names)} or its submodules")
    return found


class KafkaTestKit:
    """Run a handler module's records through the real bridge and a real dramatiq worker, in memory.

    ``modules``: what you pass to ``kafka-dramatiq-bridge run``. ``timeout``: how long :meth:`run`
    waits by default. ``max_delay_ms``: the longest delay a retry (or any delayed message) waits on
    the test broker; dramatiq's backoff is still computed and shows in :attr:`Run.backoff_ms`.
    ``worker_threads``: the dramatiq worker's threads. Other keyword arguments are bridge settings
    (``window=5``, ``lane_depth=1``, ``max_message_bytes=2048``, ...).

    Use it as a context manager, or through the ``kafka_kit`` pytest fixture.
    """

    def __init__(
        self,
        *modules: str | ModuleType,
        timeout: float = 10.0,
        max_delay_ms: int = 0,
        worker_threads: int = 4,
        **settings: Any,
    ) -> None:
        if not modules:
            raise KitError("name the handler module(s), as for kafka-dramatiq-bridge run")
        self.modules = modules
        self.timeout = timeout
        self.max_delay_ms = max_delay_ms
        self.worker_threads = worker_threads
        unknown = sorted(set(settings) - set(Settings.model_fields))
        if unknown:
            raise KitError(f"not a bridge setting: {', '.join(unknown)} (see docs/configuration.md)")
        self.settings: Settings = load_settings(**{**DEFAULTS, **settings})
        self.handlers: dict[str, Handler] = {}
        self._history = History()
        self._producers: list[MemoryProducer] = []
        self._consumer: ScriptedConsumer | None = None
        self._bridge: Bridge | None = None
        self._swap: Swap | None = None
        self._worker: dramatiq.Worker | None = None
        self._entered = False
        self._bridge_stopped = False

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> KafkaTestKit:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close(quiet=error is not None)

    def start(self) -> None:
        """Import the modules, swap the broker, start the worker and join the (scripted) group."""
        if not _active.acquire(blocking=False):
            raise KitError("another KafkaTestKit is running in this process; close it first")
        self._entered = True
        try:
            self.handlers = find_handlers(self.modules)
            registry = Registry()
            for handler in {id(h): h for h in self.handlers.values()}.values():
                registry.add(handler)
            server = fakeredis.FakeServer()
            ledger = LedgerMiddleware(self.settings, ledger=_ledger(server), handlers=registry)
            observer = Observer(self._history, registry, self.settings.max_json_depth)
            self._swap = swap_in(self.handlers.values(), ledger, observer, self.max_delay_ms)
            self._worker = dramatiq.Worker(self._swap.broker, worker_threads=self.worker_threads, worker_timeout=20)
            self._worker.start()
            self._consumer = ScriptedConsumer(frozenset(self.handlers))
            dead_letters = DeadLetters(self.settings, producer_factory=self._producer)
            self._bridge = Bridge(self.settings, self.handlers, ledger=_ledger(server),
                                  consumer_factory=self._joined, dead_letters=dead_letters)
            self._bridge.start()
        except BaseException:
            self.close(quiet=True)
            raise

    def close(self, *, quiet: bool = False) -> None:
        """Stop the bridge (drain, final commit), the worker, and bind the actors back."""
        if not self._entered:
            return
        self._entered = False
        try:
            if self._bridge is not None and not self._bridge_stopped:
                self._bridge_stopped = True
                self._bridge.stop()
                try:
                    self._bridge.run()
                except Exception:
                    if not quiet:
                        raise
                    logger.exception("the bridge stopped with an error")
        finally:
            if self._worker is not None:
                self._worker.stop(timeout=5000)
            if self._swap is not None:
                self._swap.restore()
            _active.release()

    def _joined(self, config: dict[str, Any]) -> ScriptedConsumer:
        assert self._consumer is not None
        self._consumer.config = config
        return self._consumer

    def _producer(self, config: dict[str, Any]) -> MemoryProducer:
        producer = MemoryProducer(config)
        self._producers.append(producer)
        return producer

    def _parts(self) -> tuple[Bridge, ScriptedConsumer, KitBroker]:
        if not self._entered or self._bridge is None or self._consumer is None or self._swap is None:
            raise KitError("the kit is not running: use it as a context manager (with KafkaTestKit(...) as kit)")
        return self._bridge, self._consumer, self._swap.broker

    @property
    def broker(self) -> KitBroker:
        """The ``StubBroker`` the actors are bound to while the kit runs."""
        return self._parts()[2]

    # -- feeding and running ------------------------------------------------------------------

    def feed(
        self,
        topic: str,
        value: Value = None,
        *,
        key: Value = None,
        headers: Mapping[str, HeaderValue] | Iterable[tuple[str, HeaderValue]] | None = None,
        partition: int = 0,
        timestamp: int | None = None,
    ) -> int:
        """Append a record to ``topic[partition]`` and return its offset. ``key`` and ``value``:
        ``bytes`` as they are, ``str`` as UTF-8, ``None`` as null, anything else as JSON. Header
        values: ``bytes``, ``str`` (UTF-8) or ``None``. ``timestamp``: ms since the epoch (now by
        default). It is consumed at the next :meth:`run`."""
        _, consumer, _ = self._parts()
        if topic not in self.handlers:
            raise KitError(f"no handler for topic {topic!r}; the handlers' topics: {', '.join(sorted(self.handlers))}")
        if partition < 0:
            raise KitError(f"partition must be 0 or more, got {partition}")
        stamp = timestamp if timestamp is not None else int(time.time() * 1000)
        return consumer.append(topic, partition, encode(key), encode(value), _headers(headers), stamp)

    def run(self, timeout: float | None = None, *, fail_fast: bool = True) -> Result:
        """Run the bridge loop until every record fed so far is committed (done or dead-lettered)
        and the broker is idle, or raise :class:`NotFinished` after ``timeout`` seconds.

        ``fail_fast`` (as in ``StubBroker.join``): raise :class:`DeadLettered` if a record failed
        for good during this call, chained to the handler's exception; pass ``False`` when the
        test expects dead letters.
        """
        __tracebackhide__ = True  # pytest shows the test's line, not the kit's loop
        bridge, consumer, broker = self._parts()
        began = time.monotonic()
        deadline = began + (self.timeout if timeout is None else timeout)
        letters_before = len(self.dead_letters())
        others_before = len(self._history.snapshot()[2])
        consumer.grant_fed()
        while True:
            bridge.poll_once()
            if bridge.stopping:
                self._bridge_stopped = True
                bridge.run()  # raises the error that stopped it
                raise KitError("the bridge stopped")
            runs, running, others = self._history.snapshot()
            if self._settled(consumer, broker, running):
                break
            if time.monotonic() >= deadline:
                raise NotFinished(not_finished(time.monotonic() - began, consumer.logs, consumer.committed_offsets,
                                               runs, running, broker.idle()))
        new_runs = tuple(r for r in runs if r.started >= began)
        letters = tuple(self.dead_letters()[letters_before:])
        result = Result(new_runs, letters, dict(consumer.committed_offsets), time.monotonic() - began)
        if fail_fast:
            text, cause = final_failures(new_runs, letters, others[others_before:])
            if text:
                raise DeadLettered(text) from _from_handler(cause)
        return result

    @staticmethod
    def _settled(consumer: ScriptedConsumer, broker: KitBroker, running: Mapping[int, Any]) -> bool:
        for tp in list(consumer.logs):
            if consumer.committed_offsets.get(tp, -1) < consumer.end(tp):
                return False
        return not running and broker.idle()

    # -- what happened ------------------------------------------------------------------------

    def ran(self, topic: str | None = None, *, partition: int | None = None, key: Any = _UNSET) -> list[Run]:
        """Runs of the handlers, in the order they started; optionally of one topic, partition or
        (decoded) key."""
        return [r for r in self._history.snapshot()[0]
                if (topic is None or r.topic == topic) and (partition is None or r.partition == partition)
                and (key is _UNSET or r.record.key == key)]

    def processed(self, topic: str | None = None, *, partition: int | None = None, key: Any = _UNSET) -> list[Record]:
        """The records whose run returned, in the order they started."""
        return [r.record for r in self.ran(topic, partition=partition, key=key) if r.outcome == "done"]

    def batches(self, topic: str | None = None, *, partition: int | None = None) -> list[tuple[Record, ...]]:
        """The records of each call of a batch handler (a retry is a call of its own), in the order
        the calls started; optionally the calls with records of one topic or partition."""
        calls: dict[int, tuple[Record, ...]] = {}
        for run in self.ran(topic, partition=partition):
            if run.batch:
                calls.setdefault(id(run.batch), run.batch)
        return list(calls.values())

    def dead_letters(self, topic: str | None = None) -> list[DeadLetter]:
        """Dead letters written, in order; optionally of records of ``topic`` (the original topic)."""
        letters = [DeadLetter.of(p) for producer in self._producers for p in producer.produced]
        return [d for d in letters if topic is None or d.topic == topic]

    def committed(self, topic: str) -> dict[int, int]:
        """Partition -> committed offset (the next record to read) of ``topic``."""
        _, consumer, _ = self._parts()
        return {p: offset for (t, p), offset in sorted(consumer.committed_offsets.items()) if t == topic}

    def order_violations(self, topic: str) -> list[str]:
        """Runs of ``topic`` that broke its handler's ordering: two runs of one partition
        (``partition`` mode) or of one key (``key`` mode) overlapping in time, or a later offset
        starting before an earlier one. Empty when the order held."""
        if topic not in self.handlers:
            raise KitError(f"no handler for topic {topic!r}")
        return order_violations(self.handlers[topic], self.ran(topic))


def _from_handler(error: BaseException | None) -> BaseException | None:
    """``error`` with its traceback starting in the handler: the frames of dramatiq's worker
    thread and of the bridge's wrapper above it say nothing about the failure."""
    if error is None:
        return None
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None and \
            str(tb.tb_frame.f_globals.get("__name__", "")).startswith(("dramatiq.", "bridge.")):
        tb = tb.tb_next
    return error.with_traceback(tb)


def _ledger(server: fakeredis.FakeServer) -> Ledger:
    return Ledger(fakeredis.FakeRedis(server=server, decode_responses=True))
