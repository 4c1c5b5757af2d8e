"""Correctness under ordinary timing, end to end: scheduled retries, older epochs, failures the
bridge decides, clocks that disagree, mixed protocol versions."""

from __future__ import annotations

import itertools
import os
import re
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from confluent_kafka.admin import AdminClient

from bridge import protocol
from devstack import DramatiqWorkers
from tests.integration.test_bridge import assert_complete, run_to_end, wait_committed_to_end
from tests.support.bridge_proc import REPO
from tests.support.checker import HandlerEvent
from tests.support.history import check, read_events
from tests.support.kafka import create_topic, produce_keyed, read_raw
from tests.support.pipeline import Pipeline
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

#: Session and heartbeat short enough for a SIGKILLed bridge's partitions to move within seconds.
QUICK_GROUP = ("-X", "session.timeout.ms=6000", "-X", "heartbeat.interval.ms=1000")

REDISPATCHED = "again after no sign of life"


def headers_of(message: Any) -> dict[str, bytes]:
    return {k: v for k, v in message.headers() or [] if k.startswith("kdb.")}


def runs_of(events: list[HandlerEvent], offset: int) -> list[tuple[HandlerEvent, HandlerEvent]]:
    """(start, end) of every run of ``offset``, in the order they started."""
    starts = [e for e in events if e.kind == "S" and e.offset == offset]
    ends = {e.token: e for e in events if e.kind == "E" and e.offset == offset}
    return [(s, ends[s.token]) for s in starts]


def assert_retried_in_place_then_dead_lettered(
    pipeline: Pipeline, redis_client: redis.Redis, topic: str, bad: int, runs: int, total: int
) -> float:
    """The bad record ran exactly ``runs`` times, went to the dead-letter topic once, and every
    other record ran once, in order, after it; returns seconds from its first run to its last end."""
    report = run_to_end(pipeline, redis_client, "partition")
    events = read_events(redis_client)
    bad_runs = runs_of(events, bad)
    assert len(bad_runs) == runs, f"offset {bad} ran {len(bad_runs)} times"
    assert report.overlaps == [] and report.order_violations == []
    assert report.duplicates == 0
    assert_complete(report, pipeline.ends())
    dead = read_raw(pipeline.kafka.bootstrap_servers, f"{topic}.dlq", 1)
    assert [int(headers_of(m)["kdb.offset"]) for m in dead] == [bad], "dead-lettered exactly once"
    assert headers_of(dead[0])["kdb.attempts"] == str(runs).encode()
    assert pipeline.committed() == {(topic, 0): total}
    for bridge in pipeline.bridges:
        assert REDISPATCHED not in bridge.log, "a record waiting for its retry was dispatched again"
    return (bad_runs[-1][1].ms - bad_runs[0][0].ms) / 1000


def test_a_retry_that_backs_off_longer_than_the_redispatch_timeout_runs_exactly_max_retries_plus_one_times(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(1)
    pipeline = pipeline_factory(
        [topic], KDB_TEST_ORDERING="partition", KDB_TEST_FAIL_KEYS="2", KDB_TEST_MAX_RETRIES="2",
        KDB_TEST_BACKOFF_MS="4000-4000", BRIDGE_REDISPATCH_TIMEOUT="2", BRIDGE_HEARTBEAT_INTERVAL="0.5",
    )
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 6, key=str)
    pipeline.start_workers(processes=2, threads=4)
    pipeline.start_bridge()
    took = assert_retried_in_place_then_dead_lettered(pipeline, redis_client, topic, bad=2, runs=3, total=6)
    assert took >= 4.0, "dramatiq's backoff was honoured"


