"""What a worker checks of a bridge message before its actor runs, besides the ledger's start:
that it speaks a protocol version this worker knows, and that its key and value decode."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import dramatiq
from dramatiq.middleware import SkipMessage

from ..codecs import DecodeError
from ..logs import coordinates
from ..protocol import OPTION, Meta, UnknownVersion
from ..record import ENVELOPE_MARK, open_envelope, prepare
from ..registry import Handler
from .handoff import plain

logger = logging.getLogger("bridge.worker")

#: How long a message of an unknown protocol version waits in the delay queue before it is offered
#: to a worker again (one that knows the version, during a rolling upgrade).
REFUSED_DELAY_MS = 10_000


class Refusals:
    """Messages of a newer bridge: put back loudly instead of run under rules this worker does not
    know. Their successors wait for them, so nothing runs out of order. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._logged: dict[int, float] = {}

    def refuse(self, message: Any, error: UnknownVersion, broker: dramatiq.Broker) -> None:
        raw = message.options.get(OPTION) or {}
        where = f"{raw.get('t')}[{raw.get('p')}]@{raw.get('o')}"
        now = time.monotonic()
        with self._lock:
            due = now - self._logged.get(error.version, -1e9) >= 60.0
            if due:
                self._logged[error.version] = now
        if due:
            logger.error(
                "refusing %s: %s; upgrade this worker (workers before bridges). The record goes back to its lane "
                "and is offered again every %ds",
                where,
                error,
                REFUSED_DELAY_MS // 1000,
            )
        try:
            broker.enqueue(plain(message), delay=REFUSED_DELAY_MS)
        except Exception as e:
            logger.error("could not put %s back on its lane (the bridge dispatches it again): %s", where, e)


def decode(message: Any, meta: Meta, handler: Handler, max_json_depth: int) -> None:
    """Decode the record for the actor (handed over through :func:`bridge.record.prepare`).

    Raises:
      SkipMessage: undecodable bytes; the message is failed at once (retrying cannot fix them) and
      never reaches the actor.
    """
    if not message.args or not isinstance(message.args[0], dict):
        return
    env = message.args[0]
    if ENVELOPE_MARK not in env:
        return
    try:
        prepare(env, open_envelope(env, handler.key_codec, handler.value_codec, max_json_depth))
    except DecodeError as e:
        logger.error("undecodable record %s for %s: %s", meta.where, handler.name, e,
                     extra=coordinates(meta.topic, meta.partition, meta.offset))
        message.options["kdb_error"] = {"type": "DecodeError", "message": str(e)}
        message.fail()
        raise SkipMessage(str(e)) from None
