"""Batch messages in a worker: start, decode, run, and settle every record of a batch at once.

A batch's copy is registered in the ledger under its first offset, so starts, heartbeats and the
bridge's liveness checks work as for one record. Its end settles every offset it carried in one
script call (:meth:`Ledger.finish_batch`): done, failed for good (dead-lettered by the bridge), or,
while dramatiq retries, alive under the first offset of the retry. A retry after
:class:`~bridge.BatchFailed` carries only the failed records: the actor's wrapper narrows the
message before dramatiq's ``Retries`` re-enqueues it.

A message of several partitions (``batch_by="topic"``) holds one part per partition. Each part is
started, registered and settled as the batch of its partition (all parts in one round trip each
way); a part the ledger does not let start here (done, fenced, running elsewhere) is left out of
the call, and the message is narrowed to the parts that ran.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dramatiq.middleware import SkipMessage

from ..batch import RECORDS, BatchFailed
from ..codecs import DecodeError
from ..keys import PartitionKeys
from ..ledger import BatchEnd, Ledger, LedgerError, Try
from ..logs import coordinates
from ..protocol import OPTION, Meta, Part, ProtocolError, meta_of
from ..record import Record, open_envelope
from ..registry import Handler
from .handoff import retries_of
from .identity import new_token, process_id, worker_id
from .signs import Signs

logger = logging.getLogger("bridge.worker")

_local = threading.local()

#: A record of a batch: (partition, offset).
Rid = tuple[int, int]


@dataclass(slots=True)
class Share:
    """One partition's part of the batch this thread runs: its keys and its registered copy."""

    keys: PartitionKeys
    part: Part
    copy: Try


@dataclass(slots=True)
class Running:
    """The batch this thread runs."""

    message_id: str
    meta: Meta
    shares: list[Share]
    records: list[Record]
    #: Records that never reach the actor: (partition, offset) -> failure detail.
    undecodable: dict[Rid, dict[str, Any]] = field(default_factory=dict)
    #: What the actor raised to report partial failure, and the records it names.
    partial: BatchFailed | None = None
    named: dict[Rid, BaseException | str] = field(default_factory=dict)
    message: Any = None

    @property
    def ids(self) -> list[Rid]:
        return [(r.partition, r.offset) for r in self.records]

    @property
    def span(self) -> str:
        return ", ".join(f"{self.meta.topic}[{s.part.partition}]@{s.part.offset}" for s in self.shares)


def current() -> Running | None:
    return getattr(_local, "running", None)


def _detail(error: dict[str, str], message: Any) -> dict[str, Any]:
    return {"error": error, "attempts": int(message.options.get("retries", 0)) or 1, "actor": message.actor_name}


def narrow(message: Any, keep: Iterable[Rid]) -> None:
    """Keep only the records ``keep`` in ``message`` (in place, so that a retry dramatiq enqueues
    from it carries just them, and only the parts that hold some)."""
    kept = set(keep)
    env = message.args[0]
    env[RECORDS] = [e for e in env[RECORDS] if (int(e["p"]), int(e["o"])) in kept]
    raw = message.options[OPTION]
    if raw.get("ps"):
        parts = [[p, e, a, [o for o in offsets if (p, o) in kept]] for p, e, a, offsets in raw["ps"]]
        raw["ps"] = parts = [part for part in parts if part[3]]
        raw["p"], raw["e"], raw["a"], raw["b"] = parts[0]
    else:
        raw["b"] = [o for o in raw["b"] if (int(raw["p"]), o) in kept]
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
        try:
            running.named = e.resolve(running.records)
        except ValueError as problem:
            raise ValueError(f"{problem} (the batch {running.span})") from e
        running.partial = e
        narrow(running.message, running.named)
        raise