def test_dramatiqs_default_retry_schedule_scaled_down_ends_in_the_dead_letter_topic(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    # dramatiq's default schedule (min_backoff 15 s doubling, max_backoff 7 days) divided by 60;
    # six retries keep the run short. The last two back off 2-4 s and 4-8 s (dramatiq's jitter),
    # longer than a re-dispatch timeout of 3 s (twice dramatiq's idle pickup, 1 s per queue).
    topic = topic_factory(1)
    pipeline = pipeline_factory(
        [topic], KDB_TEST_ORDERING="partition", KDB_TEST_FAIL_KEYS="1", KDB_TEST_MAX_RETRIES="6",
        KDB_TEST_BACKOFF_MS="250-10080000", BRIDGE_REDISPATCH_TIMEOUT="3", BRIDGE_HEARTBEAT_INTERVAL="0.2",
    )
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 4, key=str)
    pipeline.start_workers(processes=2, threads=4)
    pipeline.start_bridge()
    took = assert_retried_in_place_then_dead_lettered(pipeline, redis_client, topic, bad=1, runs=7, total=4)
    print(f"7 runs and the dead letter after {took:.1f}s")


def test_a_final_failure_left_by_a_dead_owner_is_dead_lettered_once_and_never_runs_again(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    admin: AdminClient,
) -> None:
    topic = topic_factory(1)
    dlq = f"{topic}.late-dlq"
    pipeline = pipeline_factory(
        [topic], KDB_TEST_ORDERING="partition", KDB_TEST_FAIL_KEYS="5", KDB_TEST_DLQ=dlq,
        BRIDGE_CREATE_DEAD_LETTER_TOPICS="false",
    )
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 12, key=str)
    pipeline.start_workers(processes=1, threads=4)
    first = pipeline.start_bridge(*QUICK_GROUP)
    # 5 failed for good; its dead letter cannot be written, so its offset holds the commit.
    first.wait_log(f"writing it to {dlq}", timeout=60)
    wait_until(lambda: pipeline.committed()[(topic, 0)] == 5, 30, message="the commit never reached offset 5")
    first.kill()
    create_topic(admin, dlq, 1)
    second = pipeline.start_bridge(*QUICK_GROUP)
    ends = wait_committed_to_end(pipeline, timeout=120)
    assert second.stop() == 0
    assert ends == {(topic, 0): 12}
    events = read_events(redis_client)
    assert len(runs_of(events, 5)) == 1, "the new owner settled the recorded failure instead of running it again"
    report = check(events, scope="partition")
    assert report.overlaps == [] and report.order_violations == []
    dead = read_raw(pipeline.kafka.bootstrap_servers, dlq, 1)
    assert [int(headers_of(m)["kdb.offset"]) for m in dead] == [5]
    assert headers_of(dead[0])["kdb.reason"] == b"final-failure"


def test_an_older_copy_failing_after_the_handover_neither_releases_nor_dead_letters_the_new_owners_copy(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(1)
    pipeline = pipeline_factory(
        [topic], KDB_TEST_ORDERING="partition", KDB_TEST_FAIL_KEYS="2", KDB_TEST_SLOW_KEYS="2=10000",
        BRIDGE_HANDOVER_TIMEOUT="0", BRIDGE_HEARTBEAT_INTERVAL="0.5",
    )
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 6, key=str)
    pipeline.start_workers(processes=1, threads=4)
    first = pipeline.start_bridge(*QUICK_GROUP)
    wait_until(lambda: any(e.kind == "S" and e.offset == 2 for e in read_events(redis_client)), 60,
               message="offset 2 never started")
    first.kill()  # 2 still runs for ~10 s; the new owner does not wait for it (handover timeout 0)
    second = pipeline.start_bridge(*QUICK_GROUP)
    wait_committed_to_end(pipeline, timeout=120)
    assert second.stop() == 0
    events = read_events(redis_client)
    report = check(events, scope="partition")
    runs = runs_of(events, 2)
    assert 1 <= len(runs) <= 2
    for (_, end), (start, _) in itertools.pairwise(runs):
        assert start.ms >= end.ms, "the new owner's copy waited for the older one to stop"
    third = next(e for e in events if e.kind == "S" and e.offset == 3)
    assert third.ms >= runs[-1][1].ms, "3 started only after the last copy of 2 ended"
    assert report.overlaps == [] and report.order_violations == []
    assert_complete(report, pipeline.ends())
    dead = read_raw(pipeline.kafka.bootstrap_servers, f"{topic}.dlq", 1)
    assert [int(headers_of(m)["kdb.offset"]) for m in dead] == [2], "one dead letter, for the current copy"


