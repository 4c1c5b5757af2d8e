"""Codecs turn a record's key or value bytes into what the actor receives.

Decoding happens in the worker, right before the actor runs; the bytes travel through the task
broker unchanged (base64 inside dramatiq's JSON messages), so nothing is lost on the way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

CodecName = Literal["bytes", "text", "json"]

CODECS: tuple[CodecName, ...] = ("bytes", "text", "json")


#: Deepest nesting of arrays and objects the json codec accepts unless told otherwise (workers
#: pass ``BRIDGE_MAX_JSON_DEPTH``): deeper documents are refused as undecodable instead of
#: exhausting the handler's stack later.
MAX_JSON_DEPTH = 128


class DecodeError(ValueError):
    """The bytes are not valid for the codec."""


def _json(data: bytes, max_depth: int) -> Any:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise DecodeError(f"not valid JSON: {e}") from None
    # Nesting cannot be deeper than the document has opening brackets (those in strings count
    # too, which only errs towards walking it): most documents skip the walk.
    if data.count(b"[") + data.count(b"{") > max_depth and _deeper_than(value, max_depth):
        raise DecodeError(f"JSON nested deeper than {max_depth} levels (BRIDGE_MAX_JSON_DEPTH)")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _text(data: bytes, max_depth: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError(f"not valid UTF-8: {e}") from None


_DECODERS: dict[str, Callable[[bytes, int], Any]] = {
    "bytes": lambda data, _: data,
    "text": _text,
    "json": _json,
}


def decode(codec: str, data: bytes | None, max_json_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode ``data`` with ``codec``; ``None`` (a tombstone or missing key) stays ``None``."""
    if data is None:
        return None
    return _DECODERS[codec](data, max_json_depth)
