"""Batch messages in a worker: start, decode, run, and settle every record of a batch at once.

A batch's copy is registered in the ledger under its first offset, so starts, heartbeats and the
bridge's liveness checks work as for one record. Its end settles every offset it carried in one
script call (:meth:`Ledger.finish_batch`): done, failed for good (dead-lettered by the bridge), or,
while dramatiq retries, alive under the first offset of the retry. A retry after
:class:`~bridge.BatchFailed` carries only the failed records: the actor's wrapper narrows the
message before dramatiq's ``Retries`` re-enqueues it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from dramatiq.middleware import SkipMessage

from ..batch import RECORDS, BatchFailed
from ..codecs import DecodeError
from ..keys import PartitionKeys
from ..ledger import BatchEnd, Ledger, LedgerError, Try
from ..logs import coordinates
from ..protocol import OPTION, Meta, ProtocolError, meta_of
from ..record import Record, open_envelope
from ..registry import Handler
from .handoff import retries_of
from .identity import new_token, worker_id
from .signs import Signs

logger = logging.getLogger("bridge.worker")

_local = threading.local()


@dataclass(slots=True)
class Running:
    """The batch this thread runs."""

    message_id: str
    meta: Meta
    keys: PartitionKeys
    copy: Try
    records: list[Record]
    #: Records that never reach the actor: offset -> failure detail.
    undecodable: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: What the actor raised to report partial failure (checked against the batch).
    partial: BatchFailed | None = None
    message: Any = None

    @property
    def offsets(self) -> list[int]:
        return [r.offset for r in self.records]


def current() -> Running | None:
    return getattr(_local, "running", None)


def _detail(error: dict[str, str], message: Any) -> dict[str, Any]:
    return {"error": error, "attempts": int(message.options.get("retries", 0)) or 1, "actor": message.actor_name}


def narrow(message: Any, offsets: list[int]) -> None:
    """Keep only the records at ``offsets`` in ``message`` (in place, so that a retry dramatiq
    enqueues from it carries just them)."""
    keep = set(offsets)
    env = message.args[0]
    env[RECORDS] = [e for e in env[RECORDS] if int(e["o"]) in keep]
    raw = message.options[OPTION]
    raw["b"] = [o for o in raw["b"] if o in keep]
    raw["o"] = raw["b"][0]
    raw.pop("s", None)  # a retry registers itself anew


def run(env: dict[str, Any], handler: Handler, fn: Callable[[list[Record]], Any]) -> Any:
    """Call a batch actor's function with the batch's records (the actor's wrapper)."""
    running = current()
    if running is None:
        # Outside the middleware (a direct call with a batch envelope): decode here.
        records = [open_envelope(e, handler.key_codec, handler.value_codec) for e in env[RECORDS]]
        return fn(records)
    try:
        return fn(list(running.records))
    except BatchFailed as e:
        unknown = sorted(set(e.failed) - set(running.offsets))
        if unknown:
            raise ValueError(
                f"BatchFailed names offsets {unknown[:10]} that are not in the batch of "
                f"{running.meta.topic}[{running.meta.partition}] ({running.offsets[0]}..{running.offsets[-1]})"
            ) from e
        running.partial = e
        narrow(running.message, sorted(e.failed))
        raise


class Batches:
    """The batch side of the ledger middleware. Thread-safe (state is per thread)."""

    def __init__(self, ledger: Callable[[], Ledger], start: Callable[[PartitionKeys, Try, str], tuple[str, int]],
                 signs: Signs, failed: Callable[[str], None]) -> None:
        self._ledger = ledger
        self._start = start
        self._signs = signs
        self._failed = failed

    def admit(self, message: Any, meta: Meta, handler: Handler | None, max_json_depth: int,
              skip: Callable[[Any, str], SkipMessage]) -> None:
        """Start a batch's copy, or skip it (done, fenced, superseded, or another copy runs).

        Raises:
          SkipMessage: the batch does not run here.
          LedgerError: the ledger did not answer.
        """
        _local.running = None
        keys = PartitionKeys(meta.group, meta.topic, meta.partition)
        retries = retries_of(message)
        token = meta.token or new_token()
        verdict, known = self._start(keys, Try(meta.offset, meta.epoch, meta.attempt, retries, token), worker_id())
        if verdict != "run":
            # A copy that runs elsewhere and dies is dispatched again by the bridge.
            logger.info("not running the batch %s (%d records): %s (epoch %d, attempt %d)", meta.where,
                        len(meta.batch), verdict, meta.epoch, meta.attempt, extra=_extra(meta))
            raise skip(message, verdict)
        if known > retries:
            message.options["retries"] = retries = known
        copy = Try(meta.offset, meta.epoch, meta.attempt, retries, token)
        self._signs.running((keys, meta.offset), token, (meta.epoch, meta.attempt, retries, token, worker_id()))
        running = Running(message.message_id, meta, keys, copy, [], message=message)
        for env in message.args[0][RECORDS]:
            try:
                if handler is None:
                    raise DecodeError(f"no handler for actor {message.actor_name!r} in this worker")
                running.records.append(open_envelope(env, handler.key_codec, handler.value_codec, max_json_depth))
            except DecodeError as e:
                logger.error("undecodable record %s[%s]@%s in a batch: %s", meta.topic, meta.partition, env.get("o"),
                             e, extra=coordinates(meta.topic, meta.partition, int(env["o"])))
                running.undecodable[int(env["o"])] = _detail({"type": "DecodeError", "message": str(e)}, message)
        if running.undecodable and running.records:
            narrow(message, running.offsets)
        if not running.records:
            self._write(running, BatchEnd(copy, (), running.undecodable))
            raise skip(message, "no decodable record in the batch")
        _local.running = running

    def end(self, message: Any, exception: BaseException | None, delay_ms: int) -> bool:
        """Settle the batch this thread ran; False when it ran none."""
        running = current()
        if running is None or running.message_id != message.message_id:
            return False
        _local.running = None
        failed = dict(running.undecodable)
        offsets = running.offsets
        retry_at = -1
        if exception is None:
            done = offsets
        elif running.partial is not None and exception is running.partial:
            named = running.partial.failed
            done = [o for o in offsets if o not in named]
            if message.failed:
                failed.update({o: _detail(running.partial.detail(o), message) for o in named})
            else:
                retry_at = min(named)
        else:
            done = []
            if message.failed:
                error = {"type": type(exception).__name__, "message": str(exception)[:2000]}
                failed.update({o: _detail(error, message) for o in offsets})
            else:
                retry_at = offsets[0]
        # Retries has counted this try already: a retry registers the next try's count.
        copy = replace(running.copy, retries=retries_of(message))
        self._write(running, BatchEnd(copy, done, failed, retry_at, delay_ms if retry_at >= 0 else 0))
        return True

    def settle_unstarted(self, message: Any, exception: BaseException | None) -> bool:
        """Settle a batch that ended without running its actor here (skipped by another
        middleware, an unknown actor, expired): every record is done or failed for good. False
        for a message that is no batch."""
        try:
            meta = meta_of(message)
        except ProtocolError:
            return False
        if meta is None or not meta.batch:
            return False
        keys = PartitionKeys(meta.group, meta.topic, meta.partition)
        running = current()
        if running is not None and running.message_id == message.message_id:
            _local.running = None
            copy = running.copy  # skipped after its start here: its registration goes too
        else:
            copy = Try(meta.offset, meta.epoch, meta.attempt, retries_of(message), "")
        if message.failed:
            error = message.options.get("kdb_error") or (
                {"type": type(exception).__name__, "message": str(exception)[:2000]} if exception is not None
                else {"type": "Failed", "message": "message failed in the task broker"})
            end = BatchEnd(copy, (), {o: _detail(error, message) for o in meta.batch})
        else:
            end = BatchEnd(copy, meta.batch)
        self._write(Running(message.message_id, meta, keys, copy, []), end)
        return True

    def _write(self, running: Running, end: BatchEnd) -> None:
        meta = running.meta
        self._signs.finished((running.keys, meta.offset), running.copy.token)
        try:
            self._ledger().finish_batch(running.keys, end, worker_id())
        except LedgerError as e:
            self._failed("finish")
            logger.error("%s: ledger write of a batch of %d failed, the bridge will dispatch it again: %s",
                         meta.where, len(meta.batch), e, extra=_extra(meta))


def _extra(meta: Meta) -> dict[str, Any]:
    return coordinates(meta.topic, meta.partition, meta.offset)
