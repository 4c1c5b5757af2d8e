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
import uuid
from dataclasses import replace
from typing import Any, Literal

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware, Retries, SkipMessage

try:  # the work queue's item type, to put an unparked record ahead of the queue
    from dramatiq.worker import _WorkQueueItem
except ImportError:  # pragma: no cover - another dramatiq version: records go back on their lanes
    _WorkQueueItem = None  # type: ignore[assignment,misc]

from . import codecs
from .codecs import DecodeError
from .errors import LedgerUnavailable
from .handlers import handler_for_actor, handlers_by_topic
from .keys import PartitionKeys
from .ledger import Beats, Finished, Ledger, StartResult, Try, connect
from .logs import coordinates
from .parking import Parking
from .protocol import OPTION, Meta, ProtocolError, UnknownVersion, meta_of, registration_json
from .record import ENVELOPE_MARK, open_envelope, prepare

__all__ = ["OPTION", "LedgerMiddleware", "install"]

logger = logging.getLogger("bridge.worker")

#: How long a message of an unknown protocol version waits in the delay queue before it is offered
#: to a worker again (one that knows the version, during a rolling upgrade).
REFUSED_DELAY_MS = 10_000

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


def _keys(meta: Meta) -> PartitionKeys:
    return PartitionKeys(meta.group, meta.topic, meta.partition)


