"""The :class:`Record` an actor receives, and the envelope that carries it through the task broker."""

from __future__ import annotations

import base64
import binascii
import contextvars
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import codecs

Headers = tuple[tuple[str, bytes | None], ...]

#: Marks a dramatiq message argument as a bridge envelope.
ENVELOPE_MARK = "kdb"
ENVELOPE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record, as the handler sees it.

    ``key`` and ``value`` are decoded with the handler's codecs (raw ``bytes`` by default).
    ``headers`` keeps every header in order, duplicates and binary values included.
    ``timestamp`` is milliseconds since the epoch, or ``None`` when the record has none.
    Hashable by its coordinates (topic, partition, offset), even when its decoded key or value is
    a ``dict`` or ``list``: a batch handler names failed records in a dict (:class:`~bridge.BatchFailed`).
    """

    topic: str
    partition: int
    offset: int
    key: Any
    value: Any
    headers: Headers = ()
    timestamp: int | None = None

    def __hash__(self) -> int:
        # Equal records have equal coordinates, so this agrees with the generated __eq__.
        return hash((self.topic, self.partition, self.offset))

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name``, or ``None``."""
        for header_name, value in reversed(self.headers):
            if header_name == name:
                return value
        return None


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes | None:
    # What base64.b64decode does for a str, without its wrapper: this runs for every record.
    return None if text is None else binascii.a2b_base64(text)


def envelope(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes | None]] | None,
    timestamp: int | None,
) -> dict[str, Any]:
    """The JSON-safe form of a raw record, as the single argument of the dramatiq message."""
    return {
        ENVELOPE_MARK: ENVELOPE_VERSION,
        "t": topic,
        "p": partition,
        "o": offset,
        "k": _b64(key),
        "v": _b64(value),
        "h": [[name, _b64(data)] for name, data in headers] if headers else [],
        "ts": timestamp,
    }


def is_envelope(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    return not kwargs and len(args) == 1 and isinstance(args[0], dict) and ENVELOPE_MARK in args[0]


def raw_parts(env: Mapping[str, Any]) -> tuple[bytes | None, bytes | None, Headers]:
    """Raw key, value and headers of an envelope."""
    listed = env.get("h")
    headers = tuple((str(name), _unb64(data)) for name, data in listed) if listed else ()
    return _unb64(env.get("k")), _unb64(env.get("v")), headers


def open_envelope(
    env: Mapping[str, Any], key_codec: str, value_codec: str, max_json_depth: int = codecs.MAX_JSON_DEPTH
) -> Record:
    """Decode an envelope into a :class:`Record`; raises :class:`codecs.DecodeError` naming the part."""
    raw_key, raw_value, headers = raw_parts(env)
    try:
        key = codecs.decode(key_codec, raw_key, max_json_depth)
    except codecs.DecodeError as e:
        raise codecs.DecodeError(f"key ({key_codec} codec): {e}") from None
    try:
        value = codecs.decode(value_codec, raw_value, max_json_depth)
    except codecs.DecodeError as e:
        raise codecs.DecodeError(f"value ({value_codec} codec): {e}") from None
    return Record(
        topic=env["t"],
        partition=int(env["p"]),
        offset=int(env["o"]),
        key=key,
        value=value,
        headers=headers,
        timestamp=env.get("ts"),
    )


_current: contextvars.ContextVar[Record | None] = contextvars.ContextVar("kdb_current_record", default=None)


def current_record() -> Record:
    """The record whose handler is running in this thread.

    Raises:
      LookupError: when called outside a bridge handler.
    """
    record = _current.get()
    if record is None:
        raise LookupError("current_record() called outside a Kafka handler")
    return record


_prepared = threading.local()


def prepare(env: Mapping[str, Any], record: Record) -> None:
    """Hand a record decoded by the middleware to the actor running next in this thread."""
    _prepared.item = (env.get("t"), env.get("p"), env.get("o"), record)


def take_prepared(env: Mapping[str, Any]) -> Record | None:
    item = getattr(_prepared, "item", None)
    _prepared.item = None
    if item is not None and item[:3] == (env.get("t"), env.get("p"), env.get("o")):
        return item[3]  # type: ignore[no-any-return]
    return None
