"""The ack ledger: done facts per offset, kept in Redis.

Writers are the worker-side middleware (a record started, finished, finally failed) and the
bridge (assignment epochs, failures it has settled, pruning below the committed offset). Every
write is idempotent: the same offset may finish twice. Done facts outlive the assignment that
produced them; starts are fenced by the partition's epoch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis

from .errors import LedgerUnavailable
from .keys import LANES_KEY, PartitionKeys

StartResult = Literal["run", "fenced", "done", "superseded"]

# KEYS: epoch, done, running, attempts.  ARGV: offset, message epoch, running-entry JSON, attempt.
_START = """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 2 end
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current > tonumber(ARGV[2]) then return 0 end
local attempt = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '1')
if tonumber(ARGV[4]) < attempt then return 3 end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
return 1
"""

# KEYS: done, running, failed, beats, attempts.
# ARGV: offset, outcome ('done' | 'failed' | 'retry'), detail JSON.
_FINISH = """
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
if ARGV[2] == 'done' then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[5], ARGV[1])
elseif ARGV[2] == 'failed' then
  if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[3])
  end
end
return 1
"""

# KEYS: done, then hashes keyed by offset.  ARGV: committed offset.
# Drops facts below the committed offset: Kafka's committed offset covers them.
_PRUNE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
local floor = tonumber(ARGV[1])
for i = 2, #KEYS do
  for _, field in ipairs(redis.call('HKEYS', KEYS[i])) do
    if tonumber(field) < floor then redis.call('HDEL', KEYS[i], field) end
  end
end
return 1
"""

_START_CODES: dict[int, StartResult] = {0: "fenced", 1: "run", 2: "done", 3: "superseded"}


