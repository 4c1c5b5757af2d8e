"""The ledger's side of operator commands: pauses, requests to the bridge that owns a partition,
the bridges' presence, the audit log, and the partition scripts of ``skip``, ``pause`` and
``reset-offsets``.

The group's keys (``kdb:{group}:*``, one Redis Cluster hash slot):

* ``paused``: hash, ``topic`` or ``topic:partition`` -> ``{"since": ms, "by": "user@host"}``
* ``control``: hash, ``version`` (raised by every pause and resume) and ``last`` (that command)
* ``requests``: hash, request id -> a command for the owning bridge (``skip``)
* ``reply:<id>``: the owning bridge's answer to a request (expires)
* ``bridges``: hash, ``host:pid`` -> ``{"t": ms, "v": version applied, "owned": partitions}``
* ``audit``: list of the last :data:`AUDIT_LENGTH` commands, oldest first

Times are the Redis clock in milliseconds, the one every process compares against.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import redis

from ..keys import PartitionKeys, group_key, status_key
from ..protocol import Registration, failure_json
from .connection import LedgerClient
from .scripts import failure, script

#: Commands the audit log keeps per group.
AUDIT_LENGTH = 1000

#: A bridge that showed itself this recently counts as running (its loop writes every
#: half second; a revoke may keep it draining for ``BRIDGE_DRAIN_TIMEOUT``, 20 s by default).
PRESENCE_TIMEOUT_MS = 30_000

#: Entries of bridges gone longer than this are dropped when read.
_FORGET_MS = 3_600_000

#: How long an answer to a request is kept.
_REPLY_TTL = 300

#: A request no bridge took for this long is dropped unapplied: its command gave up waiting.
REQUEST_TTL_MS = 60_000


def iso(ms: int) -> str:
    """A Redis clock time for people: ``2026-03-01T10:15:02Z``."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pause_field(topic: str, partition: int | None) -> str:
    """How a pause is keyed: ``orders`` (the whole topic) or ``orders:3``."""
    return topic if partition is None else f"{topic}:{partition}"


@dataclass(frozen=True, slots=True)
class Pause:
    """An operator's pause of a whole topic (``partition`` None) or of one partition."""

    topic: str
    partition: int | None
    since_ms: int
    by: str

    @classmethod
    def decode(cls, field: str, raw: str) -> Pause:
        topic, _, partition = field.partition(":")
        data = json.loads(raw)
        return cls(topic, int(partition) if partition else None, int(data["since"]), str(data["by"]))


@dataclass(frozen=True, slots=True)
class Command:
    """An operator command as the audit log and the bridges' logs name it."""

    text: str
    by: str
    at_ms: int

    def to_json(self) -> str:
        return json.dumps({"command": self.text, "by": self.by, "at": self.at_ms})

    @classmethod
    def decode(cls, raw: str) -> Command:
        data = json.loads(raw)
        return cls(str(data["command"]), str(data["by"]), int(data["at"]))


@dataclass(frozen=True, slots=True)
class Sync:
    """What a bridge reads each time it looks: the pauses, the requests, the last command."""

    version: int
    last: Command | None
    pauses: dict[str, Pause]
    requests: dict[str, dict[str, Any]]
    #: The Redis clock when it was read (ms).
    now_ms: int


@dataclass(frozen=True, slots=True)
class Presence:
    """A bridge of the group as it last showed itself."""

    instance: str
    age_ms: int
    version: int
    owned: int