def test_a_record_too_large_for_the_task_broker_does_not_hold_its_ordered_successors(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(1)
    pipeline = pipeline_factory(
        [topic], KDB_TEST_ORDERING="partition", BRIDGE_MAX_MESSAGE_BYTES="2048", BRIDGE_REDISPATCH_TIMEOUT="120",
    )
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 10, key=str,
                  value=lambda i: "x" * 4096 if i == 3 else str(i))
    pipeline.start_workers(processes=1, threads=4)
    bridge = pipeline.start_bridge()
    # Well inside the re-dispatch timeout: the successor of 3 started at once.
    wait_until(lambda: pipeline.committed() == {(topic, 0): 10}, 60, interval=0.5,
               message="the commit stalled behind the too-large record")
    assert bridge.stop() == 0
    assert REDISPATCHED not in bridge.log
    report = check(read_events(redis_client), scope="partition")
    assert sorted(report.processed[(topic, 0)]) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    dead = read_raw(pipeline.kafka.bootstrap_servers, f"{topic}.dlq", 1)
    assert [(int(headers_of(m)["kdb.offset"]), headers_of(m)["kdb.reason"]) for m in dead] == [(3, b"too-large")]


def skewed_workers(pipeline: Pipeline, offset: float, name: str) -> DramatiqWorkers:
    """One worker process whose wall clock is ``offset`` seconds off."""
    env = {**os.environ, **pipeline.env, "PYTHONPATH": str(REPO), "KDB_TEST_CLOCK_OFFSET_S": str(offset)}
    workers = DramatiqWorkers(["tests.support.skewed_actors"], processes=1, threads=4, env=env, cwd=REPO,
                              log_path=pipeline.tmp / f"workers-{name}.log")
    workers.start()
    pipeline.workers.append(workers)
    return workers


def test_workers_whose_clocks_are_off_by_half_a_minute_neither_run_a_live_record_twice_nor_drop_a_dead_ones(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(4)
    # One record of a partition on its lane at a time, so every record is fetched afresh and
    # both processes get records of every partition.
    pipeline = pipeline_factory(
        [topic], KDB_TEST_ORDERING="partition", KDB_TEST_SLEEP_MS="1500", BRIDGE_LANE_DEPTH="1",
        BRIDGE_REDISPATCH_TIMEOUT="4", BRIDGE_HEARTBEAT_INTERVAL="0.5",
    )
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 24, key=str)
    skewed_workers(pipeline, -30, "behind")
    ahead = skewed_workers(pipeline, 30, "ahead")
    bridge = pipeline.start_bridge()

    def running_on(pids: list[int]) -> set[tuple[int, int]]:
        events = read_events(redis_client)
        ended = {e.token for e in events if e.kind == "E"}
        return {(e.partition, e.offset) for e in events if e.kind == "S" and e.pid in pids and e.token not in ended}

    # Both processes run records: the one behind would look dead at once to a wall-clock
    # comparison, and the one ahead would look alive for half a minute after it died.
    wait_until(lambda: running_on(ahead.pids()), 60, message="the process ahead never ran a record")
    killed = ahead.pids()
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    victims = running_on(killed)
    # What the process behind had started by then: running or finished, alive either way.
    live = {(e.partition, e.offset) for e in read_events(redis_client) if e.kind == "S" and e.pid not in killed}
    ahead.kill()
    pipeline.start_workers(processes=1, threads=4)
    wait_committed_to_end(pipeline)
    assert bridge.stop() == 0
    events = read_events(redis_client)
    ended = {e.token for e in events if e.kind == "E"}
    # The runs the kill cut short have a start and no end.
    report = check([e for e in events if e.pid not in killed or e.token in ended], scope="partition")
    assert report.overlaps == [] and report.order_violations == []
    assert_complete(report, pipeline.ends())
    assert report.duplicates == 0, "a record cut short is not a duplicate; nothing else ran twice"
    again = {
        (int(item.split("[")[1].split("]")[0]), int(item.split("@")[1]))
        for line in bridge.log.splitlines() if REDISPATCHED in line
        for item in line.rsplit(": ", 1)[1].split(", ")
    }
    assert victims <= again, "the records cut short by the kill were dispatched again, not dropped"
    # Besides those, the killed process may have held records it had fetched and not started (the
    # topic's lane is one queue); but nothing the live process behind had started is sent again.
    assert again.isdisjoint(live), "a record the process behind the clock ran was taken for dead"


