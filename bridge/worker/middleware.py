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
import threading
from dataclasses import replace
from typing import Any, Literal

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware, SkipMessage

from ..keys import PartitionKeys
from ..ledger import End, Finished, Ledger, LedgerError, StartResult, Try, connect
from ..logs import coordinates
from ..protocol import OPTION, Meta, ProtocolError, UnknownVersion, meta_of
from ..registry import Registry, registry
from ..settings import WorkerSettings
from .admission import Refusals, decode
from .batcher import Batcher
from .batches import Batches
from .handoff import Handoff, retries_of
from .identity import new_token, process_id, worker_id
from .metrics import count_failure, export_failures
from .parking import Parking
from .signs import Background, Signs
from .waker import Waker

logger = logging.getLogger("bridge.worker")

_LEDGER_ERRORS = LedgerError


def _keys(meta: Meta) -> PartitionKeys:
    return PartitionKeys(meta.group, meta.topic, meta.partition)


class LedgerMiddleware(Middleware):
    """Writes start, success, final failure, scheduled retry and skip of bridge messages to the
    ledger, and runs the next record of a partition (key) when the previous one finishes.

    ``settings`` and ``ledger`` default to the worker's environment (``BRIDGE_*``), read when the
    middleware is first used; ``registry`` to the process's handler registry.
    """

    def __init__(
        self,
        settings: WorkerSettings | None = None,
        *,
        ledger: Ledger | None = None,
        handlers: Registry | None = None,
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._handlers = handlers or registry
        self._lock = threading.Lock()
        self._local = threading.local()
        self._parking: Parking | None = None
        self._batcher: Batcher | None = None
        self._depth: int | None = None
        self._background: Background | None = None
        self.signs = Signs()
        self.handoff = Handoff(self.signs)
        self.waker = Waker()
        self.batches = Batches(lambda: self.ledger, lambda *a: self.batcher.start(*a), self.signs, self._failed,
                               lambda: self.live)
        self._refusals = Refusals()
        self.ledger_write_failures = 0

    @property
    def settings(self) -> WorkerSettings:
        with self._lock:
            if self._settings is None:
                self._settings = WorkerSettings()
            return self._settings

    @property
    def ledger(self) -> Ledger:
        settings = self.settings
        with self._lock:
            if self._ledger is None:
                self._ledger = Ledger(connect(settings.redis_url))
            return self._ledger

    @property
    def live(self) -> float:
        """How recent a running copy's start or heartbeat must be to count as alive."""
        return 3 * self.settings.heartbeat_interval

    @property
    def _max_json_depth(self) -> int:
        depth = self._depth
        if depth is None:
            depth = self._depth = self.settings.max_json_depth
        return depth

    @property
    def batcher(self) -> Batcher:
        """Writes starts without a predecessor and ends without a successor in batches."""
        if self._batcher is not None:  # read on every record: no lock once built
            return self._batcher
        ledger, live = self.ledger, self.live
        with self._lock:
            if self._batcher is None:
                self._batcher = Batcher(ledger, process_id(), live, self._failed)
            return self._batcher

    @property
    def parking(self) -> Parking:
        ledger, recheck = self.ledger, self.settings.park_recheck_interval
        with self._lock:
            if self._parking is None:
                self._parking = Parking(ledger.client, self.handoff.unpark, recheck)
            return self._parking

    # -- lanes and heartbeats ---------------------------------------------------------------

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.waker.install(broker)  # before any lane is declared, so every lane consumer has it
        self.handoff.boot(broker, worker)
        logging.getLogger("dramatiq.worker.WorkerThread").addFilter(self._quiet_skips)
        export_failures()
        settings = self.settings
        self._background = Background(self.ledger, self._handlers, self.signs, broker, self._failed,
                                      settings.lane_refresh_interval, settings.heartbeat_interval)
        self._background.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self._background is not None:
            # Joined: a lane it declared meanwhile would change the worker's consumers while the
            # worker stops them.
            self._background.stop()
        self.handoff.stopping()
        self.waker.close()
        if self._parking is not None:
            self._parking.close()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.waker.flush()
        if self._batcher is not None:
            self._batcher.close()
        waiting = self.handoff.release_all()
        if self._parking is not None:
            for message in self._parking.take_all():
                self.handoff.requeue(message)
                waiting += 1
        if waiting:
            logger.info("put %d parked records back on their lanes", waiting)

    def _failed(self, operation: str) -> None:
        with self._lock:
            self.ledger_write_failures += 1
        count_failure(operation)

    def _quiet_skips(self, record: logging.LogRecord) -> bool:
        """Drop dramatiq's warning for messages this middleware skipped on purpose (logged here)."""
        if record.msg == "Message %s was skipped." and record.args:
            message = record.args[0] if isinstance(record.args, tuple) else None
            return getattr(message, "message_id", None) != getattr(self._local, "ours", None)
        return True

    # -- starting a record ------------------------------------------------------------------

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        try:
            self._admit(message)
        except _LEDGER_ERRORS:
            self._failed("start")
            raise

    def _skip(self, message: Any, reason: str) -> SkipMessage:
        """Skip ``message`` on purpose: nothing is written for it, and dramatiq's warning is dropped."""
        self._local.ours = message.message_id
        return SkipMessage(reason)

    def _admit(self, message: Any) -> None:
        local = self._local
        local.ours = local.copy = local.delay = local.keys = local.batch_ended = None
        local.unordered = False
        approved = self.handoff.take(message.message_id)
        try:
            meta = meta_of(message)
        except UnknownVersion as e:
            self._refusals.refuse(message, e, self.handoff.broker)
            raise self._skip(message, str(e)) from None
        except ProtocolError as e:
            logger.error("not running message %s of actor %s: %s", message.message_id, message.actor_name, e)
            raise self._skip(message, str(e)) from None
        if meta is None:
            return
        keys, retries = _keys(meta), retries_of(message)
        handler = self._handlers.for_actor(message.actor_name)
        if meta.batch:
            self.batches.admit(message, meta, handler, self._max_json_depth, self._skip)
            return
        worker = worker_id()
        # Approved: the finish of its predecessor recorded its start a moment ago, in this process.
        token = approved[0] if approved is not None else meta.token or new_token()
        copy = Try(meta.offset, meta.epoch, meta.attempt, retries, token)
        verdict: StartResult
        verdict, known = ("run", approved[1]) if approved is not None else self._start(meta, keys, copy, worker)
        if verdict == "wait":
            # Parked: the thread takes other work, the record runs once its predecessor finished.
            # Its heartbeat keeps the bridge from dispatching it again meanwhile.
            self.signs.parked((keys, meta.offset))
            self.parking.park(keys.finished_channel, meta.prev, message)
            raise self._skip(message, "parked until its predecessor finishes")
        if verdict == "duplicate":
            # Another copy of this record runs (a redelivery after a crash, a duplicate delivery):
            # this one waits for it to finish, or to stop showing signs of life.
            logger.debug("%s: another copy runs; waiting for it", meta.where, extra=_extra(meta))
            self.parking.park(keys.finished_channel, meta.offset, message)
            raise self._skip(message, "waiting for a running copy")
        if verdict != "run":
            # fenced: the partition's new owner dispatches the record again; superseded: the
            # bridge dispatched a newer copy; done: a duplicate delivery of a finished record.
            # Nothing is written either way.
            logger.info("not running %s: %s (epoch %d, attempt %d)", meta.where, verdict, meta.epoch, meta.attempt,
                        extra=_extra(meta))
            raise self._skip(message, verdict)
        if known > retries:
            # It takes over from a copy that was retried or died: dramatiq's count goes on.
            message.options["retries"] = retries = known
            copy = Try(meta.offset, meta.epoch, meta.attempt, retries, token)
        local.copy = copy
        local.keys = keys
        # No order to keep: its end goes with a batch.
        local.unordered = handler is not None and handler.ordering == "none" and meta.prev < 0
        self.signs.running((keys, meta.offset), token, (meta.epoch, meta.attempt, retries, token, worker))
        if handler is not None:
            decode(message, meta, handler, self._max_json_depth)

    def _start(self, meta: Meta, keys: PartitionKeys, copy: Try, worker: str) -> tuple[StartResult, int]:
        """Ask the ledger whether this copy may start, listening for its predecessor's end first."""
        if meta.prev < 0:
            return self.batcher.start(keys, copy, worker)
        channel, parking = keys.finished_channel, self.parking
        parking.expect(channel, meta.prev)
        try:
            verdict, known = self.ledger.start(keys, copy, worker, meta.prev, live=self.live)
        except BaseException:
            parking.forget(channel, meta.prev)
            raise
        if verdict != "wait":
            parking.forget(channel, meta.prev)
        return verdict, known

    # -- ending a record --------------------------------------------------------------------

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        # Retries re-enqueues a failed try with its backoff from inside after_process_message,
        # in this thread, just before this middleware's own after_process_message runs.
        if delay and OPTION in message.options:
            self._local.delay = delay

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        self.handoff.ended(message)
        local = self._local
        if self.batches.end(message, exception, int(getattr(local, "delay", None) or 0)):
            local.batch_ended, local.delay = message.message_id, None
            return
        copy, local.copy = getattr(local, "copy", None), None
        if copy is None:
            return
        if exception is None and local.unordered:
            # The common case, kept short: an unordered record done, its end written in a batch.
            local.unordered = False
            keys = local.keys
            self.signs.finished((keys, copy.offset), copy.token)
            self.batcher.finish(keys, End(copy, "done"))
            return
        if exception is None:
            self._finish(message, "done", copy=copy)
        elif message.failed:
            self._finish(message, "failed", exception, copy=copy)
        else:
            delay, self._local.delay = getattr(self._local, "delay", None), None
            self._finish(message, "retry", copy=copy, delay_ms=int(delay or 0))

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        approved = self.handoff.ended(message)
        copy, self._local.copy = getattr(self._local, "copy", None), None
        if getattr(self._local, "ours", None) == message.message_id:
            return
        if self.batches.settle_unstarted(message, None):
            return
        if copy is None and approved is not None:
            # Skipped before this middleware saw it, with a start recorded on its behalf.
            try:
                meta = meta_of(message)
            except ProtocolError:
                meta = None
            if meta is not None:
                copy = Try(meta.offset, meta.epoch, meta.attempt, retries_of(message), approved[0])
        # Skipped by another middleware, before or after this one's start: a final state.
        self._finish(message, "failed" if message.failed else "done", copy=copy)

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        # Every final failure passes here, including ones that never reached process hooks
        # (unknown actor, age limit). Writing the same failure twice is harmless.
        if message.message_id in (getattr(self._local, "ours", None), getattr(self._local, "batch_ended", None)):
            return
        if self.batches.settle_unstarted(message, getattr(message, "_exception", None)):
            return
        self._finish(message, "failed", getattr(message, "_exception", None))

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
            copy = Try(offset, meta.epoch, meta.attempt, retries_of(message), "")
        else:
            self.signs.finished((keys, offset), copy.token)
            # Retries has counted this try already: a retry registers the next try's count.
            copy = replace(copy, retries=retries_of(message))
        detail: dict[str, Any] = {}
        unordered, self._local.unordered = getattr(self._local, "unordered", False), False
        if outcome == "failed":
            error = message.options.get("kdb_error")
            if error is None and exception is not None:
                error = {"type": type(exception).__name__, "message": str(exception)[:2000]}
            detail = {
                "error": error or {"type": "Failed", "message": "message failed in the task broker"},
                "attempts": int(message.options.get("retries", 0)) or 1,
                "actor": message.actor_name,
            }
        if unordered:
            self.batcher.finish(keys, End(copy, outcome, detail, delay_ms))
            return
        channel = keys.finished_channel
        # A successor parked in this process is started by the same round trip.
        claimed = self.parking.claim(channel, offset) if outcome != "retry" and self._parking else []
        successor = next((m for m in claimed if _prev_of(m) == offset), None)
        parked: Try | None = None
        if successor is not None:
            found = meta_of(successor)
            assert found is not None
            parked = Try(found.offset, found.epoch, found.attempt, retries_of(successor), new_token())
        staged_token = new_token()
        finished: Finished | None
        try:
            finished = self.ledger.finish(
                keys, copy, outcome, detail=detail, delay_ms=delay_ms, worker=worker_id(),
                handoff=self.handoff.in_worker, successor_token=staged_token, parked=parked, live=self.live,
            )
        except _LEDGER_ERRORS as e:
            self._failed("finish")
            logger.error("%s: ledger write failed (%s), the bridge will dispatch it again: %s", meta.where, outcome, e,
                         extra=_extra(meta))
            finished = None
        for waiting in claimed:
            if waiting is not successor or finished is None:
                self.handoff.unpark(waiting)
        if finished is not None:
            if successor is not None and parked is not None:
                self.handoff.hand_over(successor, finished.parked, parked.token, finished.retries)
            if finished.body is not None:
                staged = MessageProxy(dramatiq.Message.decode(finished.body))
                self.handoff.hand_over(staged, finished.staged, staged_token, finished.retries)
        if outcome != "retry":
            self.parking.announce(channel, offset)


def _prev_of(message: Any) -> int | None:
    try:
        meta = meta_of(message)
    except ProtocolError:
        return None
    return meta.prev if meta is not None else None


def _extra(meta: Meta) -> dict[str, Any]:
    return coordinates(meta.topic, meta.partition, meta.offset)
