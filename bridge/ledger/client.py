"""The ack ledger: done facts per offset, kept in Redis.

Writers are the worker-side middleware (a record started, finished, finally failed, will be
retried) and the bridge (assignment epochs, failures it decided or settled, pruning below the
committed offset). Every write is idempotent: the same offset may finish twice. Done facts outlive
the assignment that produced them; starts are fenced by the partition's epoch, and a failure of an
older epoch never releases a record of a newer one.

The Lua scripts live in ``lua/`` beside this module (loaded by :mod:`bridge.ledger.scripts`); every
liveness decision in them reads the Redis clock (``TIME``), never a client's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, cast

import redis

from ..errors import LedgerAccessDenied, LedgerUnavailable
from ..keys import LANES_KEY, LANES_SEEN_KEY, PartitionKeys
from ..protocol import failure_json
from .batches import BatchEnd, batch_args, many_calls, pairs, stale_answer, stale_args
from .connection import safe_url
from .facts import START_CODES, Beats, End, Finished, Handover, Progress, Stale, StartResult, Try
from .scripts import SCRIPTS, failure, script

#: What a ledger call raises: an outage (retried) or a refused permission (fatal for the bridge).
LedgerError = (LedgerUnavailable, LedgerAccessDenied)


class Ledger:
    """Typed access to the ledger. Thread-safe (redis-py pools connections)."""

    def __init__(self, client: redis.Redis | redis.RedisCluster) -> None:
        self.client = client
        self._scripts = {name: client.register_script(script(name)) for name in SCRIPTS}
        self._seen_lanes = client.register_script(script("lanes_seen", common=False))
        self._expired_lanes = client.register_script(script("lanes_expired", common=False))

    def _run(self, name: str, keys: PartitionKeys, args: Sequence[Any]) -> Any:
        return self._scripts[name](keys=keys.encoded_script_keys, args=list(args))

    def _batch(self, calls: Sequence[tuple[str, PartitionKeys, Sequence[Any]]]) -> list[Any]:
        """Run scripts in one pipeline. EVALSHA straight away: redis-py would first ask SCRIPT
        EXISTS, a round trip of its own. After Redis lost its script cache (a restart) they are
        loaded and run again; every script is idempotent or harmless to repeat."""
        for attempt in (1, 2):
            with self.client.pipeline(transaction=False) as pipe:
                for name, keys, args in calls:
                    key_names = keys.encoded_script_keys
                    pipe.evalsha(self._scripts[name].sha, len(key_names), *key_names, *args)
                try:
                    return list(pipe.execute())
                except redis.exceptions.NoScriptError:
                    if attempt == 2:
                        raise
                    for loaded in self._scripts.values():
                        self.client.script_load(loaded.script)
        raise AssertionError("unreachable")

    # -- worker side ------------------------------------------------------------------------

    def start(self, keys: PartitionKeys, copy: Try, worker: str, prev: int = -1, live: float = 15.0) -> tuple[
        StartResult, int
    ]:
        """Record that a copy of a record starts now, unless it is done, fenced by a newer epoch,
        superseded by a newer copy, behind a predecessor that has not finished (``wait``) or
        behind another copy of itself that is running (``duplicate``). Returns the verdict and the
        retry count the copy continues with."""
        args = [copy.offset, copy.epoch, copy.attempt, copy.retries, copy.token, worker, prev, int(live * 1000)]
        try:
            code, retries = self._run("start", keys, args)
        except redis.RedisError as e:
            raise failure(f"ledger start of {keys.topic}[{keys.partition}]@{copy.offset}", e) from e
        return START_CODES[int(code)], int(retries)

    def finish(
        self,
        keys: PartitionKeys,
        copy: Try,
        outcome: Literal["done", "failed", "retry"],
        *,
        detail: Mapping[str, Any] | None = None,
        delay_ms: int = 0,
        worker: str = "",
        handoff: bool = False,
        successor_token: str = "",
        parked: Try | None = None,
        live: float = 15.0,
    ) -> Finished:
        """Record the end of one try: ``done``, ``failed`` (final) or ``retry`` (dramatiq holds it in
        a delay queue for ``delay_ms``; it stays alive meanwhile).

        When the outcome is final, the next record of the partition (key) is started in the same
        round trip: ``parked``, a record waiting in this process, else with ``handoff`` the record
        the bridge staged behind this one (registered under ``successor_token``).
        """
        args: list[Any] = [copy.offset, outcome, copy.epoch, copy.attempt, copy.retries, copy.token]
        args += [failure_json(copy.epoch, detail or {}), delay_ms, int(live * 1000), keys.finished_channel]
        args += ["1" if handoff else "0", worker, successor_token]
        if parked is not None:
            args += [parked.offset, parked.epoch, parked.attempt, parked.retries, parked.token]
        try:
            reply = self._run("finish", keys, args)
        except redis.RedisError as e:
            raise failure(f"ledger {outcome} of {keys.topic}[{keys.partition}]@{copy.offset}", e) from e
        parked_code, staged_code = int(reply[0]), int(reply[1])
        body = reply[2] if len(reply) > 2 else None
        return Finished(
            parked=START_CODES.get(parked_code),
            staged=START_CODES.get(staged_code),
            body=body.encode() if isinstance(body, str) else None,
            retries=int(reply[3]) if len(reply) > 3 else 0,
        )

    def start_and_finish_many(
        self,
        starts: Mapping[PartitionKeys, Sequence[tuple[Try, str]]],
        ends: Mapping[PartitionKeys, Sequence[End]],
        worker: str,
        live: float = 15.0,
    ) -> dict[PartitionKeys, list[tuple[StartResult, int]]]:
        """Starts without a predecessor ((copy, worker) each, as :meth:`start`) and ends without a
        successor (``none`` mode) in one round trip; returns each start's verdict and retry count."""
        calls: list[tuple[str, PartitionKeys, Sequence[Any]]] = []
        asked: list[tuple[PartitionKeys, int]] = []
        for keys in {**ends, **starts}:
            for args, n in many_calls(keys, ends.get(keys, ()), starts.get(keys, ()), worker, live):
                calls.append(("many", keys, args))
                asked.append((keys, n))
        if not calls:
            return {}
        try:
            answers = self._batch(calls)
        except redis.RedisError as e:
            raise failure("recording started and finished records", e) from e
        verdicts: dict[PartitionKeys, list[tuple[StartResult, int]]] = {}
        for (keys, n), answer in zip(asked, answers, strict=True):
            if n:
                verdicts.setdefault(keys, []).extend(
                    (START_CODES[int(answer[i])], int(answer[i + 1])) for i in range(0, len(answer), 2)
                )
        return verdicts

    def finish_batch(self, ends: Sequence[tuple[PartitionKeys, BatchEnd]], worker: str) -> list[int]:
        """Settle one try of a batch, one script call per partition (each part settles at once), all
        in one round trip; returns how many offsets of each part reached a final state."""
        try:
            return [int(n) for n in self._batch([("batch", k, batch_args(k, end, worker)) for k, end in ends])]
        except redis.RedisError as e:
            keys, end = ends[0]
            raise failure(f"ledger end of the batch at {keys.topic}[{keys.partition}]@{end.copy.offset}", e) from e

    def beat(self, beats: Mapping[PartitionKeys, Beats]) -> None:
        """Signs of life of the records running or parked in this process, one round trip."""
        calls = []
        for keys, found in beats.items():
            args: list[Any] = [len(found.running)]
            for offset, token, entry in found.running:
                args += [offset, token, entry]
            calls.append(("beat", keys, [*args, *found.parked]))
        try:
            self._batch(calls)
        except redis.RedisError as e:
            raise failure("heartbeat", e) from e

    def lanes(self) -> dict[str, str]:
        """Lane name -> topic for every lane any bridge has opened."""
        try:
            return dict(cast(dict[str, str], self.client.hgetall(LANES_KEY)))
        except redis.RedisError as e:
            raise failure("reading lanes", e) from e

    # -- bridge side ------------------------------------------------------------------------

    def open_lanes(self, lanes: Mapping[str, str]) -> None:
        """Register lanes for the workers (again: a ledger that lost them gets them back)."""
        if not lanes:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hset(LANES_KEY, mapping=cast(Any, dict(lanes)))
                self._seen_lanes(keys=[LANES_SEEN_KEY], args=list(lanes), client=pipe)
                pipe.execute()
        except redis.RedisError as e:
            raise failure("registering lanes", e) from e

    def forget_lanes(self, older_than_ms: int) -> list[str]:
        """Drop lanes no bridge has registered for ``older_than_ms`` (deleted partitions)."""
        try:
            gone = cast(list[str], self._expired_lanes(keys=[LANES_SEEN_KEY], args=[older_than_ms]))
            if gone:
                self.client.hdel(LANES_KEY, *gone)
        except redis.RedisError as e:
            raise failure("forgetting lanes", e) from e
        return list(gone)

    def bump_epochs(self, partitions: Mapping[PartitionKeys, tuple[int, int]]) -> list[int]:
        """Start a new assignment epoch for each partition: keys -> (committed offset or -1, the
        last epoch this bridge knew for it or 0). Older messages are fenced, and the committed
        offset becomes the floor of done records."""
        try:
            return [int(v) for v in self._batch([("bump", k, [c, known]) for k, (c, known) in partitions.items()])]
        except redis.RedisError as e:
            raise failure("bumping epochs", e) from e

    def epochs(self, partitions: Sequence[PartitionKeys]) -> list[int | None]:
        """The current epoch of each partition; None where the ledger has none (lost)."""
        if not partitions:
            return []
        names = [keys.epoch for keys in partitions]
        try:  # one command however many partitions (on a cluster, one per slot)
            client = self.client
            got = client.mget_nonatomic(names) if isinstance(client, redis.RedisCluster) else client.mget(names)
        except redis.RedisError as e:
            raise failure("reading epochs", e) from e
        return [int(v) if v is not None else None for v in got]

    def retire(self, partitions: Sequence[PartitionKeys], ttl: int) -> None:
        """Let the keys of partitions this bridge gave up expire unless a new owner takes them
        (its epoch bump keeps them): a deleted partition leaves nothing behind."""
        if not partitions:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for keys in partitions:
                    for key in keys.script_keys:
                        pipe.expire(key, ttl)
                pipe.execute()
        except redis.RedisError as e:
            raise failure("retiring partitions", e) from e

    def handover(
        self, partitions: Mapping[PartitionKeys, tuple[int, int]], live: float
    ) -> dict[PartitionKeys, Handover]:
        """For each partition (keys -> (epoch, first offset)), in one round trip: the records of
        older epochs still running, and the done and finally failed offsets from that offset on."""
        items = list(partitions.items())
        if not items:
            return {}
        try:
            replies = self._batch([("handover", k, [e, int(live * 1000), max(start, 0)]) for k, (e, start) in items])
        except redis.RedisError as e:
            raise failure("reading the ledger for newly assigned partitions", e) from e
        result = {}
        for (keys, _), (running, done, failed) in zip(items, replies, strict=True):
            result[keys] = Handover(
                running=sorted(int(o) for o in running),
                done={int(o) for o in done},
                failed=pairs(failed),
            )
        return result

    def stale(self, partitions: Mapping[PartitionKeys, Sequence[int]], timeout: float,
              limits: Mapping[PartitionKeys, tuple[int | None, int]] | None = None,
              live: float = 15.0) -> dict[PartitionKeys, Stale]:
        """Look at dispatched records that showed no progress, one round trip for all partitions:
        done or failed meanwhile, or without a sign of life for ``timeout`` (judged on the Redis
        clock; a scheduled retry's sign of life is its eta): those get a new attempt number. With
        ``limits`` (keys -> (max_redispatches or None, the owner's epoch)), a record whose copies
        died running (no sign of life for ``live``) more often than that, none running now, is
        recorded as a final failure with reason ``stuck``."""
        items = [(keys, offsets) for keys, offsets in partitions.items() if offsets]
        if not items:
            return {}
        given = limits or {}
        calls = [("stale", k, stale_args(k, found, timeout, *given.get(k, (None, 0)), live)) for k, found in items]
        try:
            replies = self._batch(calls)
        except redis.RedisError as e:
            raise failure("checking records without progress", e) from e
        return {keys: stale_answer(reply) for (keys, _), reply in zip(items, replies, strict=True)}

    def fail(self, failures: Mapping[PartitionKeys, Sequence[tuple[int, int, Mapping[str, Any]]]]) -> None:
        """Record final failures the bridge decided itself: keys -> (offset, epoch, detail)."""
        items = [(keys, found) for keys, found in failures.items() if found]
        if not items:
            return
        calls = [
            ("fail", keys, [offset, epoch, failure_json(epoch, detail), keys.finished_channel])
            for keys, found in items
            for offset, epoch, detail in found
        ]
        try:
            self._batch(calls)
        except redis.RedisError as e:
            raise failure("recording failures", e) from e

    def stage(
        self,
        epochs: Mapping[PartitionKeys, int],
        staged: Mapping[PartitionKeys, Sequence[tuple[int, str]]],
        live: float,
    ) -> dict[PartitionKeys, list[int]]:
        """Stage records behind their predecessors, one round trip for all partitions. Returns,
        per partition, the indexes of records whose predecessor had released them already: those
        belong on the lane."""
        items = [(keys, pairs) for keys, pairs in staged.items() if pairs]
        if not items:
            return {}
        calls = [
            ("stage", keys, [epochs[keys], int(live * 1000), *(v for prev, value in pairs for v in (prev, value))])
            for keys, pairs in items
        ]
        try:
            replies = self._batch(calls)
        except redis.RedisError as e:
            raise failure("staging records", e) from e
        return {keys: [int(i) - 1 for i in late] for (keys, _), late in zip(items, replies, strict=True)}

    def running(self, keys: PartitionKeys) -> dict[int, dict[str, Any]]:
        try:
            return {int(k): json.loads(v) for k, v in cast(dict[str, str], self.client.hgetall(keys.running)).items()}
        except redis.RedisError as e:
            raise failure(f"reading running records of {keys.topic}[{keys.partition}]", e) from e

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as e:
            raise failure(f"ledger at {safe_url(self.client)} does not answer", e) from e

    def done_from(self, keys: PartitionKeys, low: int) -> set[int]:
        try:
            return {int(v) for v in cast(list[str], self.client.zrangebyscore(keys.done, low, "+inf"))}
        except redis.RedisError as e:
            raise failure(f"reading done offsets of {keys.topic}[{keys.partition}]", e) from e

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
            raise failure("reading ledger progress", e) from e
        return result

    def settle(self, keys: PartitionKeys, offsets: Iterable[int]) -> None:
        """Turn final failures the bridge has handled into done facts."""
        offsets = list(offsets)
        if not offsets:
            return
        try:
            self._run("settle", keys, offsets)
        except redis.RedisError as e:
            raise failure(f"settling failures of {keys.topic}[{keys.partition}]", e) from e

    def prune(self, committed: Mapping[PartitionKeys, int]) -> None:
        """Forget facts below each committed offset; Kafka's committed offset covers them."""
        if not committed:
            return
        try:
            self._batch([("prune", keys, [offset]) for keys, offset in committed.items()])
        except redis.RedisError as e:
            raise failure("pruning ledger", e) from e

    def time_ms(self) -> int:
        """The Redis clock, the one every bridge, worker and ``status`` compares against."""
        try:
            seconds, micros = self.client.time()
        except redis.RedisError as e:
            raise failure("reading the ledger's clock", e) from e
        return int(seconds) * 1000 + int(micros) // 1000

    def publish_status(self, key: str, entries: Mapping[str, str]) -> None:
        if not entries:
            return
        try:
            self.client.hset(key, mapping=cast(Any, dict(entries)))
        except redis.RedisError as e:
            raise failure("publishing status", e) from e
