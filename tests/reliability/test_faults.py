"""Fault injection against real processes, checked by the history checker.

The scenarios without the ``slow`` marker form the fast subset that .ci/run runs; the whole
suite runs with ``python -m pytest -m reliability``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from devstack import RedisServer
from tests.reliability.harness import Scenario
from tests.support.pipeline import Pipeline
from tests.support.services import RedisEndpoint

pytestmark = pytest.mark.reliability

PARTITIONS = 6


def scenario(
    name: str, pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str],
    redis_client: redis.Redis, *, ordering: str = "partition", faults: str, sleep_ms: str = "2", **env: str,
) -> Scenario:
    topic = topic_factory(PARTITIONS)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING=ordering, KDB_TEST_SLEEP_MS=sleep_ms, **env)
    return Scenario(name, pipeline, redis_client, ordering=ordering, partitions=PARTITIONS, faults=faults)


def assert_holds(verdict: object) -> None:
    assert verdict.ok, verdict.violations  # type: ignore[attr-defined]


def test_baseline_without_faults_loses_nothing_and_repeats_nothing(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    s = scenario("baseline", pipeline_factory, topic_factory, redis_client, faults="none")
    s.pipeline.start_workers(processes=2, threads=8)
    s.bridge()
    s.produce(3000, rate=300)
    verdict = s.finish()
    assert_holds(verdict)
    assert verdict.duplicates == 0


def test_bridge_sigkill_loop_under_load(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    s = scenario("bridge SIGKILL loop", pipeline_factory, topic_factory, redis_client,
                 faults="bridge SIGKILL every 2-5 s, 4 times")
    s.pipeline.start_workers(processes=2, threads=8)
    bridge = s.bridge()
    s.produce(4000, rate=250)
    for _ in range(4):
        s.sleep(2, 5)
        bridge.kill()
        s.fault_count += 1
        bridge = s.bridge()
    assert_holds(s.finish())


@pytest.mark.parametrize(("point", "nth"), [("after-enqueue", 400), ("after-done", 300), ("after-commit", 5)])
def test_a_crash_at_a_point_inside_the_bridge(
    point: str, nth: int,
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    s = scenario(f"crash {point}", pipeline_factory, topic_factory, redis_client,
                 faults=f"bridge exits abruptly at the {nth}th {point}")
    s.pipeline.start_workers(processes=2, threads=8)
    crashing = s.bridge(BRIDGE_CRASH_AT=f"{point}:{nth}")
    s.produce(2500, rate=300)
    assert crashing.proc is not None
    crashing.proc.wait(120)
    assert crashing.proc.returncode == 86, "the crash point was never reached"
    s.fault_count += 1
    s.bridge()
    assert_holds(s.finish())


def test_a_crash_inside_the_revoke_callback(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    s = scenario("crash in-revoke", pipeline_factory, topic_factory, redis_client,
                 faults="bridge exits abruptly inside its revoke callback when a second bridge joins")
    s.pipeline.start_workers(processes=2, threads=8)
    crashing = s.bridge(BRIDGE_CRASH_AT="in-revoke")
    crashing.wait_log("assigned", timeout=60)
    s.produce(2500, rate=300)
    time.sleep(3)
    s.bridge()
    assert crashing.proc is not None
    crashing.proc.wait(120)
    assert crashing.proc.returncode == 86
    s.fault_count += 1
    assert_holds(s.finish())


def test_worker_sigkill_mid_handler(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    s = scenario("worker SIGKILL", pipeline_factory, topic_factory, redis_client, sleep_ms="20",
                 faults="every worker process SIGKILLed mid-handler, twice", BRIDGE_REDISPATCH_TIMEOUT="5")
    workers = s.pipeline.start_workers(processes=2, threads=8)
    s.bridge()
    s.produce(2500, rate=200)
    for _ in range(2):
        s.sleep(3, 5)
        pids = workers.pids()
        s.killed_pids.update(pids)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        workers.kill()
        s.fault_count += 1
        workers = s.pipeline.start_workers(processes=2, threads=8)
    assert_holds(s.finish())


def crash_bridge_and_workers(s: Scenario, rounds: int, **bridge_env: str) -> None:
    """SIGKILL the bridge and every worker process at once (a host crash), then restart both."""
    workers = s.pipeline.start_workers(processes=2, threads=8)
    bridge = s.bridge(**bridge_env)
    s.produce(2000, rate=300)
    for _ in range(rounds):
        s.sleep(2, 3)
        pids = workers.pids()
        s.killed_pids.update(pids)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        bridge.kill()
        workers.kill()
        s.fault_count += 1
        workers = s.pipeline.start_workers(processes=2, threads=8)
        bridge = s.bridge(**bridge_env)


def test_bridge_and_workers_sigkilled_together(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    s = scenario("bridge + workers SIGKILL", pipeline_factory, topic_factory, redis_client, ordering="none",
                 sleep_ms="50", faults="bridge and all workers SIGKILLed at once, twice", BRIDGE_REDISPATCH_TIMEOUT="5")
    crash_bridge_and_workers(s, 2)
    assert_holds(s.finish())


def test_a_ledger_wiped_mid_run_loses_nothing_and_keeps_order(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    redis_server: RedisEndpoint, tmp_path: Path,
) -> None:
    # The ledger and the lanes share a Redis without persistence; the history stays elsewhere.
    store = RedisServer(tmp_path / "wiped-redis")
    store.start()
    try:
        topic = topic_factory(PARTITIONS)
        pipeline = pipeline_factory(
            [topic], redis_url=store.url, KDB_TEST_ORDERING="partition", KDB_TEST_SLEEP_MS="5",
            KDB_TEST_HISTORY_URL=redis_server.url, BRIDGE_HEARTBEAT_INTERVAL="1", BRIDGE_REDISPATCH_TIMEOUT="10",
        )
        s = Scenario("ledger wiped mid-run", pipeline, redis_client, ordering="partition", partitions=PARTITIONS,
                     faults="FLUSHALL of the ledger's Redis, then a restart of it without persistence")
        s.pipeline.start_workers(processes=2, threads=8)
        s.bridge()
        s.produce(3000, rate=250)
        s.sleep(3, 4)
        redis.Redis.from_url(store.url).flushall()
        s.fault_count += 1
        s.sleep(4, 6)
        store.kill()
        store.start()
        s.fault_count += 1
        assert_holds(s.finish())
        log = s.pipeline.bridges[0].log
        assert "lost this partition's state" in log, "the bridge never noticed the wipe"
    finally:
        store.stop()


def test_negative_control_committing_at_dispatch_is_caught_as_loss(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    # Handlers slower than the producer: a backlog builds up, so the crashes always find records
    # committed at dispatch and not yet run (with a quick fleet that window is too short to rely on).
    s = scenario("negative control: commit at dispatch", pipeline_factory, topic_factory, redis_client,
                 ordering="none", sleep_ms="200", BRIDGE_REDISPATCH_TIMEOUT="5",
                 faults="UNSAFE commit at dispatch; bridge and all workers SIGKILLed at once, twice")
    crash_bridge_and_workers(s, 2, BRIDGE_UNSAFE_COMMIT_AT_DISPATCH="true")
    verdict = s.finish(expect_ok=False, catch_up_timeout=60)
    assert "I1 no loss" in verdict.violations, "the suite failed to notice records lost to early commits"
    assert "I2 commit never ahead" in verdict.violations
