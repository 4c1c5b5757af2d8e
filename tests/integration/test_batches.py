"""Batch handlers end to end, through real Kafka, Redis and dramatiq worker processes: order
across batches, partial failure, a worker killed mid-batch, flush on revoke and shutdown, and the
size guard. The batch actor (tests/support/batch_actors.py) writes one start and one end event
per call."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import redis

from tests.integration.test_bridge import wait_committed_to_end
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


def assert_ordered_batches(calls: list[Call]) -> None:
    """Calls of one partition never overlap, and each one's records follow the previous one's
    (a rerun after a crash may repeat a suffix, never reorder)."""
    finished: list[Call] = []
    for call in calls:
        assert call.offsets == sorted(call.offsets), f"a batch out of offset order: {call.offsets[:10]}"
        if finished:
            last = finished[-1]
            assert last.ended is not None or last.pid != call.pid, f"batch {call.offsets[0]} overlaps a running one"
        finished.append(call)
    ends = sorted((c.started, c.ended or 0, c.offsets[0]) for c in calls if c.ended is not None)
    for (_, end_a, first_a), (start_b, _, first_b) in zip(ends, ends[1:], strict=False):
        assert start_b >= end_a, f"batch at {first_b} started before the batch at {first_a} ended"
        assert first_b > first_a or first_b in {c.offsets[0] for c in calls}, "batches out of order"


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
        ends_at = [(c.started, c.ended) for c in calls]
        for (_, ended), (started, _) in zip(ends_at, ends_at[1:], strict=False):
            assert ended is not None and started >= ended, f"{t}[{p}]: a batch started before the previous ended"
