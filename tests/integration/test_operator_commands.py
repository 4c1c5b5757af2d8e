"""Operator commands against real Kafka, redis-server, bridges and dramatiq worker processes:
``pause``/``resume``, ``skip`` and ``reset-offsets``, each run as users run it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis

from bridge.keys import PartitionKeys
from bridge.ledger import connect
from bridge.ledger.control import ControlStore
from tests.integration.test_bridge import wait_committed_to_end
from tests.support.bridge_proc import REPO
from tests.support.history import check, read_events
from tests.support.kafka import consumer, produce_keyed, read_raw
from tests.support.pipeline import Pipeline
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def cli(pipeline: Pipeline, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``kafka-dramatiq-bridge ARGS`` with the pipeline's settings, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        env={**os.environ, "PYTHONPATH": str(REPO), "BRIDGE_HTTP_PORT": "0", **pipeline.env},
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout.strip()


def refused(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 8, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stderr.strip()


def control(pipeline: Pipeline) -> ControlStore:
    """The group's operator state in the ledger, as the bridge reads it."""
    return ControlStore(connect(pipeline.env["BRIDGE_REDIS_URL"]), pipeline.group)


def now_ms() -> int:
    return int(time.time() * 1000)


def test_pause_stops_dispatch_within_a_second_and_resume_goes_on_without_loss_or_reordering(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
) -> None:
    topic = topic_factory(3)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="partition", KDB_TEST_SLEEP_MS="20")
    total = produce_keyed(pipeline.kafka.bootstrap_servers, topic, 900)
    pipeline.start_workers(processes=1, threads=8)
    bridge = pipeline.start_bridge()
    wait_until(lambda: len(read_events(redis_client)) >= 120, 90, message="processing never started")

    asked = now_ms()
    out = ok(cli(pipeline, "pause", topic))
    answered = now_ms()
    assert out.startswith(f"paused {topic} for group {pipeline.group}; applied by 1 running bridge(s): ")
    (pause,) = control(pipeline).pauses().values()
    time.sleep(2.5)
    events = read_events(redis_client)
    starts = [e for e in events if e.kind == "S"]
    after = [e.ms - pause.since_ms for e in starts if e.ms > pause.since_ms]
    print(f"pause: command started at -{pause.since_ms - asked} ms, recorded at 0 ms, answered at "
          f"+{answered - pause.since_ms} ms; {len(after)} record(s) started after it was recorded, the last at "
          f"+{max(after, default=0)} ms")
    late = [ms for ms in after if ms > 1000]
    assert late == [], f"{len(late)} record(s) started more than 1 s after the pause was recorded"
    assert len({(e.partition, e.offset) for e in starts}) < total, "the pause came too late to show anything"
    held = ok(cli(pipeline, "status", "tests.support.bridge_actors", "--json"))
    rows = json.loads(held)
    assert all(r["paused_at"] and r["paused_by"].endswith(f"@{socket.gethostname()}") for r in rows)
    assert f"paused by {rows[0]['paused_by']}" in bridge.log

    out = ok(cli(pipeline, "resume", topic))
    assert out.startswith(f"resumed {topic} for group {pipeline.group}; applied by 1 running bridge(s)")
    ends = wait_committed_to_end(pipeline)
    assert bridge.stop() == 0
    report = check(read_events(redis_client), scope="partition")
    assert report.overlaps == []
    assert report.order_violations == []
    assert report.duplicates == 0
    for (t, p), end in ends.items():
        assert report.processed[(t, p)] == set(range(end))
    assert sum(ends.values()) == total
    assert "resumed by an operator; dispatching again" in bridge.log
    audit = control(pipeline).history()
    assert [(e["command"], e["ok"]) for e in audit] == [(f"pause {topic}", True), (f"resume {topic}", True)]
    assert audit[0]["by"] == rows[0]["paused_by"]


def test_a_pause_reaches_every_bridge_of_the_group_and_one_that_starts_later(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
) -> None:
    topic = topic_factory(4)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="key")
    out = ok(cli(pipeline, "pause", f"{topic}:1"))
    assert out.endswith(f"no bridge of group {pipeline.group} is running: bridges apply it when they start")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 400)
    pipeline.start_workers(processes=1, threads=8)
    first, second = pipeline.start_bridge(), pipeline.start_bridge()
    ends = pipeline.ends()
    wait_until(lambda: all(c == ends[tp] for tp, c in pipeline.committed().items() if tp[1] != 1), 120,
               message="the partitions not paused never reached their end")
    assert pipeline.committed()[(topic, 1)] <= 0, "nothing of the paused partition was committed"
    assert all(e.partition != 1 for e in read_events(redis_client)), "nothing of it ran"
    out = ok(cli(pipeline, "pause", f"{topic}:2"))
    assert out.startswith(f"paused {topic}[2] for group {pipeline.group}; applied by 2 running bridge(s): ")
    ok(cli(pipeline, "resume", f"{topic}:1"))
    ok(cli(pipeline, "resume", f"{topic}:2"))
    wait_committed_to_end(pipeline)
    for bridge in (first, second):
        assert bridge.stop() == 0
    report = check(read_events(redis_client), scope="key")
    assert report.order_violations == [] and report.overlaps == [] and report.duplicates == 0
    assert sum(len(offsets) for offsets in report.processed.values()) == 400


