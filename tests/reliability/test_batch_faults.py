"""Fault injection with a batch handler (tests/support/batch_history.py), checked by the history
checker: every record of a call is a start and an end event, and one call counts as one run."""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable

import pytest
import redis

from tests.reliability.harness import Scenario
from tests.support.history import read_events
from tests.support.pipeline import Pipeline

pytestmark = pytest.mark.reliability

PARTITIONS = 6


def test_worker_sigkill_mid_batch_under_a_steady_stream(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(PARTITIONS)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="partition", KDB_TEST_BATCH_SIZE="40",
                                KDB_TEST_BATCH_TIMEOUT="0.2", KDB_TEST_SLEEP_MS="150-400",
                                BRIDGE_REDISPATCH_TIMEOUT="5")
    pipeline.module = "tests.support.batch_history"
    s = Scenario("worker SIGKILL mid-batch", pipeline, redis_client, ordering="partition", partitions=PARTITIONS,
                 faults="batch_size=40: every worker process SIGKILLed mid-batch, twice")
    workers = pipeline.start_workers(processes=2, threads=4)
    s.bridge()
    s.produce(3000, rate=200)
    for _ in range(2):
        s.sleep(3, 5)
        pids = workers.pids()
        s.killed_pids.update(pids)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        workers.kill()
        s.fault_count += 1
        workers = pipeline.start_workers(processes=2, threads=4)
    verdict = s.finish()
    assert verdict.ok, verdict.violations
    assert verdict.processed == verdict.produced == 3000, "every record ran to the end"
    events = read_events(redis_client)
    ended = {e.token for e in events if e.kind == "E"}
    cut = {e.token for e in events if e.kind == "S" and e.token not in ended}
    assert cut and {e.pid for e in events if e.token in cut} <= s.killed_pids, "the kills hit running batches"
    sizes = Counter(e.token for e in events if e.kind == "S")
    assert max(sizes.values()) > 1, "records ran in batches"
