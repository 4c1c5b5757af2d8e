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
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware, Retries, SkipMessage

from .codecs import DecodeError
from .errors import LedgerUnavailable
from .handlers import handler_for_actor, handlers_by_topic
from .keys import PartitionKeys
from .ledger import Ledger, connect
from .record import ENVELOPE_MARK, open_envelope, prepare

logger = logging.getLogger("bridge.worker")

#: Message option that carries the bridge's coordinates: group, topic, partition, offset, epoch.
OPTION = "kdb"


def _coordinates(message: Any) -> tuple[PartitionKeys, int, int, int] | None:
    """Partition keys, offset, epoch and attempt of a bridge message."""
    meta = message.options.get(OPTION)
    if not meta:
        return None
    keys = PartitionKeys(meta["g"], meta["t"], int(meta["p"]))
    return keys, int(meta["o"]), int(meta["e"]), int(meta.get("a", 1))


class LedgerMiddleware(Middleware):
    """Writes start, success, final failure and skip of bridge messages to the ledger."""

    def __init__(
        self,
        redis_url: str | None = None,
        lane_refresh_interval: float | None = None,
        heartbeat_interval: float | None = None,
    ) -> None:
        self._redis_url = redis_url
        self._lane_refresh_interval = lane_refresh_interval
        self._heartbeat_interval = heartbeat_interval
        self._ledger: Ledger | None = None
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
                self._ledger = Ledger(connect(url))
            return self._ledger

    # -- lanes and heartbeats ---------------------------------------------------------------

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._stop.clear()
        self._declare_lanes(broker)
        self._watcher = threading.Thread(target=self._background, args=(broker,), name="kdb-worker", daemon=True)
        self._watcher.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._stop.set()

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
        self._local.ours = None
        found = _coordinates(message)
        if found is None:
            return
        keys, offset, epoch, attempt = found
        where = f"{keys.topic}[{keys.partition}]@{offset}"
        verdict = self.ledger.start(keys, offset, epoch, _worker_id(), attempt)
        if verdict != "run":
            # fenced: the partition's new owner dispatches the record again; superseded: the
            # bridge dispatched a newer copy; done: a duplicate delivery of a finished record.
            # Nothing is written either way.
            self._local.ours = message.message_id
            logger.info("not running %s: %s (epoch %d, attempt %d)", where, verdict, epoch, attempt)
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
            logger.error("undecodable record %s for %s: %s", where, handler.name, e)
            message.options["kdb_error"] = {"type": "DecodeError", "message": str(e)}
            message.fail()
            raise SkipMessage(str(e)) from None

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

    def _finish(self, message: Any, outcome: str, exception: BaseException | None = None) -> None:
        found = _coordinates(message)
        if found is None:
            return
        keys, offset, _, _ = found
        with self._lock:
            count = self._running.pop((keys, offset), 0)
            if count > 1:
                self._running[(keys, offset)] = count - 1
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
        try:
            self.ledger.finish(keys, offset, outcome, detail)
        except LedgerUnavailable as e:
            self.ledger_write_failures += 1
            logger.error("ledger write failed (%s), the bridge will dispatch it again: %s", outcome, e)


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