class ControlStore:
    """The group's operator state. Thread-safe (redis-py pools connections); every call raises
    :class:`~bridge.errors.LedgerUnavailable` or :class:`~bridge.errors.LedgerAccessDenied`."""

    def __init__(self, client: LedgerClient, group: str) -> None:
        self.client = client
        self.group = group
        self.paused_key = group_key(group, "paused")
        self.control_key = group_key(group, "control")
        self.requests_key = group_key(group, "requests")
        self.bridges_key = group_key(group, "bridges")
        self.audit_key = group_key(group, "audit")
        self._control = client.register_script(script("control", common=False))
        self._pauses = client.register_script(script("pauses", common=False))
        self._skip = client.register_script(script("skip"))
        self._unstage = client.register_script(script("unstage"))
        self._reset = client.register_script(script("reset"))

    def _reply_key(self, request_id: str) -> str:
        return group_key(self.group, f"reply:{request_id}")

    # -- the bridge's side ------------------------------------------------------------------

    def sync(self, instance: str, owned: int) -> Sync:
        """Show this bridge as present (with the command version it is about to apply) and read
        the pauses and requests, in one round trip."""
        keys = [self.control_key, self.paused_key, self.requests_key, self.bridges_key]
        try:
            version, last, pauses, requests, now = self._control(keys=keys, args=[instance, owned])
        except redis.RedisError as e:
            raise failure("reading operator commands", e) from e
        return Sync(
            version=int(version),
            last=Command.decode(last) if last else None,
            pauses={f: Pause.decode(f, v) for f, v in _pairs(pauses)},
            requests={f: json.loads(v) for f, v in _pairs(requests)},
            now_ms=int(now),
        )

    def leave(self, instance: str) -> None:
        """This bridge stopped: it no longer counts as running."""
        try:
            self.client.hdel(self.bridges_key, instance)
        except redis.RedisError as e:
            raise failure("removing the bridge's presence", e) from e

    def claim(self, request_id: str) -> bool:
        """Take a request; False when another bridge (or a withdrawal) took it first."""
        try:
            return bool(self.client.hdel(self.requests_key, request_id))
        except redis.RedisError as e:
            raise failure("taking an operator request", e) from e

    def reply(self, request_id: str, answer: Mapping[str, Any]) -> None:
        try:
            self.client.set(self._reply_key(request_id), json.dumps(dict(answer)), ex=_REPLY_TTL)
        except redis.RedisError as e:
            raise failure("answering an operator request", e) from e

    def skip(self, keys: PartitionKeys, offset: int, epoch: int, detail: Mapping[str, Any]) -> int:
        """Give a record up (lua/skip.lua): 1 given up, 0 done already, 2 failed for good already,
        3 a newer owner."""
        args: list[int | str] = [offset, epoch, failure_json(epoch, detail), keys.finished_channel]
        try:
            return int(cast(int, self._skip(keys=keys.script_keys, args=args)))
        except redis.RedisError as e:
            raise failure(f"skipping {keys.topic}[{keys.partition}]@{offset}", e) from e

    def unstage(self, keys: PartitionKeys, epoch: int) -> list[int]:
        """Take back the records staged in ``epoch``; their offsets."""
        try:
            return [int(o) for o in cast(list[int], self._unstage(keys=keys.script_keys, args=[epoch]))]
        except redis.RedisError as e:
            raise failure(f"taking back the staged records of {keys.topic}[{keys.partition}]", e) from e

    # -- the commands' side -----------------------------------------------------------------

    def now_ms(self) -> int:
        try:
            seconds, micros = self.client.time()
        except redis.RedisError as e:
            raise failure("reading the ledger's clock", e) from e
        return int(seconds) * 1000 + int(micros) // 1000

    def pauses(self) -> dict[str, Pause]:
        try:
            raw = cast(dict[str, str], self.client.hgetall(self.paused_key))
        except redis.RedisError as e:
            raise failure("reading pauses", e) from e
        return {f: Pause.decode(f, v) for f, v in raw.items()}

    def change_pauses(self, add: Pause | None, remove: Iterable[str], command: Command) -> int:
        """Record a pause or remove pauses, as one command; the new command version."""
        added = ["", ""]
        if add is not None:
            added = [pause_field(add.topic, add.partition), json.dumps({"since": add.since_ms, "by": add.by})]
        try:
            version = self._pauses(keys=[self.paused_key, self.control_key],
                                   args=[command.to_json(), *added, *remove])
        except redis.RedisError as e:
            raise failure("recording the pause", e) from e
        return int(cast(int, version))

    def bridges(self) -> list[Presence]:
        """The bridges that showed themselves within :data:`PRESENCE_TIMEOUT_MS`, by name."""
        now = self.now_ms()
        try:
            raw = cast(dict[str, str], self.client.hgetall(self.bridges_key))
        except redis.RedisError as e:
            raise failure("reading the group's bridges", e) from e
        found, gone = [], []
        for instance, value in sorted(raw.items()):
            data = json.loads(value)
            age = now - int(data.get("t", 0))
            if age > _FORGET_MS:
                gone.append(instance)
            elif age <= PRESENCE_TIMEOUT_MS:
                found.append(Presence(instance, max(age, 0), int(data.get("v", 0)), int(data.get("owned", 0))))
        if gone:
            try:
                self.client.hdel(self.bridges_key, *gone)
            except redis.RedisError as e:
                raise failure("forgetting bridges gone long ago", e) from e
        return found

    def post(self, request: Mapping[str, Any]) -> str:
        """Leave a request for the bridge that owns its partition; its id."""
        request_id = uuid.uuid4().hex
        try:
            self.client.hset(self.requests_key, request_id, json.dumps({**request, "id": request_id}))
        except redis.RedisError as e:
            raise failure("posting the request", e) from e
        return request_id

    def answer(self, request_id: str) -> dict[str, Any] | None:
        try:
            raw = self.client.get(self._reply_key(request_id))
        except redis.RedisError as e:
            raise failure("reading the answer", e) from e
        return json.loads(cast(str, raw)) if raw else None

    def withdraw(self, request_id: str) -> bool:
        """Take a request back; False when a bridge took it already."""
        return self.claim(request_id)

    def audit(self, command: Command, outcome: str, *, ok: bool) -> None:
        """Append a command and its outcome to the group's audit log."""
        entry = json.dumps({"at": command.at_ms, "by": command.by, "command": command.text, "ok": ok,
                            "outcome": outcome})
        try:
            length = int(self.client.rpush(self.audit_key, entry))
            if length > AUDIT_LENGTH:
                self.client.lpop(self.audit_key, length - AUDIT_LENGTH)
        except redis.RedisError as e:
            raise failure("writing the audit log", e) from e

    def history(self, limit: int = AUDIT_LENGTH) -> list[dict[str, Any]]:
        """The last ``limit`` entries of the audit log, oldest first."""
        try:
            raw = cast(list[str], self.client.lrange(self.audit_key, -limit, -1))
        except redis.RedisError as e:
            raise failure("reading the audit log", e) from e
        return [json.loads(v) for v in raw]

    def state(self, keys: PartitionKeys, offset: int) -> str | None:
        """``done`` or ``failed`` when the ledger shows the record so, else None."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.zscore(keys.done, offset)
                pipe.hexists(keys.failed, offset)
                done, failed = pipe.execute()
        except redis.RedisError as e:
            raise failure(f"reading {keys.topic}[{keys.partition}]@{offset}", e) from e
        return "done" if done is not None else "failed" if failed else None

    def running(self, keys: PartitionKeys, now_ms: int, live_ms: int) -> list[int]:
        """Offsets of the copies that run now (a sign of life within ``live_ms``)."""
        try:
            raw = cast(dict[str, str], self.client.hgetall(keys.running))
        except redis.RedisError as e:
            raise failure(f"reading running records of {keys.topic}[{keys.partition}]", e) from e
        found = []
        for offset, value in raw.items():
            copy = Registration.decode(value)
            if copy.state == "run" and now_ms - copy.seen < live_ms:
                found.append(int(offset))
        return sorted(found)

    def reset(self, keys: PartitionKeys, offset: int, live_ms: int) -> tuple[bool, list[int]]:
        """Forget the partition's facts for a group that starts again at ``offset``
        (lua/reset.lua): (True, [new epoch]), or (False, offsets of copies still running)."""
        try:
            code, *rest = cast(list[int], self._reset(keys=keys.script_keys, args=[offset, live_ms]))
        except redis.RedisError as e:
            raise failure(f"resetting the ledger of {keys.topic}[{keys.partition}]", e) from e
        return bool(int(code)), [int(v) for v in rest]

    def forget_status(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Drop the summaries bridges published for these partitions (they describe the old run)."""
        fields = [f"{t}|{p}" for t, p in partitions]
        if not fields:
            return
        try:
            self.client.hdel(status_key(self.group), *fields)
        except redis.RedisError as e:
            raise failure("dropping old status summaries", e) from e


def _pairs(flat: list[str]) -> list[tuple[str, str]]:
    return list(zip(flat[::2], flat[1::2], strict=True))
