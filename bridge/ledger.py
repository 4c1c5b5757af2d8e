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

StartResult = Literal["run", "fenced", "done"]

# KEYS: epoch, done, running.  ARGV: offset, message epoch, running-entry JSON.
_START = """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 2 end
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
return 1
"""

# KEYS: done, running, failed.  ARGV: offset, outcome ('done' | 'failed' | 'retry'), detail JSON.
_FINISH = """
redis.call('HDEL', KEYS[2], ARGV[1])
if ARGV[2] == 'done' then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
elseif ARGV[2] == 'failed' then
  if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[3])
  end
end
return 1
"""

# KEYS: done, failed.  ARGV: committed offset.  Drops facts below the committed offset.
_PRUNE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
local floor = tonumber(ARGV[1])
for _, field in ipairs(redis.call('HKEYS', KEYS[2])) do
  if tonumber(field) < floor then redis.call('HDEL', KEYS[2], field) end
end
return 1
"""

_START_CODES: dict[int, StartResult] = {0: "fenced", 1: "run", 2: "done"}


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

    def start(self, keys: PartitionKeys, offset: int, epoch: int, worker: str) -> StartResult:
        """Record that ``offset`` starts now; refuse it if its epoch is stale or it is done."""
        entry = json.dumps({"e": epoch, "w": worker, "t": int(time.time() * 1000)})
        try:
            code = self._start(keys=[keys.epoch, keys.done, keys.running], args=[offset, epoch, entry])
        except redis.RedisError as e:
            raise LedgerUnavailable(f"ledger start of {keys.topic}[{keys.partition}]@{offset}: {e}") from e
        return _START_CODES[int(code)]

    def finish(self, keys: PartitionKeys, offset: int, outcome: str, detail: Mapping[str, Any] | None = None) -> None:
        """Record the end of an attempt: ``done``, ``failed`` (final) or ``retry`` (not terminal)."""
        try:
            self._finish(
                keys=[keys.done, keys.running, keys.failed],
                args=[offset, outcome, json.dumps(dict(detail or {}))],
            )
        except redis.RedisError as e:
            raise LedgerUnavailable(f"ledger {outcome} of {keys.topic}[{keys.partition}]@{offset}: {e}") from e

    def lanes(self) -> dict[str, str]:
        """Lane name -> topic for every lane any bridge has opened."""
        try:
            raw = cast(dict[str, str], self.client.hgetall(LANES_KEY))
        except redis.RedisError as e:
            raise LedgerUnavailable(f"reading lanes: {e}") from e
        return dict(raw)

    # -- bridge side ------------------------------------------------------------------------

    def open_lanes(self, lanes: Mapping[str, str]) -> None:
        if not lanes:
            return
        try:
            self.client.hset(LANES_KEY, mapping=cast(Any, dict(lanes)))
        except redis.RedisError as e:
            raise LedgerUnavailable(f"registering lanes: {e}") from e

    def bump_epochs(self, partitions: Sequence[PartitionKeys]) -> list[int]:
        """Start a new assignment epoch for each partition; older messages are fenced."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for keys in partitions:
                    pipe.incr(keys.epoch)
                return [int(v) for v in pipe.execute()]
        except redis.RedisError as e:
            raise LedgerUnavailable(f"bumping epochs: {e}") from e

    def running(self, keys: PartitionKeys) -> dict[int, dict[str, Any]]:
        try:
            raw = cast(dict[str, str], self.client.hgetall(keys.running))
        except redis.RedisError as e:
            raise LedgerUnavailable(f"reading running records of {keys.topic}[{keys.partition}]: {e}") from e
        return {int(k): json.loads(v) for k, v in raw.items()}

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
                pipe.execute()
        except redis.RedisError as e:
            raise LedgerUnavailable(f"settling failures of {keys.topic}[{keys.partition}]: {e}") from e

    def prune(self, committed: Mapping[PartitionKeys, int]) -> None:
        """Forget facts below each committed offset; Kafka's committed offset covers them."""
        try:
            for keys, offset in committed.items():
                self._prune(keys=[keys.done, keys.failed], args=[offset])
        except redis.RedisError as e:
            raise LedgerUnavailable(f"pruning ledger: {e}") from e

    def publish_status(self, key: str, entries: Mapping[str, str]) -> None:
        if not entries:
            return
        try:
            self.client.hset(key, mapping=cast(Any, dict(entries)))
        except redis.RedisError as e:
            raise LedgerUnavailable(f"publishing status: {e}") from e