class LedgerMiddleware(Middleware):
    """Writes start, success, final failure, scheduled retry and skip of bridge messages to the
    ledger, and runs the next record of a partition (key) when the previous one finishes."""

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
        # Of those, the ones whose start a finish recorded already: message id -> (token, retries).
        self._approved: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        # Copies running in this process, for the heartbeat: (keys, offset) -> token -> entry.
        self._running: dict[tuple[PartitionKeys, int], dict[str, str]] = {}
        # Records parked in this process waiting for their predecessor: (keys, offset) -> count.
        self._parked: dict[tuple[PartitionKeys, int], int] = {}
        self._refusals: dict[int, float] = {}
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
            waiting = [(m, self._approved.get(m.message_id)) for m in self._released.values()]
            self._released.clear()
            self._approved.clear()
        if self._parking is not None:
            waiting.extend((m, None) for m in self._parking.take_all())
        for message, approved in waiting:
            self._requeue(message, token=approved[0] if approved else None)
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
        beats: dict[PartitionKeys, Beats] = {}
        with self._lock:
            for (keys, offset), copies in self._running.items():
                found = beats.setdefault(keys, Beats())
                found.running.extend((offset, token, entry) for token, entry in copies.items())
            for keys, offset in self._parked:
                beats.setdefault(keys, Beats()).parked.append(offset)
        if not beats:
            return
        try:
            self.ledger.beat(beats)
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

    def _skip(self, message: Any, reason: str) -> SkipMessage:
        """Skip ``message`` on purpose: nothing is written for it, and dramatiq's warning is dropped."""
        self._local.ours = message.message_id
        return SkipMessage(reason)

    def _admit(self, message: Any) -> None:
        self._local.ours = None
        self._local.copy = None
        self._local.delay = None
        approved = self._take_released(message.message_id)
        try:
            meta = meta_of(message)
        except UnknownVersion as e:
            self._refuse(message, e)
            raise self._skip(message, str(e)) from None
        except ProtocolError as e:
            logger.error("not running message %s of actor %s: %s", message.message_id, message.actor_name, e)
            raise self._skip(message, str(e)) from None
        if meta is None:
            return
        keys, where = _keys(meta), meta.where
        retries = _retries(message)
        if approved is not None:
            # The finish of its predecessor recorded its start a moment ago, in this process.
            token, known = approved
            verdict: StartResult = "run"
        else:
            token = meta.token or _new_token()
            verdict, known = self._start(meta, token, retries)
        if verdict == "wait":
            # Parked: the thread takes other work, the record runs once its predecessor finished.
            # Its heartbeat keeps the bridge from dispatching it again meanwhile.
            with self._lock:
                slot = (keys, meta.offset)
                self._parked[slot] = self._parked.get(slot, 0) + 1
            self.parking.park(keys.finished_channel, meta.prev, message)
            raise self._skip(message, "parked until its predecessor finishes")
        if verdict == "duplicate":
            # Another copy of this record runs (a redelivery after a crash, a duplicate delivery):
            # this one waits for it to finish, or to stop showing signs of life.
            logger.debug("%s: another copy runs; waiting for it", where, extra=_extra(meta))
            self.parking.park(keys.finished_channel, meta.offset, message)
            raise self._skip(message, "waiting for a running copy")
        if verdict != "run":
            # fenced: the partition's new owner dispatches the record again; superseded: the
            # bridge dispatched a newer copy; done: a duplicate delivery of a finished record.
            # Nothing is written either way.
            logger.info("not running %s: %s (epoch %d, attempt %d)", where, verdict, meta.epoch, meta.attempt,
                        extra=_extra(meta))
            raise self._skip(message, verdict)
        if known > retries:
            # It takes over from a copy that was retried or died: dramatiq's count goes on.
            message.options["retries"] = retries = known
        copy = Try(meta.offset, meta.epoch, meta.attempt, retries, token)
        self._local.copy = copy
        with self._lock:
            entry = registration_json(meta.epoch, meta.attempt, retries, token, _worker_id())
            self._running.setdefault((keys, meta.offset), {})[token] = entry
        self._decode(message, meta)

    def _start(self, meta: Meta, token: str, retries: int) -> tuple[StartResult, int]:
        """Ask the ledger whether this copy may start; park it when its predecessor runs."""
        keys = _keys(meta)
        copy = Try(meta.offset, meta.epoch, meta.attempt, retries, token)
        if meta.prev < 0:
            return self.ledger.start(keys, copy, _worker_id(), live=self._live)
        channel, parking = keys.finished_channel, self.parking
        parking.expect(channel, meta.prev)
        try:
            verdict, known = self.ledger.start(keys, copy, _worker_id(), meta.prev, live=self._live)
        except BaseException:
            parking.forget(channel, meta.prev)
            raise
        if verdict != "wait":
            parking.forget(channel, meta.prev)
        return verdict, known

    def _decode(self, message: Any, meta: Meta) -> None:
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
            logger.error("undecodable record %s for %s: %s", meta.where, handler.name, e, extra=_extra(meta))
            message.options["kdb_error"] = {"type": "DecodeError", "message": str(e)}
            message.fail()
            raise SkipMessage(str(e)) from None

    def _refuse(self, message: Any, error: UnknownVersion) -> None:
        """A message of a newer bridge: loudly put it back instead of running it under rules this
        worker does not know. Its successors wait for it, so nothing runs out of order."""
        raw = message.options.get(OPTION) or {}
        where = f"{raw.get('t')}[{raw.get('p')}]@{raw.get('o')}"
        now = time.monotonic()
        with self._lock:
            due = now - self._refusals.get(error.version, -1e9) >= 60.0
            if due:
                self._refusals[error.version] = now
        if due:
            logger.error(
                "refusing %s: %s; upgrade this worker (workers before bridges). The record goes back to "
                "its lane and is offered again every %ds",
                where,
                error,
                REFUSED_DELAY_MS // 1000,
            )
        broker = self._broker or dramatiq.get_broker()
        try:
            broker.enqueue(_plain(message), delay=REFUSED_DELAY_MS)
        except Exception as e:
            logger.error("could not put %s back on its lane (the bridge dispatches it again): %s", where, e)

    def _take_released(self, message_id: str) -> tuple[str, int] | None:
        """Forget a record handed back to the work queue; its recorded start, if any."""
        if not self._released:
            return None
        with self._lock:
            self._released.pop(message_id, None)
            return self._approved.pop(message_id, None)

    def _unpark(self, message: Any, *, token: str | None = None) -> bool:
        """Run a record again: on this worker's own work queue (Redis broker), else back on its
        lane. ``token`` names the start a finish recorded for it. True when queued here."""
        self._forget_parked(message)
        consumer = self._worker.consumers.get(message.queue_name) if self._worker is not None else None
        queue = getattr(self._worker, "work_queue", None)
        local = isinstance(self._broker, RedisBroker) and _WorkQueueItem is not None and queue is not None
        if consumer is None or self._stopping or not local:
            # Other brokers acknowledge by delivery (a RabbitMQ tag): a message they did not just
            # deliver goes back through the broker instead.
            self._requeue(message, token=token)
            return False
        with self._lock:
            self._released[message.message_id] = message
            if token is not None:
                self._approved[message.message_id] = (token, _retries(message))
        proxy = MessageProxy(_plain(message))
        # The head of its partition: ahead of records that would only park again.
        assert queue is not None
        queue.put(_WorkQueueItem(-(1 << 62), proxy))
        return True

    def _forget_parked(self, message: Any) -> None:
        try:
            meta = meta_of(message)
        except ProtocolError:
            return
        if meta is None:
            return
        slot = (_keys(meta), meta.offset)
        with self._lock:
            count = self._parked.pop(slot, 0)
            if count > 1:
                self._parked[slot] = count - 1

    def _requeue(self, message: Any, *, token: str | None = None) -> None:
        """Put a record back on its lane; ``token`` names the start recorded for it already."""
        plain = _plain(message)
        meta = meta_of(plain)
        if meta is not None:
            plain = plain.copy(options={OPTION: replace(meta, token=token).to_option()})
        broker = self._broker or dramatiq.get_broker()
        try:
            broker.enqueue(plain)
        except Exception as e:
            # Its heartbeat stops with it: the bridge dispatches the record again after its
            # re-dispatch timeout.
            logger.error("could not put a parked record back on lane %s: %s", message.queue_name, e)

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        # Retries re-enqueues a failed try with its backoff from inside after_process_message,
        # in this thread, just before this middleware's own after_process_message runs.
        if delay and OPTION in message.options:
            self._local.delay = delay

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        self._take_released(message.message_id)
        copy, self._local.copy = getattr(self._local, "copy", None), None
        if copy is None:
            return
        if exception is None:
            self._finish(message, "done", copy=copy)
        elif message.failed:
            self._finish(message, "failed", exception, copy=copy)
        else:
            delay, self._local.delay = getattr(self._local, "delay", None), None
            self._finish(message, "retry", copy=copy, delay_ms=int(delay or 0))

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        approved = self._take_released(message.message_id)
        copy, self._local.copy = getattr(self._local, "copy", None), None
        if getattr(self._local, "ours", None) == message.message_id:
            return
        if copy is None and approved is not None:
            # Skipped before this middleware saw it, with a start recorded on its behalf.
            try:
                meta = meta_of(message)
            except ProtocolError:
                meta = None
            if meta is not None:
                copy = Try(meta.offset, meta.epoch, meta.attempt, _retries(message), approved[0])
        # Skipped by another middleware, before or after this one's start: a final state.
        self._finish(message, "failed" if message.failed else "done", copy=copy)

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        # Every final failure passes here, including ones that never reached process hooks
        # (unknown actor, age limit). Writing the same failure twice is harmless.
        if getattr(self._local, "ours", None) == message.message_id:
            return
        self._finish(message, "failed", getattr(message, "_exception", None))

    def _forget_running(self, keys: PartitionKeys, offset: int, token: str) -> None:
        with self._lock:
            copies = self._running.get((keys, offset))
            if copies is not None:
                copies.pop(token, None)
                if not copies:
                    del self._running[(keys, offset)]

    def _finish(
        self,
        message: Any,
        outcome: Literal["done", "failed", "retry"],
        exception: BaseException | None = None,
        *,
        copy: Try | None = None,
        delay_ms: int = 0,
    ) -> None:
        try:
            meta = meta_of(message)
        except ProtocolError:
            return
        if meta is None:
            return
        keys, offset = _keys(meta), meta.offset
        if copy is None:
            # Never started here (skipped or refused before its start): it holds no registration.
            copy = Try(offset, meta.epoch, meta.attempt, _retries(message), "")
        else:
            self._forget_running(keys, offset, copy.token)
            # Retries has counted this try already: a retry registers the next try's count.
            copy = replace(copy, retries=_retries(message))
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
        successor = next((m for m in claimed if _prev_of(m) == offset), None)
        parked: Try | None = None
        if successor is not None:
            found = meta_of(successor)
            assert found is not None
            parked = Try(found.offset, found.epoch, found.attempt, _retries(successor), _new_token())
        staged_token = _new_token()
        finished: Finished | None
        try:
            finished = self.ledger.finish(
                keys,
                copy,
                outcome,
                detail=detail,
                delay_ms=delay_ms,
                worker=_worker_id(),
                handoff=self._worker is not None,
                successor_token=staged_token,
                parked=parked,
                live=self._live,
            )
        except LedgerUnavailable as e:
            self._ledger_failed("finish")
            logger.error("%s: ledger write failed (%s), the bridge will dispatch it again: %s", meta.where, outcome, e,
                         extra=_extra(meta))
            finished = None
        for waiting in claimed:
            if waiting is not successor or finished is None:
                self._unpark(waiting)
        if finished is not None:
            if successor is not None and parked is not None:
                self._hand_over(successor, finished.parked, parked.token, finished.retries)
            if finished.body is not None:
                staged = MessageProxy(dramatiq.Message.decode(finished.body))
                self._hand_over(staged, finished.staged, staged_token, finished.retries)
        if outcome != "retry":
            self.parking.announce(channel, offset)

    def _hand_over(self, successor: Any, verdict: StartResult | None, token: str, retries: int) -> None:
        """Run the successor whose start a finish decided, or drop it if it must not run."""
        if verdict == "run":
            if retries > _retries(successor):
                successor.options["retries"] = retries
            self._unpark(successor, token=token)
        elif verdict in ("wait", "duplicate"):
            self._unpark(successor)
        elif verdict is not None:
            found = meta_of(successor)
            if found is not None:
                logger.info("not running %s: %s (epoch %d)", found.where, verdict, found.epoch, extra=_extra(found))


def _prev_of(message: Any) -> int | None:
    try:
        meta = meta_of(message)
    except ProtocolError:
        return None
    return meta.prev if meta is not None else None


def _plain(message: Any) -> dramatiq.Message[Any]:
    """The message under a broker's proxy (a RabbitMQ delivery, a MessageProxy)."""
    while isinstance(message, MessageProxy):
        message = message._message
    assert isinstance(message, dramatiq.Message)
    return message


def _extra(meta: Meta) -> dict[str, Any]:
    return coordinates(meta.topic, meta.partition, meta.offset)


def _retries(message: Any) -> int:
    """dramatiq's retry count of a message: its copies for retries are not duplicates."""
    return int(message.options.get("retries", 0) or 0)


def _new_token() -> str:
    return uuid.uuid4().hex[:16]


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
