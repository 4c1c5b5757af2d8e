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

from .errors import LedgerAccessDenied, LedgerUnavailable
from .keys import LANES_KEY, PartitionKeys

StartResult = Literal["run", "fenced", "done", "superseded", "wait"]

# The start and finish scripts take the same keys of one partition (see _script_keys).
_PRELUDE = """
local epoch_key, done, running, attempts, failed, floor, fresh, beats, staged = unpack(KEYS)
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# A record may start unless it is done, its epoch is stale, the bridge dispatched a newer copy,
# or its predecessor (the previous record of its partition or key in the same epoch) has not
# reached a final state: that last check is what keeps a pipelined lane in order.
# Codes: 0 fenced, 1 run, 2 done, 3 superseded, 4 wait.
# A superseded start (3) is also a second copy of an attempt that is running and alive (started
# or heartbeat within ``live`` ms): a send whose answer was lost and that the bridge sent again
# must not run twice at once. A copy of a worker that died runs again, and so does dramatiq's
# retry of a failed try (its retry count "r" is higher).
_START_FUNCTION = """
local function start(live, offset, epoch, entry, attempt, prev)
  if redis.call('ZSCORE', done, offset) then
    redis.call('RPUSH', fresh, offset)
    return 2
  end
  if tonumber(redis.call('GET', epoch_key) or '0') > tonumber(epoch) then return 0 end
  if tonumber(attempt) < tonumber(redis.call('HGET', attempts, offset) or '1') then return 3 end
  local copy = redis.call('HGET', running, offset)
  local copy_attempt = tonumber(copy and string.match(copy, '"a": (%d+)') or '1')
  local copy_retries = tonumber(copy and string.match(copy, '"r": (%d+)') or '0')
  local retries = tonumber(string.match(entry, '"r": (%d+)') or '0')
  if copy and (copy_attempt > tonumber(attempt) or copy_attempt == tonumber(attempt) and copy_retries >= retries) then
    local seen = math.max(tonumber(string.match(copy, '"t": (%d+)') or '0'),
                          tonumber(redis.call('HGET', beats, offset) or '0'))
    if now_ms() - seen < tonumber(live) then return 3 end
  end
  local p = tonumber(prev)
  if p >= 0 and p >= tonumber(redis.call('GET', floor) or '-1')
      and not redis.call('ZSCORE', done, prev) and redis.call('HEXISTS', failed, prev) == 0 then
    return 4
  end
  redis.call('HSET', running, offset, entry)
  return 1
end
"""

# ARGV: offset, message epoch, running-entry JSON, attempt, predecessor offset (-1: none), live ms.
_START = (
    _PRELUDE
    + _START_FUNCTION
    + """
