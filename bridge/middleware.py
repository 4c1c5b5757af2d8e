"""Worker-side middleware: records each bridge message's terminal state in the ack ledger.

Installed on the actor's broker by ``@kafka_handler`` (placed before ``Retries``, so that its
``after_process_message`` runs after Retries has decided whether the failure is final). It also
makes the worker consume lanes: a background thread declares every lane that a bridge opened for
a topic this worker handles, which starts a dramatiq consumer for it.

Hooks run in dramatiq's worker threads. dramatiq logs and swallows exceptions raised by
``after_*`` hooks, so a failed ledger write is logged here and counted; the bridge re-dispatches
records whose completion never reaches the ledger.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware, Retries, SkipMessage

try:  # the work queue's item type, to put an unparked record ahead of the queue
    from dramatiq.worker import _WorkQueueItem
except ImportError:  # pragma: no cover - another dramatiq version: its consumer's handle_message
    _WorkQueueItem = None  # type: ignore[assignment,misc]

from . import codecs
from .codecs import DecodeError
from .errors import LedgerUnavailable
from .handlers import handler_for_actor, handlers_by_topic
from .keys import PartitionKeys
from .ledger import Ledger, StartResult, connect
from .logs import coordinates
from .parking import Parking
from .record import ENVELOPE_MARK, open_envelope, prepare

logger = logging.getLogger("bridge.worker")

#: Message option that carries the bridge's coordinates: group, topic, partition, offset, epoch,
#: and optionally attempt ("a") and the offset of the predecessor that must finish first ("pv").
OPTION = "kdb"


_counter: Any = None
_counter_lock = threading.Lock()


def _failure_counter() -> Any:
    """The worker's ledger failure counter, or None without prometheus-client.

    Created on first use, after process boot: dramatiq's Prometheus middleware switches
    prometheus-client to multiprocess mode then, and exports this counter from every worker
    process on its own port.
    """
    global _counter
    with _counter_lock:
        if _counter is None:
            try:
                from prometheus_client import Counter
            except ImportError:  # pragma: no cover - a dependency; kept optional for slim fleets
                return None
            _counter = Counter(
                "kafka_dramatiq_bridge_worker_ledger_write_failures",
                "Ledger calls of a worker that failed: start (the message is retried), finish (the bridge "
                "dispatches the record again after BRIDGE_REDISPATCH_TIMEOUT), heartbeat.",
                ["operation"],
            )
            for operation in ("start", "finish", "heartbeat"):
                _counter.labels(operation)
        return _counter


@dataclass(frozen=True, slots=True)
class Coordinates:
    keys: PartitionKeys
    offset: int
    epoch: int
    attempt: int
    prev: int
    started: bool = False

    @property
    def where(self) -> str:
        return f"{self.keys.topic}[{self.keys.partition}]@{self.offset}"

    @property
    def extra(self) -> dict[str, Any]:
        return coordinates(self.keys.topic, self.keys.partition, self.offset)


def _coordinates(message: Any) -> Coordinates | None:
    meta = message.options.get(OPTION)
    if not meta:
        return None
    keys = PartitionKeys(meta["g"], meta["t"], int(meta["p"]))
    return Coordinates(
        keys, int(meta["o"]), int(meta["e"]), int(meta.get("a", 1)), int(meta.get("pv", -1)), bool(meta.get("s"))
    )


class LedgerMiddleware(Middleware):
    """Writes start, success, final failure and skip of bridge messages to the ledger."""

    def __init__(
        self,
        redis_url: str | None = None,
        lane_refresh_interval: float | None = None,
        heartbeat_interval: float | None = None,
        park_recheck_interval: float | None = None,
    ) -> None:
        self._redis_url = redis_url
        self._lane_refresh_interval = lane_refresh_interval
        self._heartbeat_interval = heartbeat_interval
        self._park_recheck_interval = park_recheck_interval
        self._ledger: Ledger | None = None
        self._parking: Parking | None = None
        self._worker: dramatiq.Worker | None = None
        self._broker: dramatiq.Broker | None = None
        self._stopping = False
        # Parked records handed back to the work queue and not yet started, by message id: a
        # shutdown puts those back on their lanes too (their messages are acknowledged).
        self._released: dict[str, Any] = {}
        # Unparked records whose start the finish of their predecessor already recorded.
        self._approved: set[str] = set()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        # Records running in this process, for the heartbeat: (keys, offset) -> count.
        self._running: dict[tuple[PartitionKeys, int], int] = {}
        self.ledger_write_failures = 0

    @property
    def ledger(self) -> Ledger:
        with self._lock:
            if self._ledger is None:
                from .settings import WorkerSettings

                settings = WorkerSettings()
                url = self._redis_url or settings.redis_url
                if self._lane_refresh_interval is None:
                    self._lane_refresh_interval = settings.lane_refresh_interval
                if self._heartbeat_interval is None:
                    self._heartbeat_interval = settings.heartbeat_interval
                if self._park_recheck_interval is None:
                    self._park_recheck_interval = settings.park_recheck_interval
                codecs.max_json_depth = settings.max_json_depth
                self._ledger = Ledger(connect(url))
            return self._ledger

    @property
    def _live(self) -> float:
        """How recent a running copy's start or heartbeat must be to count as alive."""
        return 3 * (self._heartbeat_interval or 5.0)

    @property
    def parking(self) -> Parking:
        ledger = self.ledger
        with self._lock:
            if self._parking is None:
                self._parking = Parking(ledger.client, self._unpark, self._park_recheck_interval or 1.0)
            return self._parking

    # -- lanes and heartbeats ---------------------------------------------------------------

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._stop.clear()
        self._worker, self._broker, self._stopping = worker, broker, False
        logging.getLogger("dramatiq.worker.WorkerThread").addFilter(self._quiet_skips)
        _failure_counter()  # exported from 0 on, not only after the first failure
        self._declare_lanes(broker)
        self._watcher = threading.Thread(target=self._background, args=(broker,), name="kdb-worker", daemon=True)
        self._watcher.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._stop.set()
        self._stopping = True
        if self._parking is not None:
            self._parking.close()

    def _ledger_failed(self, operation: str) -> None:
        with self._lock:
            self.ledger_write_failures += 1
        counter = _failure_counter()
        if counter is not None:
            counter.labels(operation).inc()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        with self._lock:
            waiting = [(m, m.message_id in self._approved) for m in self._released.values()]
            self._released.clear()
            self._approved.clear()
        if self._parking is not None:
            waiting.extend((m, False) for m in self._parking.take_all())
        for message, started in waiting:
            self._requeue(message, started=started)
        if waiting:
            logger.info("put %d parked records back on their lanes", len(waiting))

    def _quiet_skips(self, record: logging.LogRecord) -> bool:
        """Drop dramatiq's warning for messages this middleware skipped on purpose (logged here)."""
        if record.msg == "Message %s was skipped." and record.args:
            message = record.args[0] if isinstance(record.args, tuple) else None
            return getattr(message, "message_id", None) != getattr(self._local, "ours", None)
        return True

    def _background(self, broker: dramatiq.Broker) -> None:
        """Declare new lanes, and send heartbeats for the records running in this process."""
        lanes_every = self._lane_refresh_interval or 1.0
        beats_every = self._heartbeat_interval or 5.0
        next_lanes = next_beat = time.monotonic()
        while not self._stop.wait(min(lanes_every, beats_every, 0.5)):
            now = time.monotonic()
            if now >= next_lanes:
                self._declare_lanes(broker)
                next_lanes = now + lanes_every
            if now >= next_beat:
                self._beat()
                next_beat = now + beats_every

    def _beat(self) -> None:
        with self._lock:
            running: dict[PartitionKeys, list[int]] = {}
            for keys, offset in self._running:
                running.setdefault(keys, []).append(offset)
        if not running:
            return
        try:
            self.ledger.beat(running)
        except LedgerUnavailable as e:
            self._ledger_failed("heartbeat")
            logger.warning("heartbeat failed: %s", e)

    def _declare_lanes(self, broker: dramatiq.Broker) -> None:
        try:
            lanes = self.ledger.lanes()
        except LedgerUnavailable as e:
            logger.warning("cannot read lanes, retrying: %s", e)
            return
        topics = handlers_by_topic()
        declared = broker.get_declared_queues()
        for lane, topic in sorted(lanes.items()):
            if topic in topics and lane not in declared:
                logger.info("consuming lane %s (topic %s)", lane, topic)
                broker.declare_queue(lane)

    # -- messages ---------------------------------------------------------------------------

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        try:
            self._admit(message)
        except LedgerUnavailable:
            self._ledger_failed("start")
            raise

    def _admit(self, message: Any) -> None:
        self._local.ours = None
        if self._released:
            with self._lock:
                self._released.pop(message.message_id, None)
        found = _coordinates(message)
        if found is None:
            return
        keys, offset, where = found.keys, found.offset, found.where
        verdict: StartResult
        if self._approved and message.message_id in self._approved:
            with self._lock:
                self._approved.discard(message.message_id)
            verdict = "run"
        elif found.started:
            # The finish of its predecessor recorded its start; a retry of it starts anew.
            message.options[OPTION] = {k: v for k, v in message.options[OPTION].items() if k != "s"}
            verdict = "run"
        elif found.prev < 0:
            verdict = self.ledger.start(
                keys, offset, found.epoch, _worker_id(), found.attempt, live=self._live, retries=_retries(message)
            )
        else:
            verdict = self._start_after(found, message)
        if verdict == "wait":
            # Parked: the thread takes other work, the record runs once its predecessor finished.
            self._local.ours = message.message_id
            raise SkipMessage("parked until its predecessor finishes")
        if verdict != "run":
            # fenced: the partition's new owner dispatches the record again; superseded: the
            # bridge dispatched a newer copy; done: a duplicate delivery of a finished record.
            # Nothing is written either way.
            self._local.ours = message.message_id
            logger.info("not running %s: %s (epoch %d, attempt %d)", where, verdict, found.epoch, found.attempt,
                        extra=found.extra)
            raise SkipMessage(verdict)
        with self._lock:
            self._running[(keys, offset)] = self._running.get((keys, offset), 0) + 1
        handler = handler_for_actor(message.actor_name)
        if handler is None or not message.args or not isinstance(message.args[0], dict):
            return
        env = message.args[0]
        if ENVELOPE_MARK not in env:
            return
        try:
            prepare(env, open_envelope(env, handler.key_codec, handler.value_codec))
        except DecodeError as e:
            # Retrying cannot fix undecodable bytes: fail now, never reach the actor.
            logger.error("undecodable record %s for %s: %s", where, handler.name, e, extra=found.extra)
            message.options["kdb_error"] = {"type": "DecodeError", "message": str(e)}
            message.fail()
            raise SkipMessage(str(e)) from None

    def _start_after(self, found: Coordinates, message: Any) -> StartResult:
        """Start a record that names a predecessor; park it if the predecessor is unfinished."""
        channel, parking = found.keys.finished_channel, self.parking
        parking.expect(channel, found.prev)
        try:
            verdict = self.ledger.start(
                found.keys,
                found.offset,
                found.epoch,
                _worker_id(),
                found.attempt,
                found.prev,
                live=self._live,
                retries=_retries(message),
            )
        except BaseException:
            parking.forget(channel, found.prev)
            raise
        if verdict != "wait":
            parking.forget(channel, found.prev)
            return verdict
        with self._lock:
            # Parked counts as alive: the heartbeat covers it, so it is not dispatched again.
            slot = (found.keys, found.offset)
            self._running[slot] = self._running.get(slot, 0) + 1
        parking.park(channel, found.prev, message)
        return verdict

    def _unpark(self, message: Any, *, started: bool = False) -> bool:
        """Run a record on this worker's own work queue, else put it back on its lane (then
        ``started`` marks a record whose start is recorded already). True when queued here."""
        found = _coordinates(message)
        if found is not None:
            self._forget((found.keys, found.offset))
        consumer = self._worker.consumers.get(message.queue_name) if self._worker is not None else None
        if consumer is None or self._stopping:
            self._requeue(message, started=started)
            return False
        with self._lock:
            self._released[message.message_id] = message
        proxy = MessageProxy(message._message) if isinstance(message, MessageProxy) else MessageProxy(message)
        queue = getattr(self._worker, "work_queue", None)
        if _WorkQueueItem is not None and queue is not None:
            # The head of its partition: ahead of records that would only park again.
            queue.put(_WorkQueueItem(-(1 << 62), proxy))
        else:
            consumer.handle_message(proxy)
        return True

    def _requeue(self, message: Any, *, started: bool = False) -> None:
        """Put a record back on its lane; ``started``: its start is recorded already."""
        if started:
            message.options[OPTION] = {**message.options[OPTION], "s": 1}
        broker = self._broker or dramatiq.get_broker()
        try:
            broker.enqueue(message._message if isinstance(message, MessageProxy) else message)
        except Exception as e:
            # Its heartbeat stops with it: the bridge dispatches the record again after its
            # re-dispatch timeout.
            logger.error("could not put a parked record back on lane %s: %s", message.queue_name, e)

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        if exception is None:
            self._finish(message, "done")
        elif message.failed:
            self._finish(message, "failed", exception)
        else:
            self._finish(message, "retry")

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if getattr(self._local, "ours", None) == message.message_id:
            return
        self._finish(message, "failed" if message.failed else "done")

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        # Every final failure passes here, including ones that never reached process hooks
        # (unknown actor, age limit). Writing the same failure twice is harmless.
        if getattr(self._local, "ours", None) == message.message_id:
            return
        self._finish(message, "failed", getattr(message, "_exception", None))

    def _forget(self, slot: tuple[PartitionKeys, int]) -> None:
        with self._lock:
            count = self._running.pop(slot, 0)
            if count > 1:
                self._running[slot] = count - 1

    def _finish(self, message: Any, outcome: str, exception: BaseException | None = None) -> None:
        found = _coordinates(message)
        if found is None:
            return
        keys, offset = found.keys, found.offset
        self._forget((keys, offset))
        detail: dict[str, Any] = {}
        if outcome == "failed":
            error = message.options.get("kdb_error")
            if error is None and exception is not None:
                error = {"type": type(exception).__name__, "message": str(exception)[:2000]}
            detail = {
                "error": error or {"type": "Failed", "message": "message failed in the task broker"},
                "attempts": int(message.options.get("retries", 0)) or 1,
                "actor": message.actor_name,
            }
        channel = keys.finished_channel
        # A successor parked in this process is started by the same round trip.
        claimed = self.parking.claim(channel, offset) if outcome != "retry" and self._parking else []
        successor = next((m for m in claimed if (c := _coordinates(m)) is not None and c.prev == offset), None)
        start = None
        if successor is not None:
            c = _coordinates(successor)
            assert c is not None
            start = (c.offset, c.epoch, _worker_id(), c.attempt, _retries(successor))
        staged: bytes | None = None
        try:
            verdict, staged = self.ledger.finish(
                keys,
                offset,
                outcome,
                detail,
                start,
                handoff=self._worker is not None,
                worker=_worker_id(),
                live=self._live,
            )
        except LedgerUnavailable as e:
            self._ledger_failed("finish")
            logger.error("%s: ledger write failed (%s), the bridge will dispatch it again: %s", found.where, outcome, e,
                         extra=found.extra)
            verdict = None
            successor = None
        for parked in claimed:
            if parked is not successor:
                self._unpark(parked)
        if successor is not None:
            self._hand_over(successor, verdict)
        elif staged is not None:
            self._hand_over(MessageProxy(dramatiq.Message.decode(staged)), verdict)
        if outcome != "retry":
            self.parking.announce(channel, offset)

    def _hand_over(self, successor: Any, verdict: StartResult | None) -> None:
        """Run the successor whose start the finish decided, or drop it if it must not run."""
        if verdict == "run":
            with self._lock:
                self._approved.add(successor.message_id)
            if not self._unpark(successor, started=True):
                with self._lock:
                    self._approved.discard(successor.message_id)
        elif verdict in (None, "wait"):
            self._unpark(successor)
        else:
            found = _coordinates(successor)
            if found is not None:
                self._forget((found.keys, found.offset))
                logger.info("not running %s: %s (epoch %d)", found.where, verdict, found.epoch, extra=found.extra)


def _retries(message: Any) -> int:
    """dramatiq's retry count of a message: its copies for retries are not duplicates."""
    return int(message.options.get("retries", 0) or 0)


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def install(broker: dramatiq.Broker) -> LedgerMiddleware:
    """Add the ledger middleware to ``broker`` once, before ``Retries`` when present."""
    for existing in broker.middleware:
        if isinstance(existing, LedgerMiddleware):
            return existing
    middleware = LedgerMiddleware()
    if any(isinstance(m, Retries) for m in broker.middleware):
        broker.add_middleware(middleware, before=Retries)
    else:
        broker.add_middleware(middleware)
    return middleware