def test_during_a_rolling_upgrade_a_worker_refuses_messages_of_a_newer_protocol_and_nothing_runs_out_of_order(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(2)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="partition")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 40, key=str)
    old = pipeline.start_workers(processes=1, threads=4)
    # A bridge of the next release writes a protocol version the running workers do not know.
    following = max(protocol.KNOWN_VERSIONS) + 1
    pipeline.start_bridge(env={"KDB_TEST_PROTOCOL_VERSION": str(following)})
    wait_until(lambda: "refusing" in old.log(), 60,
               message="the old worker never refused a message")
    time.sleep(2)
    assert read_events(redis_client) == [], "an old worker ran a message it does not understand"
    log = old.log()
    assert f"protocol version {following}" in log and "upgrade this worker" in log
    old.stop()
    # The upgraded workers take over: every record runs once, in order.
    workers = DramatiqWorkers(["tests.support.upgraded_actors"], processes=1, threads=4,
                              env={**os.environ, **pipeline.env, "PYTHONPATH": str(REPO)}, cwd=REPO,
                              log_path=pipeline.tmp / "workers-upgraded.log")
    workers.start()
    pipeline.workers.append(workers)
    report = run_to_end(pipeline, redis_client, "partition")
    assert report.overlaps == [] and report.order_violations == []
    assert report.duplicates == 0
    assert_complete(report, pipeline.ends())


def crash_while_running(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    rabbitmq: Any, *, records: int, slow: int, redispatch_timeout: str,
) -> tuple[Pipeline, Any, float]:
    """RabbitMQ lanes, ``partition`` mode, ``records`` records of which ``slow`` takes 4 s: a worker
    process and the bridge start, and that process is SIGKILLed while ``slow`` runs, a second one
    started just before; the pipeline, the bridge and the time of the kill."""
    topic = topic_factory(1)
    pipeline = pipeline_factory(
        [topic], KDB_TEST_ORDERING="partition", KDB_TEST_RABBITMQ_URL=rabbitmq.url, KDB_TEST_SLOW_KEYS=f"{slow}=4000",
        BRIDGE_REDISPATCH_TIMEOUT=redispatch_timeout, BRIDGE_HEARTBEAT_INTERVAL="0.5",
    )
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, records, key=str)
    doomed = pipeline.start_workers(processes=1, threads=4)
    bridge = pipeline.start_bridge()
    wait_until(lambda: any(e.kind == "S" and e.offset == slow for e in read_events(redis_client)), 60,
               message=f"offset {slow} never started")
    pipeline.start_workers(processes=1, threads=4)
    for pid in doomed.pids():
        os.kill(pid, signal.SIGKILL)
    doomed.kill()
    return pipeline, bridge, time.monotonic()


def assert_ran_once_in_order(pipeline: Pipeline, redis_client: redis.Redis) -> None:
    events = read_events(redis_client)
    ended = {e.token for e in events if e.kind == "E"}
    report = check([e for e in events if e.kind == "E" or e.token in ended], scope="partition")
    assert report.overlaps == [] and report.order_violations == []
    assert report.duplicates == 0
    assert_complete(report, pipeline.ends())


