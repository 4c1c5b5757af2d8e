"""Batch handlers end to end, through real Kafka, Redis and dramatiq worker processes: order
across batches, partial failure, a worker killed mid-batch, flush on revoke and shutdown, and the
size guard. The batch actor (tests/support/batch_actors.py) writes one start and one end event
per call."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import redis

from tests.integration.test_bridge import wait_committed_to_end
from tests.integration.test_replay import replay
from tests.support.kafka import produce_keyed, read_raw
from tests.support.pipeline import Pipeline
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

EVENTS = "kdb-test:events"


@dataclass
class Call:
    topic: str
    partition: int
    offsets: list[int]
    pid: int
    token: str
    started: int
    ended: int | None = None
    outcome: str | None = None


@dataclass
class History:
    calls: list[Call] = field(default_factory=list)

    def partition(self, topic: str, partition: int) -> list[Call]:
        return [c for c in self.calls if (c.topic, c.partition) == (topic, partition)]

    def succeeded(self, topic: str, partition: int) -> set[int]:
        done: set[int] = set()
        for call in self.partition(topic, partition):
            if call.outcome == "ok":
                done.update(call.offsets)
            elif call.outcome and call.outcome.startswith("partial:"):
                failed = {int(o) for o in call.outcome.split(":", 1)[1].split(",")}
                done.update(set(call.offsets) - failed)
        return done


def read_history(client: redis.Redis) -> History:
    """Calls in the order they started; a call whose end is missing was killed."""
    history = History()
    open_calls: dict[str, Call] = {}
    for raw in client.lrange(EVENTS, 0, -1):
        parts = raw.decode().split("|")
        kind, topic, partition, offsets, pid, token, ms = parts[:7]
        if kind == "S":
            call = Call(topic, int(partition), [int(o) for o in offsets.split(",")], int(pid), token, int(ms))
            history.calls.append(call)
            open_calls[token] = call
        else:
            call = open_calls.pop(token)
            call.ended, call.outcome = int(ms), parts[7]
    return history


def assert_one_after_another(calls: list[Call], label: str) -> None:
    """Calls of one partition never overlap: each starts after the previous one ended."""
    for before, after in itertools.pairwise(calls):
        assert before.ended is not None and after.started >= before.ended, (
            f"{label}: the batch at {after.offsets[0]} started before the batch at {before.offsets[0]} ended"
        )


def batch_pipeline(
    pipeline_factory: Callable[..., Pipeline], topic: str, **options: str
) -> Pipeline:
    pipeline = pipeline_factory([topic], **options)
    pipeline.module = "tests.support.batch_actors"
    return pipeline


def test_batches_of_a_partition_run_one_after_another_in_order_and_commit_to_the_end(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(3)
    pipeline = batch_pipeline(pipeline_factory, topic, KDB_TEST_BATCH_SIZE="50", KDB_TEST_SLEEP_MS="20")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 3000)
    pipeline.start_workers(processes=2, threads=4)
    pipeline.start_bridge()
    ends = wait_committed_to_end(pipeline)
    assert pipeline.bridges[0].stop() == 0
    history = read_history(redis_client)
    for (t, p), end in ends.items():
        calls = history.partition(t, p)
        assert all(c.outcome == "ok" for c in calls)
        offsets = [o for c in calls for o in c.offsets]
        assert offsets == list(range(end)), f"{t}[{p}]: records missing, repeated or reordered"
        assert max(len(c.offsets) for c in calls) == 50
        assert len(calls) < end / 5, f"{t}[{p}]: {len(calls)} calls for {end} records: batches stayed small"
        assert_one_after_another(calls, f"{t}[{p}]")


def test_a_topic_batch_packs_several_low_volume_partitions_into_one_call_and_keeps_order_per_partition(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(6)
    pipeline = batch_pipeline(pipeline_factory, topic, KDB_TEST_BATCH_SIZE="40", KDB_TEST_BATCH_BY="topic",
                              KDB_TEST_BATCH_TIMEOUT="0.3", KDB_TEST_SLEEP_MS="30")
    pipeline.start_workers(processes=2, threads=4)
    pipeline.start_bridge().wait_log("assigned")
    # A trickle: a few records per partition at a time, far below a batch each.
    for _ in range(30):
        produce_keyed(pipeline.kafka.bootstrap_servers, topic, 18)
        time.sleep(0.1)
    ends = wait_committed_to_end(pipeline)
    assert pipeline.bridges[0].stop() == 0
    assert pipeline.committed() == ends
    history = read_history(redis_client)
    for (t, p), end in ends.items():
        calls = history.partition(t, p)
        assert all(c.outcome == "ok" for c in calls)
        assert [o for c in calls for o in c.offsets] == list(range(end)), f"{t}[{p}]: missing, repeated or reordered"
        assert_one_after_another(calls, f"{t}[{p}]")
    by_call: dict[str, set[int]] = {}
    for call in history.calls:
        by_call.setdefault(call.token.split("-")[0], set()).add(call.partition)
    joined = [partitions for partitions in by_call.values() if len(partitions) > 1]
    assert len(joined) > len(by_call) / 2, f"{len(joined)} of {len(by_call)} calls held several partitions"
    assert max(len(p) for p in joined) >= 3
    assert len(by_call) < sum(ends.values()) / 5, f"{len(by_call)} calls for {sum(ends.values())} records"


def dead_letters(pipeline: Pipeline, topic: str, expected: int) -> dict[int, dict[str, str]]:
    """Offset -> kdb.* headers of the dead letters of ``topic`` (each offset at most once)."""
    found: dict[int, dict[str, str]] = {}
    for message in read_raw(pipeline.kafka.bootstrap_servers, f"{topic}.dlq", expected):
        headers = {k: (v or b"").decode() for k, v in message.headers() or [] if k.startswith("kdb.")}
        offset = int(headers["kdb.offset"])
        assert offset not in found, f"offset {offset} dead-lettered twice"
        found[offset] = headers
    return found


def test_partial_failure_retries_only_the_named_records_and_dead_letters_only_them(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(1)
    pipeline = batch_pipeline(pipeline_factory, topic, KDB_TEST_BATCH_SIZE="40", KDB_TEST_FAIL_KEYS="13,57",
                              KDB_TEST_MAX_RETRIES="2")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 400)
    failing = {i for i in range(400) if i % 97 in (13, 57)}
    pipeline.start_workers(processes=1, threads=4)
    pipeline.start_bridge()
    wait_committed_to_end(pipeline)
    assert pipeline.bridges[0].stop() == 0
    history = read_history(redis_client)
    calls = history.partition(topic, 0)
    assert_one_after_another(calls, f"{topic}[0]")
    assert history.succeeded(topic, 0) == set(range(400)) - failing
    succeeded_twice = [o for o in range(400) if sum(o in c.offsets and c.outcome == "ok" for c in calls) > 1]
    assert succeeded_twice == [], "a record that succeeded ran again"
    for failed in failing:
        attempts = [c for c in calls if failed in c.offsets]
        assert len(attempts) == 3, f"offset {failed}: {len(attempts)} attempts, max_retries=2 allows 3"
        for retry in attempts[1:]:
            assert set(retry.offsets) <= failing, f"a retry of {failed} carried records that had succeeded"
    letters = dead_letters(pipeline, topic, len(failing))
    assert set(letters) == failing
    for offset, headers in letters.items():
        assert headers["kdb.reason"] == "final-failure"
        assert headers["kdb.error.type"] == "Planned"
        assert headers["kdb.error.message"] == f"planned failure of {offset}"


def test_a_batch_that_fails_for_good_dead_letters_every_record_with_the_batch_error(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(1)
    pipeline = batch_pipeline(pipeline_factory, topic, KDB_TEST_BATCH_SIZE="30", KDB_TEST_RAISE_KEYS="40",
                              KDB_TEST_MAX_RETRIES="1")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 200)
    pipeline.start_workers(processes=1, threads=4)
    pipeline.start_bridge()
    wait_committed_to_end(pipeline)
    assert pipeline.bridges[0].stop() == 0
    calls = read_history(redis_client).partition(topic, 0)
    raised = [c for c in calls if c.outcome == "raise"]
    # The batches holding offsets 40 and 137 (key 40) ran twice each and failed as a whole.
    assert {o for c in raised for o in c.offsets} >= {40, 137}
    doomed = {o for c in raised for o in c.offsets}
    assert all(len([c for c in raised if c.offsets == r.offsets]) == 2 for r in raised)
    ok = {o for c in calls if c.outcome == "ok" for o in c.offsets}
    assert ok == set(range(200)) - doomed
    letters = dead_letters(pipeline, topic, len(doomed))
    assert set(letters) == doomed
    for headers in letters.values():
        assert headers["kdb.error.type"] == "Planned"
        assert headers["kdb.error.message"].startswith("planned failure of the batch at")
        assert headers["kdb.attempts"] == "2"


def test_dead_letters_of_batches_replayed_to_their_topic_run_again_as_batches_each_exactly_once(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(1)
    # Key 13 makes its whole batch raise; key 57 is named in BatchFailed: two kinds of dead letters.
    pipeline = batch_pipeline(pipeline_factory, topic, KDB_TEST_BATCH_SIZE="20", KDB_TEST_RAISE_KEYS="13",
                              KDB_TEST_FAIL_KEYS="57")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 300)
    workers = pipeline.start_workers(processes=1, threads=4)
    pipeline.start_bridge()
    (end,) = wait_committed_to_end(pipeline).values()
    assert pipeline.bridges[0].stop() == 0
    workers.stop(timeout=10)
    failed = set(range(end)) - read_history(redis_client).succeeded(topic, 0)
    raised = {o for c in read_history(redis_client).calls if c.outcome == "raise" for o in c.offsets}
    assert raised - {o for o in range(end) if o % 97 == 13}, "a raising batch held other records too"
    assert {o for o in range(end) if o % 97 == 57} <= failed
    letters = dead_letters(pipeline, topic, len(failed))
    assert set(letters) == failed
    values = {int(m.value()) for m in read_raw(pipeline.kafka.bootstrap_servers, f"{topic}.dlq", len(failed))}
    assert values == failed, "record i has value i: the dead letters carry the original values"

    result = replay(pipeline.env, f"{topic}.dlq")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"replayed {len(failed)} record(s) from {topic}.dlq: {len(failed)} to {topic}" in result.stdout
    del pipeline.env["KDB_TEST_RAISE_KEYS"], pipeline.env["KDB_TEST_FAIL_KEYS"]  # the fix is deployed
    redis_client.delete(EVENTS)
    pipeline.start_workers(processes=1, threads=4)
    pipeline.start_bridge()
    ends = wait_committed_to_end(pipeline)
    assert ends == {(topic, 0): end + len(failed)}
    assert pipeline.bridges[1].stop() == 0
    calls = read_history(redis_client).partition(topic, 0)
    assert all(c.outcome == "ok" for c in calls)
    assert [o for c in calls for o in c.offsets] == list(range(end, end + len(failed))), "only the copies, once each"
    assert max(len(c.offsets) for c in calls) > 1, "the copies ran as batches"
    copies = read_raw(pipeline.kafka.bootstrap_servers, topic, end + len(failed))[end:]
    assert sorted(int(m.value()) for m in copies) == sorted(failed)
    assert all(not k.startswith("kdb.") for m in copies for k, _ in m.headers() or [])


def test_a_worker_killed_mid_batch_reruns_the_whole_batch_and_loses_nothing(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(2)
    pipeline = batch_pipeline(pipeline_factory, topic, KDB_TEST_BATCH_SIZE="25", KDB_TEST_SLEEP_MS="1500",
                              BRIDGE_HEARTBEAT_INTERVAL="0.5", BRIDGE_REDISPATCH_TIMEOUT="4")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 200)
    workers = pipeline.start_workers(processes=1, threads=4)
    pipeline.start_bridge()
    wait_until(lambda: len(read_history(redis_client).calls) >= 3, 60, message="no batch started")
    workers.kill()
    killed = [c for c in read_history(redis_client).calls if c.ended is None]
    assert killed, "the kill hit no running batch"
    committed_at_kill = pipeline.committed()
    pipeline.start_workers(processes=1, threads=4)
    ends = wait_committed_to_end(pipeline, timeout=240)
    assert pipeline.bridges[0].stop() == 0
    history = read_history(redis_client)
    for call in killed:
        assert committed_at_kill[(call.topic, call.partition)] <= call.offsets[0], "the commit passed a killed batch"
        reruns = [c for c in history.partition(call.topic, call.partition)
                  if c.outcome == "ok" and c.started > call.started and set(call.offsets) <= set(c.offsets)]
        assert reruns and reruns[0].offsets[0] == call.offsets[0], f"the batch at {call.offsets[0]} was not rerun whole"
    for (t, p), end in ends.items():
        assert history.succeeded(t, p) == set(range(end)), f"{t}[{p}] lost records"


def test_shutdown_sends_a_partial_batch_at_once_and_commits_it(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(1)
    pipeline = batch_pipeline(pipeline_factory, topic, KDB_TEST_BATCH_SIZE="1000", KDB_TEST_BATCH_TIMEOUT="600")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 30)
    pipeline.start_workers(processes=1, threads=2)
    bridge = pipeline.start_bridge()
    bridge.wait_log("assigned")
    time.sleep(3)
    assert read_history(redis_client).calls == [], "a partial batch went out before its timeout"
    assert bridge.stop() == 0
    calls = read_history(redis_client).calls
    assert [c.offsets for c in calls] == [list(range(30))]
    assert calls[0].outcome == "ok"
    assert pipeline.committed() == {(topic, 0): 30}


def test_a_revoked_partition_sends_its_partial_batch_before_its_final_commit(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(2)
    pipeline = batch_pipeline(pipeline_factory, topic, KDB_TEST_BATCH_SIZE="1000", KDB_TEST_BATCH_TIMEOUT="600")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 60)
    ends = pipeline.ends()
    pipeline.start_workers(processes=1, threads=2)
    first = pipeline.start_bridge()
    first.wait_log("assigned")
    time.sleep(3)
    assert read_history(redis_client).calls == []
    second = pipeline.start_bridge()
    # The second bridge joins: the first gives up at least one partition, which it flushes.
    wait_until(lambda: len(read_history(redis_client).calls) >= 1, 60, message="no partial batch was flushed")
    wait_until(lambda: "revoked" in first.log, 60, message="no revoke")
    flushed = read_history(redis_client).calls
    committed = pipeline.committed()
    for call in flushed:
        assert call.offsets == list(range(ends[(call.topic, call.partition)]))
        assert committed[(call.topic, call.partition)] == ends[(call.topic, call.partition)]
    assert first.stop() == 0 and second.stop() == 0
    calls = read_history(redis_client).calls
    for (t, p), end in ends.items():
        assert sorted(o for c in calls if (c.topic, c.partition) == (t, p) for o in c.offsets) == list(range(end))


def test_batches_stay_under_the_message_size_limit_and_an_oversized_record_is_dead_lettered(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(1)
    limit = 8192
    pipeline = batch_pipeline(pipeline_factory, topic, KDB_TEST_BATCH_SIZE="100",
                              BRIDGE_MAX_MESSAGE_BYTES=str(limit))
    big = 77
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 300,
                  value=lambda i: "x" * (limit + 10) if i == big else json.dumps({"i": i, "pad": "y" * 600}))
    pipeline.start_workers(processes=1, threads=4)
    pipeline.start_bridge()
    wait_committed_to_end(pipeline)
    assert pipeline.bridges[0].stop() == 0
    calls = read_history(redis_client).partition(topic, 0)
    assert sorted(o for c in calls for o in c.offsets) == [o for o in range(300) if o != big]
    # 600-byte values are 800 base64 characters: at most 8 such records fit in 8 KiB.
    assert max(len(c.offsets) for c in calls) <= 8
    assert max(len(c.offsets) for c in calls) >= 5, "batches were split far below the limit"
    sent = redis_client.lrange("kdb-test:sizes", 0, -1)
    assert all(int(size) <= limit for size in sent)
    letters = dead_letters(pipeline, topic, 1)
    assert set(letters) == {big}
    assert letters[big]["kdb.reason"] == "too-large"