@dataclass(frozen=True, slots=True)
class Progress:
    """What the ledger knows about a span of offsets of one partition."""

    done: list[int]
    failed: dict[int, dict[str, Any]]


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A Redis client for the ledger with timeouts, so a stopped server cannot hang a caller."""
    options: dict[str, Any] = {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 30,
        "decode_responses": True,
    }
    options.update(kwargs)
    return redis.Redis.from_url(url, **options)


class Ledger:
    """Typed access to the ledger. Thread-safe (redis-py pools connections)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)
        self._prune = client.register_script(_PRUNE)

    # -- worker side ------------------------------------------------------------------------

    def start(self, keys: PartitionKeys, offset: int, epoch: int, worker: str, attempt: int = 1) -> StartResult:
        """Record that ``offset`` starts now; refuse it if it is done, its epoch is stale, or the
        bridge dispatched a newer copy of it."""
        entry = json.dumps({"e": epoch, "w": worker, "t": _now_ms()})
        try:
            code = self._start(
                keys=[keys.epoch, keys.done, keys.running, keys.attempts], args=[offset, epoch, entry, attempt]
            )
        except redis.RedisError as e:
            raise LedgerUnavailable(f"ledger start of {keys.topic}[{keys.partition}]@{offset}: {e}") from e
        return _START_CODES[int(code)]

    def finish(self, keys: PartitionKeys, offset: int, outcome: str, detail: Mapping[str, Any] | None = None) -> None:
        """Record the end of an attempt: ``done``, ``failed`` (final) or ``retry`` (not terminal)."""
        try:
            self._finish(
                keys=[keys.done, keys.running, keys.failed, keys.beats, keys.attempts],
                args=[offset, outcome, json.dumps(dict(detail or {}))],
            )
        except redis.RedisError as e:
            raise LedgerUnavailable(f"ledger {outcome} of {keys.topic}[{keys.partition}]@{offset}: {e}") from e

    def beat(self, running: Mapping[PartitionKeys, Iterable[int]]) -> None:
        """Mark records as still running now (liveness of long handlers)."""
        now = _now_ms()
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for keys, offsets in running.items():
                    pipe.hset(keys.beats, mapping=cast(Any, {str(o): now for o in offsets}))
                pipe.execute()
        except redis.RedisError as e:
            raise LedgerUnavailable(f"heartbeat: {e}") from e

    def lanes(self) -> dict[str, str]:
        """Lane name -> topic for every lane any bridge has opened."""
        try:
            raw = cast(dict[str, str], self.client.hgetall(LANES_KEY))
        except redis.RedisError as e:
            raise LedgerUnavailable(f"reading lanes: {e}") from e
        return dict(raw)

    # -- bridge side ------------------------------------------------------------------------

    def open_lanes(self, lanes: Mapping[str, str]) -> None:
        self._hset(LANES_KEY, lanes, "registering lanes")

    def bump_epochs(self, partitions: Sequence[PartitionKeys]) -> list[int]:
        """Start a new assignment epoch for each partition; older messages are fenced."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for keys in partitions:
                    pipe.incr(keys.epoch)
                    pipe.delete(keys.attempts)
                return [int(v) for v in pipe.execute()[::2]]
        except redis.RedisError as e:
            raise LedgerUnavailable(f"bumping epochs: {e}") from e

    def running(self, keys: PartitionKeys) -> dict[int, dict[str, Any]]:
        try:
            raw = cast(dict[str, str], self.client.hgetall(keys.running))
        except redis.RedisError as e:
            raise LedgerUnavailable(f"reading running records of {keys.topic}[{keys.partition}]: {e}") from e
        return {int(k): json.loads(v) for k, v in raw.items()}

    def last_seen(self, keys: PartitionKeys, offsets: Sequence[int]) -> dict[int, int]:
        """Wall-clock milliseconds of the latest start or heartbeat of each running offset."""
        if not offsets:
            return {}
        fields = [str(o) for o in offsets]
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hmget(keys.running, fields)
                pipe.hmget(keys.beats, fields)
                starts, beats = pipe.execute()
        except redis.RedisError as e:
            raise LedgerUnavailable(f"reading liveness of {keys.topic}[{keys.partition}]: {e}") from e
        seen: dict[int, int] = {}
        for offset, start, beat in zip(offsets, starts, beats, strict=True):
            times = [int(json.loads(start)["t"])] if start else []
            if beat:
                times.append(int(beat))
            if times:
                seen[offset] = max(times)
        return seen

    def next_attempt(self, keys: PartitionKeys, offset: int) -> int:
        """Number a new copy of ``offset``; workers refuse to start older copies."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hsetnx(keys.attempts, str(offset), 1)
                pipe.hincrby(keys.attempts, str(offset), 1)
                return int(pipe.execute()[1])
        except redis.RedisError as e:
            raise LedgerUnavailable(f"re-dispatching {keys.topic}[{keys.partition}]@{offset}: {e}") from e

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as e:
            raise LedgerUnavailable(f"ledger at {_safe_url(self.client)} does not answer: {e}") from e

    def done_from(self, keys: PartitionKeys, low: int) -> set[int]:
        try:
            raw = cast(list[str], self.client.zrangebyscore(keys.done, low, "+inf"))
        except redis.RedisError as e:
            raise LedgerUnavailable(f"reading done offsets of {keys.topic}[{keys.partition}]: {e}") from e
        return {int(v) for v in raw}

    def progress(self, spans: Mapping[PartitionKeys, tuple[int, int]]) -> dict[PartitionKeys, Progress]:
        """Done offsets and final failures inside each span, in one round trip."""
        if not spans:
            return {}
        items = list(spans.items())
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for keys, (low, high) in items:
                    pipe.zrangebyscore(keys.done, low, high)
                    pipe.hgetall(keys.failed)
                replies = pipe.execute()
        except redis.RedisError as e:
            raise LedgerUnavailable(f"reading ledger progress: {e}") from e
        result: dict[PartitionKeys, Progress] = {}
        for i, (keys, (low, high)) in enumerate(items):
            done = [int(v) for v in replies[2 * i]]
            failed = {int(k): json.loads(v) for k, v in replies[2 * i + 1].items() if low <= int(k) <= high}
            result[keys] = Progress(done, failed)
        return result

    def settle(self, keys: PartitionKeys, offsets: Iterable[int]) -> None:
        """Turn final failures the bridge has handled into done facts."""
        offsets = list(offsets)
        if not offsets:
            return
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.zadd(keys.done, {str(o): o for o in offsets})
                pipe.hdel(keys.failed, *[str(o) for o in offsets])
                pipe.hdel(keys.attempts, *[str(o) for o in offsets])
                pipe.execute()
        except redis.RedisError as e:
            raise LedgerUnavailable(f"settling failures of {keys.topic}[{keys.partition}]: {e}") from e

    def prune(self, committed: Mapping[PartitionKeys, int]) -> None:
        """Forget facts below each committed offset; Kafka's committed offset covers them."""
        try:
            for keys, offset in committed.items():
                self._prune(keys=[keys.done, keys.failed, keys.attempts, keys.beats], args=[offset])
        except redis.RedisError as e:
            raise LedgerUnavailable(f"pruning ledger: {e}") from e

    def publish_status(self, key: str, entries: Mapping[str, str]) -> None:
        self._hset(key, entries, "publishing status")

    def _hset(self, key: str, fields: Mapping[str, str], doing: str) -> None:
        if not fields:
            return
        try:
            self.client.hset(key, mapping=cast(Any, dict(fields)))
        except redis.RedisError as e:
            raise LedgerUnavailable(f"{doing}: {e}") from e


def _now_ms() -> int:
    return int(time.time() * 1000)


def _safe_url(client: redis.Redis) -> str:
    """host:port/db of a client, without credentials."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"
