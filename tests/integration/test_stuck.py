"""A record that kills its worker, end to end: real Kafka, Redis and dramatiq worker processes.

The handler SIGKILLs its own worker process on one record; dramatiq's parent then exits, and the
test starts the workers again each time, as a supervisor would. The record must end in the
dead-letter topic with reason ``stuck`` after ``max_redispatches`` re-runs, everything else must be
processed exactly once and in order, and the commit must reach the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from tests.integration.test_failures import headers_of
from tests.support.history import check, read_events
from tests.support.kafka import produce_keyed, read_raw
from tests.support.pipeline import Pipeline

pytestmark = pytest.mark.integration

#: Re-runs the handler allows after a death.
LIMIT = 2


def test_a_record_that_kills_its_worker_is_dead_lettered_as_stuck_and_everything_else_flows(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    poisoned, other = topic_factory(1), topic_factory(3)
    pipeline = pipeline_factory(
        [poisoned, other], KDB_TEST_ORDERING="partition", KDB_TEST_KILL_KEYS="kill",
        KDB_TEST_MAX_REDISPATCHES=str(LIMIT), KDB_TEST_BROKER_HEARTBEAT_MS="3000",
        BRIDGE_REDISPATCH_TIMEOUT="3", BRIDGE_HEARTBEAT_INTERVAL="0.5", BRIDGE_STUCK_AFTER="2",
    )
    servers = pipeline.kafka.bootstrap_servers
    produce_keyed(servers, poisoned, 60, key=lambda i: "kill" if i == 30 else str(i))
    produce_keyed(servers, other, 300)
    began = time.monotonic()
    # One thread: when the record kills its process, nothing else is running there.
    workers = pipeline.start_workers(processes=1, threads=1)
    bridge = pipeline.start_bridge()
    ends = pipeline.ends()
    restarts = 0
    deadline = time.monotonic() + 240
    while pipeline.committed() != ends:
        assert time.monotonic() < deadline, f"the commit never reached {ends}:\n{bridge.log[-3000:]}"
        if not workers.running:
            restarts += 1
            workers.start()
        time.sleep(0.2)
    elapsed = time.monotonic() - began

    # The dead workers' own copies of the record come back from the task broker (3 s after each
    # death): none of them may run it again, now that it is given up and committed past.
    time.sleep(1)
    if not workers.running:  # the last death, just before the record was given up
        restarts += 1
        workers.start()
    time.sleep(8)
    assert workers.running, "a copy of the record given up ran and killed a worker again"
    kills = int(redis_client.get("kdb-test:events:kills") or 0)
    assert kills == restarts

    [letter] = read_raw(servers, f"{poisoned}.dlq", 1)
    h = headers_of(letter)
    assert (h["kdb.reason"], h["kdb.offset"], h["kdb.error.type"]) == (b"stuck", b"30", b"Stuck")
    runs = int(h["kdb.attempts"])
    assert LIMIT + 1 <= runs <= kills <= runs + 1, (runs, kills)
    assert f"max_redispatches={LIMIT}".encode() in h["kdb.error.message"]
    assert b"last sign of life" in h["kdb.error.message"]
    assert letter.key() == b"kill" and letter.value() == b"30"

    report = check(read_events(redis_client), scope="partition")
    assert report.order_violations == [] and report.overlaps == []
    expected = {(poisoned, 0): set(range(60)) - {30}} | {(other, p): set(range(end)) for (t, p), end in ends.items()
                                                          if t == other}
    assert report.processed == expected
    assert report.duplicates == 0, "only the record that killed its workers ran more than once"
    assert sum(report.successes.values()) == 59 + 300

    assert pipeline.committed() == ends
    # Every head waits while the fleet restarts, so other records cross the 2 s too: once each.
    warned = [line.split(" ")[4] for line in bridge.log.splitlines() if "has held its partition" in line]
    assert f"{poisoned}[0]@30" in warned and len(warned) == len(set(warned)), warned
    redispatched = [line for line in bridge.log.splitlines() if "again after no sign of life" in line]
    assert bridge.stop() == 0
    print(f"\nstuck record: {59 + 300} records processed, 1 dead-lettered as stuck after {runs} runs that died "
          f"({kills} kills, {restarts} worker restarts, {len(redispatched)} re-dispatch rounds); commit at the end "
          f"after {elapsed:.1f}s")