class Batches:
    """The batch side of the ledger middleware. Thread-safe (state is per thread)."""

    def __init__(self, ledger: Callable[[], Ledger], start: Callable[[PartitionKeys, Try, str], tuple[str, int]],
                 signs: Signs, failed: Callable[[str], None], live: Callable[[], float]) -> None:
        self._ledger = ledger
        self._start = start
        self._signs = signs
        self._failed = failed
        self._live = live

    def _start_all(self, starts: Sequence[tuple[PartitionKeys, Try]]) -> list[tuple[str, int]]:
        """Start verdicts of every part: one part through the worker's batched starts, several in
        one round trip of their own."""
        if len(starts) == 1:
            keys, copy = starts[0]
            return [self._start(keys, copy, worker_id())]
        verdicts = self._ledger().start_and_finish_many(
            {keys: [(copy, worker_id())] for keys, copy in starts}, {}, process_id(), self._live())
        return [verdicts[keys][0] for keys, _ in starts]

    def admit(self, message: Any, meta: Meta, handler: Handler | None, max_json_depth: int,
              skip: Callable[[Any, str], SkipMessage]) -> None:
        """Start a batch's copy, or skip it (done, fenced, superseded, or another copy runs).

        Raises:
          SkipMessage: the batch does not run here.
          LedgerError: the ledger did not answer.
        """
        _local.running = None
        retries = retries_of(message)
        token = meta.token or new_token()
        parts = meta.all_parts()
        starts = [(PartitionKeys(meta.group, meta.topic, p.partition),
                   Try(p.offset, p.epoch, p.attempt, retries, token)) for p in parts]
        verdicts = self._start_all(starts)
        shares, known = [], 0
        for part, (keys, _), (verdict, found) in zip(parts, starts, verdicts, strict=True):
            if verdict == "run":
                shares.append((keys, part))
                known = max(known, found)
            else:
                # A copy that runs elsewhere and dies is dispatched again by the bridge.
                logger.info("not running the batch %s[%d]@%d (%d records): %s (epoch %d, attempt %d)", meta.topic,
                            part.partition, part.offset, len(part.batch), verdict, part.epoch, part.attempt,
                            extra=coordinates(meta.topic, part.partition, part.offset))
        if not shares:
            raise skip(message, str(verdicts[0][0]))
        if known > retries:
            message.options["retries"] = retries = known
        running = Running(message.message_id, meta, [
            Share(keys, part, Try(part.offset, part.epoch, part.attempt, retries, token)) for keys, part in shares
        ], [], message=message)
        for share in running.shares:
            self._signs.running((share.keys, share.part.offset), token,
                                (share.part.epoch, share.part.attempt, retries, token, worker_id()))
        ran = {part.partition for _, part in shares}
        for env in message.args[0][RECORDS]:
            rid = (int(env["p"]), int(env["o"]))
            if rid[0] not in ran:
                continue
            try:
                if handler is None:
                    raise DecodeError(f"no handler for actor {message.actor_name!r} in this worker")
                running.records.append(open_envelope(env, handler.key_codec, handler.value_codec, max_json_depth))
            except DecodeError as e:
                logger.error("undecodable record %s[%s]@%s in a batch: %s", meta.topic, rid[0], rid[1], e,
                             extra=coordinates(meta.topic, rid[0], rid[1]))
                running.undecodable[rid] = _detail({"type": "DecodeError", "message": str(e)}, message)
        if running.records and (running.undecodable or len(shares) < len(parts)):
            narrow(message, running.ids)
        if not running.records:
            self._write(running, (), {})
            raise skip(message, "no decodable record in the batch")
        _local.running = running

    def end(self, message: Any, exception: BaseException | None, delay_ms: int) -> bool:
        """Settle the batch this thread ran; False when it ran none."""
        running = current()
        if running is None or running.message_id != message.message_id:
            return False
        _local.running = None
        ids = running.ids
        failed: dict[Rid, dict[str, Any]] = {}
        retried: set[Rid] = set()
        if exception is None:
            done = set(ids)
        elif running.partial is not None and exception is running.partial:
            named = running.named
            done = {i for i in ids if i not in named}
            if message.failed:
                failed = {i: _detail(BatchFailed.describe(named[i]), message) for i in named}
            else:
                retried = set(named)
        else:
            done = set()
            if message.failed:
                error = {"type": type(exception).__name__, "message": str(exception)[:2000]}
                failed = {i: _detail(error, message) for i in ids}
            else:
                retried = set(ids)
        # Retries has counted this try already: a retry registers the next try's count.
        self._write(running, done, failed, retried, retries=retries_of(message), delay_ms=delay_ms)
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
        running = current()
        if running is not None and running.message_id == message.message_id:
            _local.running = None  # skipped after its start here: its registrations go too
            ids = running.ids
        else:
            retries = retries_of(message)
            running = Running(message.message_id, meta, [
                Share(PartitionKeys(meta.group, meta.topic, p.partition), p,
                      Try(p.offset, p.epoch, p.attempt, retries, "")) for p in meta.all_parts()
            ], [])
            ids = [(s.part.partition, o) for s in running.shares for o in s.part.batch]
        if message.failed:
            error = message.options.get("kdb_error") or (
                {"type": type(exception).__name__, "message": str(exception)[:2000]} if exception is not None
                else {"type": "Failed", "message": "message failed in the task broker"})
            self._write(running, (), {i: _detail(error, message) for i in ids})
        else:
            self._write(running, ids, {})
        return True

    def _write(self, running: Running, done: Iterable[Rid], failed: Mapping[Rid, dict[str, Any]],
               retried: Iterable[Rid] = (), *, retries: int | None = None, delay_ms: int = 0) -> None:
        """One end per part, all in one round trip: its done, failed (the undecodable too) and
        retried records; ``retries``: the count the retry registers under."""
        failed = {**running.undecodable, **failed}
        done, retried = list(done), list(retried)
        ends = []
        for share in running.shares:
            p = share.part.partition
            copy = share.copy if retries is None else replace(share.copy, retries=retries)
            again = [o for q, o in retried if q == p]
            ends.append((share.keys, BatchEnd(
                copy, sorted(o for q, o in done if q == p), {o: d for (q, o), d in failed.items() if q == p},
                min(again) if again else -1, delay_ms if again else 0,
            )))
            self._signs.finished((share.keys, share.part.offset), share.copy.token)
        try:
            self._ledger().finish_batch(ends, worker_id())
        except LedgerError as e:
            self._failed("finish")
            logger.error("%s: ledger write of a batch of %d failed, the bridge will dispatch it again: %s",
                         running.span, sum(len(s.part.batch) for s in running.shares), e,
                         extra=coordinates(running.meta.topic, running.meta.partition, running.meta.offset))