def test_skip_moves_a_partition_held_by_a_record_that_never_finishes_past_it(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
) -> None:
    topic = topic_factory(1)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="partition", KDB_TEST_SLOW_KEYS="stuck=600000")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 30, key=lambda i: "stuck" if i == 7 else str(i))
    workers = pipeline.start_workers(processes=1, threads=4)
    bridge = pipeline.start_bridge()
    wait_until(lambda: pipeline.committed()[(topic, 0)] == 7, 90, message="the records before 7 never committed")
    wait_until(lambda: any(e.offset == 7 and e.kind == "S" for e in read_events(redis_client)), 30,
               message="record 7 never started")

    assert refused(cli(pipeline, "skip", f"{topic}:0:3")).endswith(
        f"{topic}[0]@3 is committed already (the group's committed offset is 7)")
    assert f"{topic}[0]@30 is not consumed yet" in refused(cli(pipeline, "skip", f"{topic}:0:30"))
    out = ok(cli(pipeline, "skip", f"{topic}:0:7"))
    assert out.startswith(f"{topic}[0]@7 given up (1 dispatch(es)): its dead letter goes to {topic}.dlq")
    assert wait_committed_to_end(pipeline) == {(topic, 0): 30}
    assert refused(cli(pipeline, "skip", f"{topic}:0:7")).endswith(
        f"{topic}[0]@7 is committed already (the group's committed offset is 30)")

    dead = read_raw(pipeline.kafka.bootstrap_servers, f"{topic}.dlq", 1)
    assert len(dead) == 1, "exactly one dead letter: the skipped record"
    headers = dict(dead[0].headers())
    assert (dead[0].key(), dead[0].value()) == (b"stuck", b"7")
    assert headers["kdb.reason"] == b"skipped"
    assert headers["kdb.offset"] == b"7"
    assert headers["kdb.error.type"] == b"Skipped"
    assert headers["kdb.error.message"].startswith(b"skipped by ")
    events = read_events(redis_client)
    finished = {e.offset for e in events if e.kind == "E"}
    assert finished == set(range(30)) - {7}, "every other record ran to its end; 7 still runs"
    report = check(events, scope="partition")
    assert report.order_violations == [] and report.duplicates == 0
    assert report.overlaps == [f"('{topic}', '0'): 8 started while 7 ran"], "only the abandoned copy overlaps"
    assert "operator command `skip" in bridge.log and "given up" in bridge.log
    assert bridge.stop() == 0
    workers.stop(timeout=5)


def test_reset_offsets_dry_run_changes_nothing_and_a_reset_makes_the_next_bridge_process_from_there(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
) -> None:
    topic = topic_factory(2)
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="partition")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 60)
    first_ends = pipeline.ends()
    time.sleep(1.5)
    middle = (datetime.now(UTC) - timedelta(seconds=0.75)).isoformat(timespec="milliseconds")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 60, value=lambda i: f"second-{i}")
    pipeline.start_workers(processes=1, threads=8)
    bridge = pipeline.start_bridge()
    ends = wait_committed_to_end(pipeline)
    host_pid = f"{socket.gethostname()}:{bridge.proc.pid if bridge.proc else 0}"
    message = refused(cli(pipeline, "reset-offsets", topic, "--to-earliest"))
    assert f"bridges of group {pipeline.group} are running: {host_pid} (seen " in message
    assert bridge.stop() == 0
    events_before = len(read_events(redis_client))

    plan = ok(cli(pipeline, "reset-offsets", topic, "--to-offset", "0", "--dry-run"))
    assert plan.splitlines() == [f"group {pipeline.group}:",
                                 *(f"  {topic}[{p}]: {ends[(topic, p)]} -> 0" for p in (0, 1)),
                                 "dry run: nothing changed"]
    assert pipeline.committed() == ends

    plan = ok(cli(pipeline, "reset-offsets", topic, "--to-datetime", middle))
    assert plan.splitlines()[1:3] == [f"  {topic}[{p}]: {ends[(topic, p)]} -> {first_ends[(topic, p)]}" for p in (0, 1)]
    assert pipeline.committed() == first_ends
    audit = control(pipeline).history()
    assert [e["ok"] for e in audit] == [False, True, True]
    assert audit[0]["outcome"].startswith("refused: bridges of group")

    bridge = pipeline.start_bridge()
    assert wait_committed_to_end(pipeline) == ends
    assert bridge.stop() == 0
    again = read_events(redis_client)[events_before:]
    report = check(again, scope="partition")
    assert report.order_violations == [] and report.overlaps == [] and report.duplicates == 0
    assert report.processed == {(topic, p): set(range(first_ends[(topic, p)], ends[(topic, p)])) for p in (0, 1)}, \
        "the next bridge processed exactly the records from the new offsets on, none the ledger knew as done"