def test_a_rabbitmq_redelivery_after_a_worker_crash_runs_once_the_dead_copy_stops_showing_signs_of_life(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    rabbitmq: Any,
) -> None:
    # One record: a delivery of its lane (a record behind it would run from the worker's own queue).
    pipeline, bridge, killed_at = crash_while_running(pipeline_factory, topic_factory, redis_client, rabbitmq,
                                                      records=1, slow=0, redispatch_timeout="120")
    # RabbitMQ hands the unacknowledged message to the other process at once; it waits for the
    # dead copy's registration to go stale (three heartbeats), not for the re-dispatch timeout.
    wait_committed_to_end(pipeline, timeout=60)
    assert time.monotonic() - killed_at < 60
    assert bridge.stop() == 0
    assert REDISPATCHED not in bridge.log
    assert_ran_once_in_order(pipeline, redis_client)


def test_on_rabbitmq_a_record_a_crashed_worker_ran_from_its_own_queue_comes_back_after_the_redispatch_timeout(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
    rabbitmq: Any,
) -> None:
    # 1 is staged behind 0: the worker that finishes 0 runs it from its own work queue, so
    # RabbitMQ holds no delivery of it when that worker dies.
    pipeline, bridge, _ = crash_while_running(pipeline_factory, topic_factory, redis_client, rabbitmq,
                                              records=3, slow=1, redispatch_timeout="5")
    wait_committed_to_end(pipeline, timeout=60)
    assert bridge.stop() == 0
    assert REDISPATCHED in bridge.log, "the bridge dispatched it again"
    assert_ran_once_in_order(pipeline, redis_client)


def test_a_partition_head_waiting_in_a_busy_worker_past_the_timeout_is_sent_again_but_runs_once(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    # One worker thread and twelve partitions: the thread runs one partition's chain after another,
    # and the heads of the others wait, prefetched in the process, longer than the timeout.
    topic = topic_factory(12)
    pipeline = pipeline_factory(
        [topic], KDB_TEST_ORDERING="partition", KDB_TEST_SLEEP_MS="100", BRIDGE_REDISPATCH_TIMEOUT="2",
    )
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 240)
    pipeline.start_workers(processes=1, threads=1)
    bridge = pipeline.start_bridge()
    report = run_to_end(pipeline, redis_client, "partition")
    assert REDISPATCHED in bridge.log, "no head waited past the timeout: the case did not happen"
    assert report.duplicates == 0, "a second copy of a waiting record never runs beside or after the first"
    assert report.overlaps == [] and report.order_violations == []
    assert_complete(report, pipeline.ends())


def test_a_graceful_stop_with_slow_handlers_ends_within_the_shutdown_timeout(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis
) -> None:
    topic = topic_factory(2)
    pipeline = pipeline_factory(
        [topic], KDB_TEST_ORDERING="partition", KDB_TEST_SLEEP_MS="30000",
        BRIDGE_SHUTDOWN_TIMEOUT="5", BRIDGE_DRAIN_TIMEOUT="20",
    )
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 20, key=str)  # keys over both partitions
    pipeline.start_workers(processes=1, threads=4)
    bridge = pipeline.start_bridge()
    wait_until(lambda: sum(e.kind == "S" for e in read_events(redis_client)) == 2, 60,
               message="the first record of each partition never started")
    assert {e.partition for e in read_events(redis_client)} == {0, 1}
    began = time.monotonic()
    assert bridge.stop(timeout=60) == 0
    took = time.monotonic() - began
    # One deadline: the shutdown timeout, plus the final commit and leaving the group; the
    # revoke that leaving triggers does not wait the drain timeout again.
    assert took < 5 + 5, f"the stop took {took:.1f}s"
    unfinished = re.search(r"stopping with (\d+) dispatched records unfinished", bridge.log)
    assert unfinished is not None and int(unfinished[1]) >= 2, "the two running records were left to run again"