return start(ARGV[6], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
"""
)

# ARGV: offset, outcome ('done' | 'failed' | 'retry'), detail JSON, channel, handoff ('1': take
# the staged successor), worker, live ms, and optionally the successor parked in the same worker
# process: its offset, epoch, running-entry JSON, attempt.
# Final states are queued for the owning bridge and announced to waiting successors. The
# successor is started in the same round trip: the parked one ({code}), else the one the bridge
# staged ({code, message}, skipping staged records that are done already), else nothing ({-1}).
_FINISH = (
    _PRELUDE
    + _START_FUNCTION
    + """
local offset, outcome, live = ARGV[1], ARGV[2], ARGV[7]
redis.call('HDEL', running, offset)
redis.call('HDEL', beats, offset)
if outcome == 'done' then
  redis.call('ZADD', done, offset, offset)
  redis.call('HDEL', failed, offset)
  redis.call('HDEL', attempts, offset)
  redis.call('RPUSH', fresh, offset)
  redis.call('PUBLISH', ARGV[4], offset)
elseif outcome == 'failed' then
  if not redis.call('ZSCORE', done, offset) then
    redis.call('HSETNX', failed, offset, ARGV[3])
    redis.call('RPUSH', fresh, 'f' .. offset)
    redis.call('PUBLISH', ARGV[4], offset)
  end
else
  return {-1}
end
if #ARGV >= 11 then
  return {start(live, ARGV[8], ARGV[9], ARGV[10], ARGV[11], offset)}
end
if ARGV[5] ~= '1' then return {-1} end
local prev = offset
while true do
  local queued = redis.call('HGET', staged, prev)
  if not queued then return {-1} end
  redis.call('HDEL', staged, prev)
  local o, e, a, body = string.match(queued, '^(%d+)|(%d+)|(%d+)|(.*)$')
  local entry = '{"e": ' .. e .. ', "w": ' .. cjson.encode(ARGV[6]) .. ', "t": ' .. now_ms()
    .. ', "a": ' .. a .. ', "r": 0}'
  local code = start(live, o, e, entry, a, prev)
  if code ~= 2 then return {code, body} end
  prev = o
end
"""
)

# KEYS: done, failed, floor, staged.  ARGV: pairs of predecessor offset and staged value.
# Stages each record behind its predecessor, unless the predecessor reached a final state
# already: those records are returned (by pair index) for the bridge to put on the lane.
_STAGE = """
local late = {}
local floor = tonumber(redis.call('GET', KEYS[3]) or '-1')
for i = 1, #ARGV, 2 do
  local prev = ARGV[i]
  if tonumber(prev) < floor or redis.call('ZSCORE', KEYS[1], prev) or redis.call('HEXISTS', KEYS[2], prev) == 1 then
    table.insert(late, (i + 1) / 2)
  else
    redis.call('HSET', KEYS[4], prev, ARGV[i + 1])
  end
end
return late
"""

# KEYS: done, floor, then hashes keyed by offset.  ARGV: committed offset.
# Drops facts below the committed offset: Kafka's committed offset covers them.
_PRUNE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
local floor = tonumber(ARGV[1])
if floor > tonumber(redis.call('GET', KEYS[2]) or '-1') then redis.call('SET', KEYS[2], floor) end
for i = 3, #KEYS do
  for _, field in ipairs(redis.call('HKEYS', KEYS[i])) do
    if tonumber(field) < floor then redis.call('HDEL', KEYS[i], field) end
  end
end
return 1
"""

_START_CODES: dict[int, StartResult] = {0: "fenced", 1: "run", 2: "done", 3: "superseded", 4: "wait"}


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
        self._stage = client.register_script(_STAGE)

    # -- worker side ------------------------------------------------------------------------

    def start(
        self,
        keys: PartitionKeys,
        offset: int,
        epoch: int,
        worker: str,
        attempt: int = 1,
        prev: int = -1,
        live: float = 15.0,
        retries: int = 0,
    ) -> StartResult:
        """Record that ``offset`` starts now; refuse it if it is done, its epoch is stale, or the
        bridge dispatched a newer copy of it; ``wait`` while its predecessor ``prev`` runs."""
        entry = _running_entry(epoch, worker, attempt, retries)
        try:
            code = self._start(keys=_script_keys(keys), args=[offset, epoch, entry, attempt, prev, int(live * 1000)])
        except redis.RedisError as e:
            raise _failure(f"ledger start of {keys.topic}[{keys.partition}]@{offset}", e) from e
        return _START_CODES[int(code)]

    def finish(
        self,
        keys: PartitionKeys,
        offset: int,
        outcome: str,
        detail: Mapping[str, Any] | None = None,
        successor: tuple[int, int, str, int, int] | None = None,
        *,
        handoff: bool = False,
        worker: str = "",
        live: float = 15.0,
    ) -> tuple[StartResult | None, bytes | None]:
        """Record the end of an attempt: ``done``, ``failed`` (final) or ``retry`` (not terminal).

        When the outcome is final, the next record of the partition (key) is started in the same
        round trip: ``successor`` (offset, epoch, worker, attempt, retries), a record parked in this
        process, or else with ``handoff`` the record the bridge staged behind this one. Returns
        that start's verdict and, for a staged record, its encoded message.
        """
        args: list[Any] = [offset, outcome, json.dumps(dict(detail or {})), keys.finished_channel]
        args += ["1" if handoff else "0", worker, int(live * 1000)]
        if successor is not None:
            next_offset, epoch, worker_id, attempt, retries = successor
            args += [next_offset, epoch, _running_entry(epoch, worker_id, attempt, retries), attempt]
        try:
            reply = self._finish(keys=_script_keys(keys), args=args)
        except redis.RedisError as e:
            raise _failure(f"ledger {outcome} of {keys.topic}[{keys.partition}]@{offset}", e) from e
        verdict = _START_CODES.get(int(reply[0]))
        body = reply[1] if len(reply) > 1 else None
        return verdict, body.encode() if isinstance(body, str) else body

    def stage(self, staged: Mapping[PartitionKeys, Sequence[tuple[int, str]]]) -> dict[PartitionKeys, list[int]]:
        """Stage records behind their predecessors, one round trip for all partitions. Returns,
        per partition, the indexes of records whose predecessor had finished already: those
        belong on the lane."""
        items = [(keys, pairs) for keys, pairs in staged.items() if pairs]
        if not items:
            return {}
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for keys, pairs in items:
                    args = [v for prev, value in pairs for v in (prev, value)]
                    self._stage(keys=[keys.done, keys.failed, keys.floor, keys.staged], args=args, client=pipe)
                replies = pipe.execute()
        except redis.RedisError as e:
            raise _failure("staging records", e) from e
        return {keys: [int(i) - 1 for i in late] for (keys, _), late in zip(items, replies, strict=True)}

    def beat(self, running: Mapping[PartitionKeys, Iterable[int]]) -> None:
        """Mark records as still running now (liveness of long handlers)."""
        now = _now_ms()
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for keys, offsets in running.items():
                    pipe.hset(keys.beats, mapping=cast(Any, {str(o): now for o in offsets}))
                pipe.execute()
        except redis.RedisError as e:
            raise _failure("heartbeat", e) from e

    def lanes(self) -> dict[str, str]:
        """Lane name -> topic for every lane any bridge has opened."""
        try:
            raw = cast(dict[str, str], self.client.hgetall(LANES_KEY))
        except redis.RedisError as e:
            raise _failure("reading lanes", e) from e
        return dict(raw)

    # -- bridge side ------------------------------------------------------------------------

    def open_lanes(self, lanes: Mapping[str, str]) -> None:
        self._hset(LANES_KEY, lanes, "registering lanes")

    def bump_epochs(self, partitions: Mapping[PartitionKeys, int]) -> list[int]:
        """Start a new assignment epoch for each partition (keys -> committed offset, -1 for none);
        older messages are fenced, and the committed offset becomes the floor of done records."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for keys, committed in partitions.items():
                    pipe.incr(keys.epoch)
                    pipe.delete(keys.attempts, keys.staged)
                    pipe.set(keys.floor, committed)
                return [int(v) for v in pipe.execute()[::3]]
        except redis.RedisError as e:
            raise _failure("bumping epochs", e) from e

    def running(self, keys: PartitionKeys) -> dict[int, dict[str, Any]]:
        try:
            raw = cast(dict[str, str], self.client.hgetall(keys.running))
        except redis.RedisError as e:
            raise _failure(f"reading running records of {keys.topic}[{keys.partition}]", e) from e
        return {int(k): json.loads(v) for k, v in raw.items()}

    def last_seen(self, keys: PartitionKeys, offsets: Sequence[int]) -> dict[int, int]:
        """Wall-clock milliseconds of the latest start or heartbeat of each running offset."""
        if not offsets:
            return {}
        starts, beats = self._per_offset(keys, offsets, "liveness", keys.running, keys.beats)
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
            raise _failure(f"re-dispatching {keys.topic}[{keys.partition}]@{offset}", e) from e

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as e:
            raise _failure(f"ledger at {_safe_url(self.client)} does not answer", e) from e

    def done_from(self, keys: PartitionKeys, low: int) -> set[int]:
        try:
            raw = cast(list[str], self.client.zrangebyscore(keys.done, low, "+inf"))
        except redis.RedisError as e:
            raise _failure(f"reading done offsets of {keys.topic}[{keys.partition}]", e) from e
        return {int(v) for v in raw}

    def completions(self, partitions: Sequence[PartitionKeys], limit: int = 5000) -> dict[PartitionKeys, Progress]:
        """Take the offsets that reached a final state since the last call, with the details of
        final failures, in one round trip (two when there are failures)."""
        if not partitions:
            return {}
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for keys in partitions:
                    pipe.lpop(keys.fresh, limit)
                replies = pipe.execute()
            result: dict[PartitionKeys, Progress] = {}
            failures: list[tuple[PartitionKeys, list[int]]] = []
            for keys, reply in zip(partitions, replies, strict=True):
                if not reply:
                    continue
                done = [int(v) for v in reply if not v.startswith("f")]
                failed = sorted({int(v[1:]) for v in reply if v.startswith("f")})
                result[keys] = Progress(done, {})
                if failed:
                    failures.append((keys, failed))
            if failures:
                with self.client.pipeline(transaction=False) as pipe:
                    for keys, offsets in failures:
                        pipe.hmget(keys.failed, [str(o) for o in offsets])
                    details = pipe.execute()
                for (keys, offsets), values in zip(failures, details, strict=True):
                    # A failure settled or overtaken by a success meanwhile has no detail left.
                    result[keys].failed.update({o: json.loads(v) for o, v in zip(offsets, values, strict=True) if v})
        except redis.RedisError as e:
            raise _failure("reading ledger progress", e) from e
        return result

    def progress(self, keys: PartitionKeys, offsets: Sequence[int]) -> Progress:
        """Which of ``offsets`` are done or finally failed: the full check behind the
        notifications of :meth:`completions`."""
        if not offsets:
            return Progress([], {})
        scores, details = self._per_offset(keys, offsets, "progress", keys.done, keys.failed)
        done = [o for o, score in zip(offsets, scores, strict=True) if score is not None]
        failed = {o: json.loads(v) for o, v, score in zip(offsets, details, scores, strict=True) if v and score is None}
        return Progress(done, failed)

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
            raise _failure(f"settling failures of {keys.topic}[{keys.partition}]", e) from e

    def prune(self, committed: Mapping[PartitionKeys, int]) -> None:
        """Forget facts below each committed offset; Kafka's committed offset covers them."""
        try:
            for keys, offset in committed.items():
                self._prune(
                    keys=[keys.done, keys.floor, keys.failed, keys.attempts, keys.beats, keys.staged], args=[offset]
                )
        except redis.RedisError as e:
            raise _failure("pruning ledger", e) from e

    def _per_offset(
        self, keys: PartitionKeys, offsets: Sequence[int], doing: str, first: str, second: str
    ) -> tuple[list[Any], list[Any]]:
        """One value per offset from each of two keys (a sorted set's scores, or a hash's fields)."""
        fields = [str(o) for o in offsets]
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for key in (first, second):
                    (pipe.zmscore if key == keys.done else pipe.hmget)(key, fields)
                a, b = pipe.execute()
        except redis.RedisError as e:
            raise _failure(f"reading {doing} of {keys.topic}[{keys.partition}]", e) from e
        return a, b

    def publish_status(self, key: str, entries: Mapping[str, str]) -> None:
        self._hset(key, entries, "publishing status")

    def _hset(self, key: str, fields: Mapping[str, str], doing: str) -> None:
        if not fields:
            return
        try:
            self.client.hset(key, mapping=cast(Any, dict(fields)))
        except redis.RedisError as e:
            raise _failure(f"{doing}", e) from e


def _script_keys(keys: PartitionKeys) -> list[str]:
    """The keys of the start and finish scripts, in the order of their prelude."""
    return [
        keys.epoch,
        keys.done,
        keys.running,
        keys.attempts,
        keys.failed,
        keys.floor,
        keys.fresh,
        keys.beats,
        keys.staged,
    ]


def staged_value(offset: int, epoch: int, attempt: int, body: bytes) -> str:
    """How a staged record is stored: offset, epoch, attempt and its encoded message."""
    return f"{offset}|{epoch}|{attempt}|{body.decode()}"


def _running_entry(epoch: int, worker: str, attempt: int, retries: int = 0) -> str:
    return json.dumps({"e": epoch, "w": worker, "t": _now_ms(), "a": attempt, "r": retries})


def _now_ms() -> int:
    return int(time.time() * 1000)


def _failure(what: str, error: redis.RedisError) -> LedgerUnavailable:
    """The bridge's error for a failed ledger call: a refusal by Redis ACLs, or an outage."""
    text = str(error)
    if isinstance(error, redis.exceptions.NoPermissionError) or "no permissions" in text or "NOPERM" in text:
        return LedgerAccessDenied(
            f"{what}: the ledger's Redis user may not do this; give it the ACL rule in docs/security.md "
            f"(BRIDGE_REDIS_URL names the user): {error}"
        )
    return LedgerUnavailable(f"{what}: {error}")


def _safe_url(client: redis.Redis) -> str:
    """host:port/db of a client, without credentials."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"