def test_reset_offsets_is_refused_while_another_member_holds_the_group(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str],
) -> None:
    topic = topic_factory(1)
    pipeline = pipeline_factory([topic])
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 5)
    member = consumer(pipeline.kafka.bootstrap_servers, pipeline.group)
    try:
        member.subscribe([topic])
        wait_until(lambda: member.consume(timeout=0.2) is not None and member.assignment(), 60,
                   message="the other member never joined")
        message = refused(cli(pipeline, "reset-offsets", topic, "--to-latest"))
        assert f"Kafka refuses to move the offsets of group {pipeline.group}: the group has members " \
            "(UNKNOWN_MEMBER_ID)" in message
    finally:
        member.close()
    assert pipeline.committed()[(topic, 0)] < 0, "nothing was committed"
    out = ok(cli(pipeline, "reset-offsets", topic, "--to-latest"))
    assert out.endswith(f"reset 1 partition(s): the next bridge of group {pipeline.group} starts there")
    assert pipeline.committed()[(topic, 0)] == 5


def test_a_reset_waits_for_running_records_and_leaves_no_done_fact_that_would_skip_a_record(
    pipeline_factory: Callable[..., Pipeline], topic_factory: Callable[..., str], redis_client: redis.Redis,
) -> None:
    topic = topic_factory(1)
    # Key mode: records after the slow one finish first, so the ledger holds done facts above the
    # committed offset when the bridge stops without waiting for it.
    pipeline = pipeline_factory([topic], KDB_TEST_ORDERING="key", KDB_TEST_SLOW_KEYS="slow=15000",
                                BRIDGE_SHUTDOWN_TIMEOUT="0")
    produce_keyed(pipeline.kafka.bootstrap_servers, topic, 40, key=lambda i: "slow" if i == 10 else str(i))
    workers = pipeline.start_workers(processes=1, threads=8)
    bridge = pipeline.start_bridge()
    ended = lambda: {e.offset for e in read_events(redis_client) if e.kind == "E"}  # noqa: E731
    wait_until(lambda: ended() >= set(range(40)) - {10}, 60, message="the fast records never finished")
    assert bridge.stop() == 0
    assert pipeline.committed() == {(topic, 0): 10}
    keys = PartitionKeys(pipeline.group, topic, 0)
    assert {int(o) for o in redis_client.zrange(keys.done, 0, -1)} >= set(range(11, 40))

    message = refused(cli(pipeline, "reset-offsets", f"{topic}:0", "--to-offset", "5"))
    assert f"records still run in workers ({topic}[0]@10)" in message
    wait_until(lambda: 10 in ended(), 30, message="the slow record never finished")
    workers.stop(timeout=10)
    plan = ok(cli(pipeline, "reset-offsets", f"{topic}:0", "--to-offset", "5", "--dry-run"))
    assert plan.splitlines()[1:] == [f"  {topic}[0]: 10 -> 5", "dry run: nothing changed"]
    assert redis_client.zcard(keys.done) == 30, "a dry run leaves the ledger alone"
    epoch = int(redis_client.get(keys.epoch))
    ok(cli(pipeline, "reset-offsets", f"{topic}:0", "--to-offset", "5"))
    assert pipeline.committed() == {(topic, 0): 5}
    assert redis_client.zcard(keys.done) == 0, "no done fact from the new offset on survives"
    assert int(redis_client.get(keys.epoch)) > epoch

    events_before = len(read_events(redis_client))
    pipeline.env["KDB_TEST_SLOW_KEYS"] = ""
    pipeline.start_workers(processes=1, threads=8)
    bridge = pipeline.start_bridge()
    assert wait_committed_to_end(pipeline) == {(topic, 0): 40}
    assert bridge.stop() == 0
    report = check(read_events(redis_client)[events_before:], scope="key")
    assert report.duplicates == 0 and report.order_violations == []
    assert report.processed == {(topic, 0): set(range(5, 40))}, "every record from the new offset ran again"
