"""What the bridge and the workers exchange: the message metadata and the ledger's entries.

Every dramatiq message the bridge sends carries its coordinates in the ``kdb`` option, built and
read only here. The JSON the ledger's Lua scripts read (running entries, failure details) is
written only here too; ``lua/common.lua`` decodes it with ``cjson``, so field names, not
separators, are the contract.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Message option that carries the metadata.
OPTION = "kdb"

#: Protocol version this code writes for one record; workers refuse messages of a newer one.
#: Version 1 had no ``v`` field.
VERSION = 2

#: Version of batch messages (the ``b`` field): a worker that predates batches refuses them
#: instead of running a batch as one record.
BATCH_VERSION = 3

#: Version of batch messages that hold several partitions' records (the ``ps`` field, from
#: ``batch_by="topic"``): a worker that predates them refuses them instead of settling only the
#: first partition's records.
TOPIC_BATCH_VERSION = 4

#: Versions a worker of this code can run.
KNOWN_VERSIONS = frozenset({1, 2, 3, 4})


class ProtocolError(ValueError):
    """A message whose metadata this worker cannot read."""


class UnknownVersion(ProtocolError):
    """A message written by a newer bridge than this worker understands."""

    def __init__(self, version: int) -> None:
        super().__init__(f"protocol version {version}; this worker runs versions {sorted(KNOWN_VERSIONS)}")
        self.version = version


class Reason(enum.StrEnum):
    """Why a record went to its dead-letter topic (the ``kdb.reason`` header)."""

    FINAL_FAILURE = "final-failure"
    UNDECODABLE = "undecodable"
    TOO_LARGE = "too-large"
    #: Its workers kept dying while running it (``max_redispatches``).
    STUCK = "stuck"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class Part:
    """One partition's records in a batch message: its epoch, the copy's attempt number and the
    offsets, in order. The part's copy is registered in the ledger under its first offset."""

    partition: int
    epoch: int
    attempt: int
    batch: tuple[int, ...]

    @property
    def offset(self) -> int:
        return self.batch[0]


@dataclass(frozen=True, slots=True)
class Meta:
    """A bridge message's coordinates.

    ``attempt`` numbers the bridge's copies of one record (a re-dispatch is a new attempt);
    ``prev`` is the record of the same partition (key) that must reach a final state first, -1
    for none; ``token`` is set on a record whose start another worker already recorded on its
    behalf, so that its own start check recognises that registration as its own. A batch message
    lists its offsets in ``batch``; one of several partitions lists every partition's in ``parts``
    (the first part is also ``partition``, ``offset``, ``epoch``, ``attempt`` and ``batch``).
    """

    group: str
    topic: str
    partition: int
    offset: int
    epoch: int
    attempt: int = 1
    prev: int = -1
    token: str | None = None
    version: int = VERSION
    batch: tuple[int, ...] = ()
    parts: tuple[Part, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"

    def all_parts(self) -> tuple[Part, ...]:
        """The partitions of a batch message: ``parts``, or the one partition of ``batch``."""
        return self.parts or (Part(self.partition, self.epoch, self.attempt, self.batch),)

    def to_option(self) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "v": self.version,
            "g": self.group,
            "t": self.topic,
            "p": self.partition,
            "o": self.offset,
            "e": self.epoch,
        }
        if self.attempt != 1:
            raw["a"] = self.attempt
        if self.prev >= 0:
            raw["pv"] = self.prev
        if self.token is not None:
            raw["s"] = self.token
        if self.batch:
            raw["b"] = list(self.batch)
        if self.parts:
            raw["ps"] = [[p.partition, p.epoch, p.attempt, list(p.batch)] for p in self.parts]
        return raw

    @classmethod
    def from_option(cls, raw: Mapping[str, Any]) -> Meta:
        """Read the ``kdb`` option.

        Raises:
          UnknownVersion: the message comes from a newer bridge.
          ProtocolError: the option is malformed.
        """
        version = raw.get("v", 1)
        if not isinstance(version, int) or isinstance(version, bool):
            raise ProtocolError(f"protocol version {version!r} is not an integer")
        if version not in KNOWN_VERSIONS:
            raise UnknownVersion(version)
        token = raw.get("s")
        batch = raw.get("b") or ()
        if not isinstance(batch, list | tuple):
            raise ProtocolError(f"malformed {OPTION} option {dict(raw)!r}: b is not a list")
        listed = raw.get("ps")
        try:
            parts: tuple[Part, ...] = ()
            if listed or batch:  # most messages carry one record: no lists to read
                parts = tuple(
                    Part(int(p), int(e), int(a), tuple(int(o) for o in offsets)) for p, e, a, offsets in listed or ()
                )
                if any(not part.batch for part in parts):
                    raise ValueError("a part lists no offset")
                batch = tuple(int(o) for o in batch)
            return cls(
                group=str(raw["g"]),
                topic=str(raw["t"]),
                partition=int(raw["p"]),
                offset=int(raw["o"]),
                epoch=int(raw["e"]),
                attempt=int(raw.get("a", 1)),
                prev=int(raw.get("pv", -1)),
                # Version 1 marked a recorded start with ``"s": 1``, which names no registration.
                token=token if isinstance(token, str) else None,
                version=version,
                batch=tuple(batch),
                parts=parts,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed {OPTION} option {dict(raw)!r}: {e}") from None


def meta_of(message: Any) -> Meta | None:
    """The metadata of a dramatiq message, or None for a message the bridge did not send.

    Raises:
      ProtocolError: see :meth:`Meta.from_option`.
    """
    raw = message.options.get(OPTION)
    if not raw:
        return None
    return Meta.from_option(raw)


@dataclass(frozen=True, slots=True)
class Registration:
    """A worker's claim on a record, in the ledger's ``running`` hash (written by the scripts).

    ``state`` is ``run`` while a copy runs and ``retry`` while dramatiq holds its retry in a delay
    queue; ``seen`` is the Redis clock (ms) of the last sign of life, for a retry its eta.
    """

    epoch: int
    attempt: int
    retries: int
    token: str
    worker: str
    seen: int
    state: str

    @classmethod
    def decode(cls, raw: str) -> Registration:
        data = json.loads(raw)
        return cls(
            epoch=int(data.get("e", 0)),
            attempt=int(data.get("a", 1)),
            retries=int(data.get("r", 0)),
            token=str(data.get("k", "")),
            worker=str(data.get("w", "")),
            seen=int(data.get("t", 0)),
            state=str(data.get("s", "run")),
        )


def registration_json(epoch: int, attempt: int, retries: int, token: str, worker: str) -> str:
    """A running entry without its time, for the heartbeat to restore after a ledger loss."""
    return json.dumps({"e": epoch, "a": attempt, "r": retries, "k": token, "w": worker, "s": "run"})


def failure_json(epoch: int, detail: Mapping[str, Any]) -> str:
    """A final failure's detail as the ledger stores it: the epoch it happened in comes along,
    because a failure of an older epoch never releases the current owner's records."""
    return json.dumps({**detail, "e": epoch})


def failure_epoch(detail: Mapping[str, Any]) -> int | None:
    """The epoch a failure was recorded under; None for details written by version 1 workers."""
    epoch = detail.get("e")
    return int(epoch) if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def staged_value(offset: int, epoch: int, attempt: int, body: bytes) -> str:
    """How a staged record is stored: offset, epoch, attempt and its encoded message."""
    return f"{offset}|{epoch}|{attempt}|{body.decode()}"
